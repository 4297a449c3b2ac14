"""LayerNorm / RMSNorm ops over the last dim: Triton kernels, launchers, ``torch.library`` ops.

Forward: each program normalizes ``BLOCK_M`` whole rows held in registers (two-pass mean and
variance from the same registers, fp32). Backward: each program owns a contiguous group of rows,
writes ``dx`` and one row of partial ``dW``/``dB``; a second kernel sums the partials in a fixed
order -- deterministic, no atomics or locks. Rows longer than ``MAX_FUSED_N`` go to torch.
The modules are in ``shiftlab.kernels.layernorm``; :func:`layer_norm` is the functional form.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend

MAX_FUSED_N = 16384

if _backend.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _ln_fwd_kernel(X, Y, W, B, MEAN, MEAN_LO, RSTD, M, N, sx, eps, HAS_W: tl.constexpr,
                       HAS_B: tl.constexpr, IS_RMS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rmask = rows < M
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None].to(tl.int64) * sx + cols[None, :], mask=mask,
                    other=0.0).to(ACC)
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], dtype=ACC)
            lo = mean
            d = x
        else:  # shift by each row's first value so fp32 sums of large-offset rows stay exact
            pivot = tl.load(X + rows.to(tl.int64) * sx, mask=rmask, other=0.0).to(ACC)
            xs = tl.where(mask, x - pivot[:, None], 0.0)
            mean_s = tl.sum(xs, axis=1) / N
            d = tl.where(mask, xs - mean_s[:, None], 0.0)
            # the backward needs pivot + mean_s, which fp32 cannot hold when |pivot| >> spread:
            # keep it as the exact unevaluated sum mean + lo (TwoSum)
            mean = pivot + mean_s
            b = mean - pivot
            lo = (pivot - (mean - b)) + (mean_s - b)
        var = tl.sum(d * d, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        y = d * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        tl.store(Y + rows[:, None].to(tl.int64) * N + cols[None, :], y.to(Y.dtype.element_ty),
                 mask=mask)
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(MEAN_LO + rows, lo, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def _ln_bwd_kernel(X, DY, DX, W, MEAN, MEAN_LO, RSTD, PDW, PDB, M, N, sx, sdy, rows_per_prog,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, IS_RMS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        dw = tl.zeros([BLOCK_N], dtype=ACC)
        db = tl.zeros([BLOCK_N], dtype=ACC)
        if HAS_W:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
        start = pid * rows_per_prog
        for r0 in range(start, start + rows_per_prog, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            r64 = rows[:, None].to(tl.int64)
            x = tl.load(X + r64 * sx + cols[None, :], mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + r64 * sdy + cols[None, :], mask=mask, other=0.0).to(ACC)
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            lo = tl.load(MEAN_LO + rows, mask=rmask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            xhat = tl.where(mask, ((x - mean[:, None]) - lo[:, None]) * rstd[:, None], 0.0)
            if HAS_W:
                wdy = dy * w[None, :]
            else:
                wdy = dy
            c1 = tl.sum(xhat * wdy, axis=1) / N
            if IS_RMS:
                dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(wdy, axis=1) / N
                dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(DX + r64 * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_W:
                dw += tl.sum(dy * xhat, axis=0)
            if HAS_B:
                db += tl.sum(dy, axis=0)
        if HAS_W:
            tl.store(PDW + pid * N + cols, dw, mask=cmask)
        if HAS_B:
            tl.store(PDB + pid * N + cols, db, mask=cmask)

    @triton.jit
    def _sum_partials_kernel(P, OUT, G, N, BLOCK: tl.constexpr, ACC: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < N
        acc = tl.zeros([BLOCK], dtype=ACC)
        for g in range(0, G):
            acc += tl.load(P + g * N + cols, mask=cmask, other=0.0)
        tl.store(OUT + cols, acc, mask=cmask)


def _use_kernels(x: Tensor, N: int) -> bool:
    if N > MAX_FUSED_N:
        return False
    return _backend.use_triton(x)


def _sd(x: Tensor) -> torch.dtype:
    """Statistics/accumulation dtype: fp64 for fp64 inputs (gradcheck), else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _acc(x: Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _fwd_cfg(N: int) -> tuple[int, int, int]:
    bn = triton.next_power_of_2(N)
    target = 1 << 14 if _backend.INTERPRET else 4096
    bm = max(1, min(16, target // bn))
    warps = max(1, min(16, bm * bn // 256))
    return bm, bn, warps


def _rows(x: Tensor, N: int) -> Tensor:
    x2 = x.reshape(-1, N)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
              rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    M, N = x.shape
    y = x.new_empty((M, N))
    if not _use_kernels(x, N):
        xf = x.to(_sd(x))
        mean = torch.zeros(M, device=x.device, dtype=_sd(x)) if rms else xf.mean(1)
        lo = torch.zeros_like(mean) if rms else (xf - mean[:, None]).mean(1)  # what fp32 rounded off
        d = (xf - mean[:, None]) - lo[:, None]
        rstd = torch.rsqrt(d.square().mean(1) + eps)
        out = d * rstd[:, None]
        if weight is not None:
            out = out * weight.to(_sd(x))
        if bias is not None:
            out = out + bias.to(_sd(x))
        return y.copy_(out), mean, rstd, lo
    mean, lo, rstd = (torch.empty(M, device=x.device, dtype=_sd(x)) for _ in range(3))
    bm, bn, warps = _fwd_cfg(N)
    _ln_fwd_kernel[(triton.cdiv(M, bm),)](
        x, y, weight if weight is not None else x, bias if bias is not None else x, mean, lo, rstd,
        M, N, x.stride(0), eps, HAS_W=weight is not None, HAS_B=bias is not None, IS_RMS=rms,
        BLOCK_M=bm, BLOCK_N=bn, ACC=_acc(x), num_warps=warps)
    return y, mean, rstd, lo


def _norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
              has_bias: bool, rms: bool, mean_lo: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    M, N = x.shape
    dx = x.new_empty((M, N))
    if not _use_kernels(x, N):
        xhat = ((x.to(_sd(x)) - mean[:, None]) - mean_lo[:, None]) * rstd[:, None]
        g = dy.to(_sd(x))
        wdy = g * weight.to(_sd(x)) if weight is not None else g
        c1 = (xhat * wdy).mean(1, keepdim=True)
        inner = wdy - xhat * c1 if rms else wdy - xhat * c1 - wdy.mean(1, keepdim=True)
        dx.copy_(inner * rstd[:, None])
        return dx, (g * xhat).sum(0), g.sum(0)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    bm, bn, warps = _fwd_cfg(N)
    blocks = triton.cdiv(M, bm)
    G = max(1, min(blocks, _backend.num_programs_target(x) // 2))  # fewer dW/dB partial rows
    rows_per_prog = triton.cdiv(blocks, G) * bm
    G = triton.cdiv(M, rows_per_prog)
    f32 = dict(device=x.device, dtype=_sd(x))
    pdw = torch.empty(G, N, **f32)
    pdb = torch.empty(G, N, **f32)
    _ln_bwd_kernel[(G,)](
        x, dy, dx, weight if weight is not None else x, mean, mean_lo, rstd, pdw, pdb, M, N,
        x.stride(0), dy.stride(0), rows_per_prog, HAS_W=weight is not None, HAS_B=has_bias,
        IS_RMS=rms, BLOCK_M=bm, BLOCK_N=bn, ACC=_acc(x), num_warps=warps)
    dw, db = torch.zeros(N, **f32), torch.zeros(N, **f32)
    blk = min(1024, triton.next_power_of_2(N))
    if weight is not None:
        _sum_partials_kernel[(triton.cdiv(N, blk),)](pdw, dw, G, N, BLOCK=blk, ACC=_acc(x))
    if has_bias:
        _sum_partials_kernel[(triton.cdiv(N, blk),)](pdb, db, G, N, BLOCK=blk, ACC=_acc(x))
    return dx, dw, db


@torch.library.custom_op("shiftlab::ln_fwd", mutates_args=())
def ln_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
           rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row normalization of a 2-D ``x``: returns ``(y, mean, rstd, mean_lo)`` (fp32 stats; the
    row mean is the unevaluated sum ``mean + mean_lo``, exact where fp32 alone is not)."""
    return _norm_fwd(x if x.stride(-1) == 1 else x.contiguous(), weight, bias, eps, rms)


@ln_fwd.register_fake
def _(x, weight, bias, eps, rms):
    M = x.shape[0]
    return (x.new_empty(x.shape), *(x.new_empty(M, dtype=_sd(x)) for _ in range(3)))


@torch.library.custom_op("shiftlab::ln_bwd", mutates_args=())
def ln_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
           has_bias: bool, rms: bool, mean_lo: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweight, dbias)``, the latter two fp32 (zeros when absent)."""
    return _norm_bwd(dy, x if x.stride(-1) == 1 else x.contiguous(), weight, mean, rstd,
                     has_bias, rms, mean_lo)


@ln_bwd.register_fake
def _(dy, x, weight, mean, rstd, has_bias, rms, mean_lo):
    N = x.shape[1]
    return (x.new_empty(x.shape), x.new_empty(N, dtype=_sd(x)),
            x.new_empty(N, dtype=_sd(x)))


def _ln_setup(ctx, inputs, output) -> None:
    x, weight, bias, _eps, rms = inputs
    _, mean, rstd, lo = output
    ctx.save_for_backward(x, weight, mean, rstd, lo)
    ctx.has_bias, ctx.bias_dtype, ctx.rms = bias is not None, (bias.dtype if bias is not None else None), rms


def _ln_backward(ctx, dy, _dmean, _drstd, _dlo):
    x, weight, mean, rstd, lo = ctx.saved_tensors
    dx, dw, db = torch.ops.shiftlab.ln_bwd(dy, x, weight, mean, rstd, ctx.has_bias, ctx.rms, lo)
    return (dx, dw.to(weight.dtype) if weight is not None else None,
            db.to(ctx.bias_dtype) if ctx.has_bias else None, None, None)


ln_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)


def layer_norm(x: Tensor, normalized_shape: tuple[int, ...], weight: Optional[Tensor],
               bias: Optional[Tensor], eps: float, rms: bool = False) -> Tensor:
    """Functional form: normalize ``x`` over its trailing ``normalized_shape`` dims."""
    N = math.prod(normalized_shape)
    if tuple(x.shape[x.dim() - len(normalized_shape):]) != tuple(normalized_shape):
        raise ValueError(f"input shape {tuple(x.shape)} does not end with normalized_shape "
                         f"{tuple(normalized_shape)}")
    w = weight.reshape(N) if weight is not None else None
    b = bias.reshape(N) if bias is not None else None
    y, _, _, _ = torch.ops.shiftlab.ln_fwd(_rows(x, N), w, b, eps, rms)
    return y.reshape(x.shape)
