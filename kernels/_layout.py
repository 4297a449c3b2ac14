"""Shape/stride bookkeeping shared by the BatchNorm launchers (no Triton here).

Every BatchNorm input ``(N, C, *spatial)`` is seen as a 3-index tensor ``x[n, c, s]`` at
``n*sN + c*sC + s*sS`` with ``S = prod(spatial)``. Two layouts are served without copies:
channels-first (``sS == 1``, NCHW contiguous) and channels-last (``sC == 1``, NHWC); in the
channels-last case the batch index is folded into ``s`` so a tile is a block of whole rows.
Anything else (sliced, transposed) is made contiguous once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: ``empty_like`` reproduces the strides exactly."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True


@dataclass(frozen=True)
class View3:
    """``x[n, c, s]`` addressing of a dense tensor (see module doc)."""

    N: int
    C: int
    S: int
    sN: int
    sC: int
    sS: int

    @property
    def channels_last(self) -> bool:
        return self.sC == 1 and self.sS != 1

    @property
    def count(self) -> int:
        """Values per channel: the size of the reduction."""
        return self.N * self.S


def _try_view3(x: Tensor) -> View3 | None:
    N, C = x.shape[0], x.shape[1]
    S = 1
    for d in x.shape[2:]:
        S *= d
    try:
        v = x.view(N, C, S)
    except RuntimeError:
        return None
    sN, sC, sS = v.stride()
    if S == 1:  # (N, C): the batch is the reduced axis
        N, S, sS, sN = 1, N, sN, 0
    elif sC == 1 and sN == S * sS:  # channels-last: fold n into s
        N, S, sN = 1, N * S, 0
    if N == 1:
        sN = 0
    if C == 1:
        sC = 0
    if S == 1:
        sS = 1 if sS == 0 else sS
    if not (sS == 1 or sC in (0, 1)):
        return None
    return View3(N, C, S, sN, sC, sS)


def as_view3(x: Tensor) -> tuple[Tensor, View3]:
    """Return ``x`` (or a contiguous copy) and its 3-index addressing."""
    if _is_dense(x):
        v = _try_view3(x)
        if v is not None:
            return x, v
    x = x.contiguous()
    v = _try_view3(x)
    assert v is not None
    return x, v


def like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` with exactly ``ref``'s strides (a copy only when they differ)."""
    if t.stride() == ref.stride() or t.shape != ref.shape:
        if t.shape != ref.shape:
            raise ValueError(f"shape mismatch: {tuple(t.shape)} vs {tuple(ref.shape)}")
        return t
    out = torch.empty_like(ref, dtype=t.dtype)
    out.copy_(t)
    return out


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def tile(v: View3, elems: int) -> tuple[int, int]:
    """``(BLOCK_S, BLOCK_C)`` of about ``elems`` values, long along the contiguous axis."""
    if v.channels_last:
        bc = min(next_pow2(v.C), 128)
        bs = max(1, min(next_pow2(v.S), elems // bc))
    else:
        bs = min(next_pow2(v.S), elems)
        if v.S > 128:  # least padding of the last tile among 128..bs (ties: the longer tile)
            cands = [c for c in (128, 256, 512, 1024, 2048, 4096, 8192, 16384) if c <= bs]
            bs = min(cands, key=lambda c: (-(-v.S // c) * c, -c))
        bc = max(1, min(next_pow2(v.C), elems // bs))
    return bs, bc
