"""BatchNorm (+ residual add, + ReLU) in Triton: kernels, torch.library ops, modules.

Forward in training is three launches:

1. ``_bn_stats_kernel``: a 2-D grid (chunks of the reduced axis x channel blocks). Each program
   walks its chunk tile by tile, takes each tile's exact two-pass (count, mean, M2) and merges it
   into its running triple with Chan's formula. Parallel over the reduced axis, so small C still
   fills the GPU.
2. ``_bn_combine_kernel``: one program per channel block merges the chunk partials in a fixed
   order (deterministic, no atomics) into the batch mean and biased variance. The mean is kept as
   an exact fp32 pair ``mean + mean_lo`` (fp32 alone loses 5% of the spread at mean 1e4, std 1e-2).
3. ``_bn_apply_kernel``: ``y = act(((x - mean) - mean_lo) * scale + beta [+ residual])``.

Backward mirrors it: per-chunk partial sums of ``dy`` and ``dy * xhat`` (the ReLU mask is
recomputed from ``x`` [+ residual], never stored), an ordered combine, then the elementwise
``dx``. Statistics and sums are fp32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _backend
from ._layout import View3, as_view3, like, tile

if _backend.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _bn_stats_kernel(X, P_CNT, P_MEAN, P_M2, C, S, sN, sC, sS, num_sb, total, per_prog,
                         BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
        pid_p = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        ar_s = tl.arange(0, BLOCK_S)
        cnt = tl.zeros([BLOCK_C], dtype=ACC)
        mean = tl.zeros([BLOCK_C], dtype=ACC)
        m2 = tl.zeros([BLOCK_C], dtype=ACC)
        # Shift by a per-channel pivot (the channel's first value, the same in every program) so
        # that fp32 sums of large-offset data stay exact; partial means are relative to it.
        pivot = tl.load(X + offs_c.to(tl.int64) * sC, mask=mask_c, other=0.0).to(ACC)
        start = pid_p * per_prog
        for i in range(0, per_prog):
            j = start + i
            n = j // num_sb
            offs_s = (j - n * num_sb) * BLOCK_S + ar_s
            mask_s = (offs_s < S) & (tl.full([BLOCK_S], j, tl.int32) < total)
            m = mask_s[:, None] & mask_c[None, :]
            ptr = (X + n.to(tl.int64) * sN + offs_s[:, None].to(tl.int64) * sS
                   + offs_c[None, :].to(tl.int64) * sC)
            x = tl.where(m, tl.load(ptr, mask=m, other=0.0).to(ACC) - pivot[None, :], 0.0)
            t_cnt = tl.sum(mask_s.to(ACC), axis=0)
            t_mean = tl.sum(x, axis=0) / tl.maximum(t_cnt, 1.0)
            d = tl.where(m, x - t_mean[None, :], 0.0)
            t_m2 = tl.sum(d * d, axis=0)
            new_cnt = cnt + t_cnt
            frac = t_cnt / tl.maximum(new_cnt, 1.0)
            delta = t_mean - mean
            mean = mean + delta * frac
            m2 = m2 + t_m2 + delta * delta * cnt * frac
            cnt = new_cnt
        out = pid_p * C + offs_c
        tl.store(P_CNT + out, cnt, mask=mask_c)
        tl.store(P_MEAN + out, mean, mask=mask_c)
        tl.store(P_M2 + out, m2, mask=mask_c)

    @triton.jit
    def _bn_combine_kernel(X, sC, P_CNT, P_MEAN, P_M2, MEAN, MEAN_LO, VAR, C, P, BLOCK_C: tl.constexpr,
                           ACC: tl.constexpr):
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        cnt = tl.zeros([BLOCK_C], dtype=ACC)
        mean = tl.zeros([BLOCK_C], dtype=ACC)
        m2 = tl.zeros([BLOCK_C], dtype=ACC)
        for p in range(0, P):
            t_cnt = tl.load(P_CNT + p * C + offs_c, mask=mask_c, other=0.0)
            t_mean = tl.load(P_MEAN + p * C + offs_c, mask=mask_c, other=0.0)
            t_m2 = tl.load(P_M2 + p * C + offs_c, mask=mask_c, other=0.0)
            new_cnt = cnt + t_cnt
            frac = t_cnt / tl.maximum(new_cnt, 1.0)
            delta = t_mean - mean
            mean = mean + delta * frac
            m2 = m2 + t_m2 + delta * delta * cnt * frac
            cnt = new_cnt
        pivot = tl.load(X + offs_c.to(tl.int64) * sC, mask=mask_c, other=0.0).to(ACC)
        # pivot + mean is not representable in fp32 when |pivot| >> spread: keep it as the exact
        # unevaluated sum hi + lo (TwoSum), so x - mean = (x - hi) - lo with x - hi exact.
        hi = pivot + mean
        b = hi - pivot
        tl.store(MEAN + offs_c, hi, mask=mask_c)
        tl.store(MEAN_LO + offs_c, (pivot - (hi - b)) + (mean - b), mask=mask_c)
        tl.store(VAR + offs_c, m2 / tl.maximum(cnt, 1.0), mask=mask_c)

    @triton.jit
    def _scale_shift(MEAN, LO, VAR, W, B, offs_c, mask_c, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     HAS_LO: tl.constexpr, ACC: tl.constexpr):
        mean = tl.load(MEAN + offs_c, mask=mask_c, other=0.0).to(ACC)
        lo = tl.zeros_like(mean)
        if HAS_LO:
            lo = tl.load(LO + offs_c, mask=mask_c, other=0.0).to(ACC)
        var = tl.load(VAR + offs_c, mask=mask_c, other=1.0).to(ACC)
        inv = 1.0 / tl.sqrt(var + eps)
        scale = inv
        if HAS_W:
            scale = inv * tl.load(W + offs_c, mask=mask_c, other=1.0).to(ACC)
        beta = tl.zeros_like(mean)
        if HAS_B:
            beta = tl.load(B + offs_c, mask=mask_c, other=0.0).to(ACC)
        return mean, lo, inv, scale, beta

    @triton.jit
    def _bn_apply_kernel(X, R, Y, MEAN, LO, VAR, W, B, eps, C, S, sN, sC, sS, num_sb,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, HAS_LO: tl.constexpr,
                         RELU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
        j = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        n = j // num_sb
        offs_s = (j - n * num_sb) * BLOCK_S + tl.arange(0, BLOCK_S)
        m = (offs_s < S)[:, None] & mask_c[None, :]
        off = (n.to(tl.int64) * sN + offs_s[:, None].to(tl.int64) * sS
               + offs_c[None, :].to(tl.int64) * sC)
        mean, lo, _, scale, beta = _scale_shift(MEAN, LO, VAR, W, B, offs_c, mask_c, eps, HAS_W, HAS_B,
                                                HAS_LO, ACC)
        x = tl.load(X + off, mask=m, other=0.0).to(ACC)
        y = ((x - mean[None, :]) - lo[None, :]) * scale[None, :] + beta[None, :]
        if HAS_R:
            y = y + tl.load(R + off, mask=m, other=0.0).to(ACC)
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _bn_bwd_reduce_kernel(X, DY, R, MEAN, LO, VAR, W, B, P_SDY, P_SDYX, eps, C, S, sN, sC, sS,
                              num_sb, total, per_prog, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                              HAS_R: tl.constexpr, HAS_LO: tl.constexpr, RELU: tl.constexpr,
                              BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
        pid_p = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        ar_s = tl.arange(0, BLOCK_S)
        mean, lo, inv, scale, beta = _scale_shift(MEAN, LO, VAR, W, B, offs_c, mask_c, eps, HAS_W, HAS_B,
                                                   HAS_LO, ACC)
        sdy = tl.zeros([BLOCK_C], dtype=ACC)
        sdyx = tl.zeros([BLOCK_C], dtype=ACC)
        start = pid_p * per_prog
        for i in range(0, per_prog):
            j = start + i
            n = j // num_sb
            offs_s = (j - n * num_sb) * BLOCK_S + ar_s
            m = ((offs_s < S) & (tl.full([BLOCK_S], j, tl.int32) < total))[:, None] & mask_c[None, :]
            off = (n.to(tl.int64) * sN + offs_s[:, None].to(tl.int64) * sS
                   + offs_c[None, :].to(tl.int64) * sC)
            xc = (tl.load(X + off, mask=m, other=0.0).to(ACC) - mean[None, :]) - lo[None, :]
            dy = tl.load(DY + off, mask=m, other=0.0).to(ACC)
            if RELU:
                pre = xc * scale[None, :] + beta[None, :]
                if HAS_R:
                    pre = pre + tl.load(R + off, mask=m, other=0.0).to(ACC)
                dy = tl.where(pre > 0.0, dy, 0.0)
            sdy += tl.sum(dy, axis=0)
            sdyx += tl.sum(dy * xc, axis=0)
        out = pid_p * C + offs_c
        tl.store(P_SDY + out, sdy, mask=mask_c)
        tl.store(P_SDYX + out, sdyx * inv, mask=mask_c)

    @triton.jit
    def _sum_rows_kernel(P_A, P_B, A, B, C, P, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        a = tl.zeros([BLOCK_C], dtype=ACC)
        b = tl.zeros([BLOCK_C], dtype=ACC)
        for p in range(0, P):
            a += tl.load(P_A + p * C + offs_c, mask=mask_c, other=0.0)
            b += tl.load(P_B + p * C + offs_c, mask=mask_c, other=0.0)
        tl.store(A + offs_c, a, mask=mask_c)
        tl.store(B + offs_c, b, mask=mask_c)

    @triton.jit
    def _bn_bwd_apply_kernel(X, DY, R, DX, DR, MEAN, LO, VAR, W, B, SDY, SDYX, inv_count, eps,
                             C, S, sN, sC, sS, num_sb, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                             HAS_R: tl.constexpr, HAS_LO: tl.constexpr, RELU: tl.constexpr,
                             TRAINING: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                             ACC: tl.constexpr):
        j = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        n = j // num_sb
        offs_s = (j - n * num_sb) * BLOCK_S + tl.arange(0, BLOCK_S)
        m = (offs_s < S)[:, None] & mask_c[None, :]
        off = (n.to(tl.int64) * sN + offs_s[:, None].to(tl.int64) * sS
               + offs_c[None, :].to(tl.int64) * sC)
        mean, lo, inv, scale, beta = _scale_shift(MEAN, LO, VAR, W, B, offs_c, mask_c, eps, HAS_W, HAS_B,
                                                   HAS_LO, ACC)
        xc = (tl.load(X + off, mask=m, other=0.0).to(ACC) - mean[None, :]) - lo[None, :]
        dy = tl.load(DY + off, mask=m, other=0.0).to(ACC)
        if RELU:
            pre = xc * scale[None, :] + beta[None, :]
            if HAS_R:
                pre = pre + tl.load(R + off, mask=m, other=0.0).to(ACC)
            dy = tl.where(pre > 0.0, dy, 0.0)
            if HAS_R:
                tl.store(DR + off, dy.to(DR.dtype.element_ty), mask=m)
        if TRAINING:
            mdy = tl.load(SDY + offs_c, mask=mask_c, other=0.0) * inv_count
            mdyx = tl.load(SDYX + offs_c, mask=mask_c, other=0.0) * inv_count
            xhat = xc * inv[None, :]
            dx = scale[None, :] * (dy - mdy[None, :] - xhat * mdyx[None, :])
        else:
            dx = scale[None, :] * dy
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)

    @triton.jit
    def _bn_update_running_kernel(RM, RV, NBT, MEAN, VAR, C, momentum, unbias,
                                  CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr):
        # One program: it bumps num_batches_tracked and reads it back race-free.
        nbt = tl.load(NBT) + 1
        tl.store(NBT, nbt)
        if CUMULATIVE:
            f = 1.0 / nbt.to(tl.float32)
        else:
            f = momentum
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            m = offs < C
            rm = tl.load(RM + offs, mask=m, other=0.0)
            rv = tl.load(RV + offs, mask=m, other=0.0)
            mean = tl.load(MEAN + offs, mask=m, other=0.0)
            var = tl.load(VAR + offs, mask=m, other=0.0) * unbias
            new_m = (1.0 - f) * rm.to(tl.float32) + f * mean.to(tl.float32)
            new_v = (1.0 - f) * rv.to(tl.float32) + f * var.to(tl.float32)
            tl.store(RM + offs, new_m.to(RM.dtype.element_ty), mask=m)
            tl.store(RV + offs, new_v.to(RV.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- launchers
_STATS_TILE = 4096
_APPLY_TILE = 4096
_INTERP_TILE = 1 << 14  # the interpreter pays per op, not per element: big tiles, few programs


def _tiles(x: Tensor, v: View3) -> tuple[int, int]:
    return tile(v, _INTERP_TILE if _backend.INTERPRET else _STATS_TILE)


def _chunks(x: Tensor, v: View3, bs: int, bc: int) -> tuple[int, int, int, int]:
    """(num_sb, total items, items per program, programs) for a chunked reduction."""
    num_sb = triton.cdiv(v.S, bs)
    total = v.N * num_sb
    num_cb = triton.cdiv(v.C, bc)
    want = max(1, min(total, triton.cdiv(_backend.num_programs_target(x), num_cb)))
    per = triton.cdiv(total, want)
    return num_sb, total, per, triton.cdiv(total, per)


def stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics and accumulation dtype: fp64 for fp64 inputs (gradcheck), else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _acc(x: Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _torch_3d(x: Tensor) -> Tensor:
    """(N, C, S) view in the accumulation dtype for the torch fallback."""
    return x.reshape(x.shape[0], x.shape[1], -1).to(stat_dtype(x))


def _bcast(t: Tensor) -> Tensor:
    return t[None, :, None]


def _centred(x: Tensor, mean: Tensor, lo: Optional[Tensor]) -> Tensor:
    """``x - (mean + lo)`` as ``(x - mean) - lo`` in the accumulation dtype (torch fallback)."""
    d = _torch_3d(x) - _bcast(mean.to(stat_dtype(x)))
    return d - _bcast(lo.to(d.dtype)) if lo is not None else d


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance (fp32) of ``x`` over every dim but 1."""
    mean, _, var = batch_stats_split(x)
    return mean, var


def batch_stats_split(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, mean_lo, var)``: the mean as an unevaluated sum ``mean + mean_lo`` (fp32 pair).

    A channel with mean 1e4 and std 1e-2 has a mean that fp32 holds only to ~5e-4, 5% of its
    spread; the kernels subtract ``(x - mean) - mean_lo`` instead, both differences exact-ish."""
    C = x.shape[1]
    if not _backend.use_triton(x):
        x3 = _torch_3d(x)
        mean = x3.mean(dim=(0, 2))
        lo = (x3 - _bcast(mean)).mean(dim=(0, 2))  # the second pass recovers what fp32 rounded off
        return mean, lo, _centred(x, mean, lo).square().mean(dim=(0, 2))
    x, v = as_view3(x)
    bs, bc = _tiles(x, v)
    num_sb, total, per, P = _chunks(x, v, bs, bc)
    f32 = dict(device=x.device, dtype=stat_dtype(x))
    p_cnt, p_mean, p_m2 = (torch.empty(P, C, **f32) for _ in range(3))
    _bn_stats_kernel[(P, triton.cdiv(C, bc))](
        x, p_cnt, p_mean, p_m2, C, v.S, v.sN, v.sC, v.sS, num_sb, total, per,
        BLOCK_S=bs, BLOCK_C=bc, ACC=_acc(x))
    mean, lo, var = (torch.empty(C, **f32) for _ in range(3))
    bc2 = min(1024, triton.next_power_of_2(C))
    _bn_combine_kernel[(triton.cdiv(C, bc2),)](x, v.sC, p_cnt, p_mean, p_m2, mean, lo, var, C, P,
                                               BLOCK_C=bc2, ACC=_acc(x))
    return mean, lo, var


def bn_apply(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             residual: Optional[Tensor], eps: float, relu: bool, mean_lo: Optional[Tensor] = None) -> Tensor:
    """``act((x - mean - mean_lo) * w / sqrt(var + eps) + b [+ residual])``.

    ``x - mean`` comes first: with a large mean and small spread, ``x * scale + shift`` would
    cancel catastrophically."""
    out = torch.empty_like(x)
    if not _backend.use_triton(x):
        sd = stat_dtype(x)
        inv = torch.rsqrt(var.to(sd) + eps)
        scale = inv * weight.to(sd) if weight is not None else inv
        beta = bias.to(sd) if bias is not None else torch.zeros_like(scale)
        y = _centred(x, mean, mean_lo) * scale[None, :, None] + beta[None, :, None]
        if residual is not None:
            y = y + _torch_3d(residual)
        if relu:
            y = y.clamp_min(0.0)
        return out.copy_(y.reshape(x.shape))
    xc, v = as_view3(x)
    rc = like(residual, xc) if residual is not None else None
    y = out if out.stride() == xc.stride() else torch.empty_like(xc)
    bs, bc = tile(v, _INTERP_TILE if _backend.INTERPRET else _APPLY_TILE)
    num_sb = triton.cdiv(v.S, bs)
    _bn_apply_kernel[(v.N * num_sb, triton.cdiv(v.C, bc))](
        xc, rc if rc is not None else xc, y, mean, mean_lo if mean_lo is not None else mean, var,
        weight if weight is not None else mean, bias if bias is not None else mean,
        eps, v.C, v.S, v.sN, v.sC, v.sS, num_sb,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_R=rc is not None,
        HAS_LO=mean_lo is not None, RELU=relu,
        BLOCK_S=bs, BLOCK_C=bc, ACC=_acc(x))
    return y if y is out else out.copy_(y)


def bn_backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                       bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
                       relu: bool, mean_lo: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(dy')`` and ``sum(dy' * xhat)`` (fp32), ``dy'`` = dy through the ReLU."""
    C = x.shape[1]
    if not _backend.use_triton(x):
        sd = stat_dtype(x)
        g = _torch_3d(dy)
        inv = torch.rsqrt(var.to(sd) + eps)
        xhat = _centred(x, mean, mean_lo) * inv[None, :, None]
        if relu:
            g = g * (_bn_pre_torch(x, mean, var, weight, bias, residual, eps, mean_lo) > 0)
        return g.sum(dim=(0, 2)), (g * xhat).sum(dim=(0, 2))
    xc, v = as_view3(x)
    dyc = like(dy, xc)
    rc = like(residual, xc) if residual is not None else None
    bs, bc = _tiles(xc, v)
    num_sb, total, per, P = _chunks(xc, v, bs, bc)
    f32 = dict(device=x.device, dtype=stat_dtype(x))
    p_a, p_b = torch.empty(P, C, **f32), torch.empty(P, C, **f32)
    _bn_bwd_reduce_kernel[(P, triton.cdiv(C, bc))](
        xc, dyc, rc if rc is not None else xc, mean, mean_lo if mean_lo is not None else mean, var,
        weight if weight is not None else mean, bias if bias is not None else mean,
        p_a, p_b, eps, C, v.S, v.sN, v.sC, v.sS, num_sb, total, per,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_R=rc is not None,
        HAS_LO=mean_lo is not None, RELU=relu,
        BLOCK_S=bs, BLOCK_C=bc, ACC=_acc(x))
    sdy, sdyx = torch.empty(C, **f32), torch.empty(C, **f32)
    bc2 = min(1024, triton.next_power_of_2(C))
    _sum_rows_kernel[(triton.cdiv(C, bc2),)](p_a, p_b, sdy, sdyx, C, P, BLOCK_C=bc2, ACC=_acc(x))
    return sdy, sdyx


def _bn_pre_torch(x, mean, var, weight, bias, residual, eps, mean_lo=None) -> Tensor:
    sd = stat_dtype(x)
    inv = torch.rsqrt(var.to(sd) + eps)
    scale = inv * weight.to(sd) if weight is not None else inv
    beta = bias.to(sd) if bias is not None else torch.zeros_like(scale)
    pre = _centred(x, mean, mean_lo) * scale[None, :, None] + beta[None, :, None]
    if residual is not None:
        pre = pre + _torch_3d(residual)
    return pre


def bn_backward_apply(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                      bias: Optional[Tensor], residual: Optional[Tensor], sdy: Tensor, sdyx: Tensor,
                      count: float, eps: float, relu: bool, training: bool,
                      mean_lo: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """``dx`` (and the residual's gradient when a ReLU masks it) given the reduced sums."""
    dx = torch.empty_like(x)
    dres = torch.empty_like(residual) if (residual is not None and relu) else None
    if not _backend.use_triton(x):
        sd = stat_dtype(x)
        g = _torch_3d(dy)
        if relu:
            g = g * (_bn_pre_torch(x, mean, var, weight, bias, residual, eps, mean_lo) > 0)
            if dres is not None:
                dres.copy_(g.reshape(x.shape))
        inv = torch.rsqrt(var.to(sd) + eps)
        scale = inv * weight.to(sd) if weight is not None else inv
        if training:
            xhat = _centred(x, mean, mean_lo) * inv[None, :, None]
            g = g - _bcast(sdy) / count - xhat * _bcast(sdyx) / count
        dx.copy_((g * scale[None, :, None]).reshape(x.shape))
        return dx, dres
    xc, v = as_view3(x)
    dyc = like(dy, xc)
    rc = like(residual, xc) if residual is not None else None
    dxc = dx if dx.stride() == xc.stride() else torch.empty_like(xc)
    drc = None
    if dres is not None:
        drc = dres if dres.stride() == xc.stride() else torch.empty_like(xc, dtype=residual.dtype)
    bs, bc = tile(v, _INTERP_TILE if _backend.INTERPRET else _APPLY_TILE)
    num_sb = triton.cdiv(v.S, bs)
    _bn_bwd_apply_kernel[(v.N * num_sb, triton.cdiv(v.C, bc))](
        xc, dyc, rc if rc is not None else xc, dxc, drc if drc is not None else dxc, mean,
        mean_lo if mean_lo is not None else mean, var,
        weight if weight is not None else mean, bias if bias is not None else mean,
        sdy, sdyx, 1.0 / count, eps, v.C, v.S, v.sN, v.sC, v.sS, num_sb,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_R=rc is not None,
        HAS_LO=mean_lo is not None, RELU=relu,
        TRAINING=training, BLOCK_S=bs, BLOCK_C=bc, ACC=_acc(x))
    if dxc is not dx:
        dx.copy_(dxc)
    if drc is not None and drc is not dres:
        dres.copy_(drc)
    return dx, dres


# ----------------------------------------------------------------------------- torch.library ops
def _reduced_count(x: Tensor) -> int:
    return x.numel() // x.shape[1] if x.shape[1] else 0


@torch.library.custom_op("shiftlab::bn_fwd", mutates_args=())
def bn_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
           mean_in: Optional[Tensor], var_in: Optional[Tensor], eps: float,
           relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize with batch statistics (``mean_in is None``) or the given ones.

    Returns ``(y, mean, var, mean_lo)``: the batch statistics (fp32, biased variance, the mean as
    ``mean + mean_lo``, see :func:`batch_stats_split`); in eval mode (statistics given) the last
    three are empty -- the backward reads the given ones.
    """
    if mean_in is None or var_in is None:
        mean, lo, var = batch_stats_split(x)
        return bn_apply(x, mean, var, weight, bias, residual, eps, relu, lo), mean, var, lo
    empty = x.new_empty(0, dtype=stat_dtype(x))
    return (bn_apply(x, mean_in, var_in, weight, bias, residual, eps, relu), empty, empty.clone(),
            empty.clone())


@bn_fwd.register_fake
def _(x, weight, bias, residual, mean_in, var_in, eps, relu):
    C = x.shape[1] if mean_in is None or var_in is None else 0
    return (torch.empty_like(x), *(x.new_empty(C, dtype=stat_dtype(x)) for _ in range(3)))


@torch.library.custom_op("shiftlab::bn_bwd", mutates_args=())
def bn_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
           residual: Optional[Tensor], mean: Tensor, var: Tensor, eps: float, relu: bool,
           training: bool, mean_lo: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweight, dbias, dresidual)``; fp32 ``dweight/dbias``; ``dresidual`` is
    empty unless a ReLU masks it."""
    sdy, sdyx = bn_backward_reduce(dy, x, mean, var, weight, bias, residual, eps, relu, mean_lo)
    dx, dres = bn_backward_apply(dy, x, mean, var, weight, bias, residual, sdy, sdyx,
                                 float(_reduced_count(x)), eps, relu, training, mean_lo)
    if dres is None:
        dres = x.new_empty(0)
    return dx, sdyx, sdy, dres


@bn_bwd.register_fake
def _(dy, x, weight, bias, residual, mean, var, eps, relu, training, mean_lo=None):
    C = x.shape[1]
    dres = torch.empty_like(residual) if (residual is not None and relu) else x.new_empty(0)
    return (torch.empty_like(x), x.new_empty(C, dtype=stat_dtype(x)),
            x.new_empty(C, dtype=stat_dtype(x)), dres)


def _bn_setup(ctx, inputs, output) -> None:
    x, weight, bias, residual, mean_in, _var_in, eps, relu = inputs
    _, mean, var, lo = output
    training = mean_in is None or _var_in is None
    if not training:
        mean, var, lo = mean_in, _var_in, None
    ctx.save_for_backward(x, weight, bias, residual, mean, var, lo)
    ctx.eps, ctx.relu, ctx.training = eps, relu, training


def _bn_backward(ctx, dy, _dmean, _dvar, _dlo):
    x, weight, bias, residual, mean, var, lo = ctx.saved_tensors
    dx, dw, db, dres = torch.ops.shiftlab.bn_bwd(dy, x, weight, bias, residual, mean, var,
                                                 ctx.eps, ctx.relu, ctx.training, lo)
    dw = dw.to(weight.dtype) if weight is not None else None
    db = db.to(bias.dtype) if bias is not None else None
    if residual is None:
        dr = None
    elif ctx.relu:
        dr = dres
    else:
        dr = dy
    return dx, dw, db, dr, None, None, None, None


bn_fwd.register_autograd(_bn_backward, setup_context=_bn_setup)


@torch.library.custom_op("shiftlab::bn_update_running",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_update_running(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor,
                      mean: Tensor, var: Tensor, momentum: float, cumulative: bool,
                      count: float) -> None:
    """``nn.BatchNorm``'s running-stat step in one launch: bump ``num_batches_tracked``, then
    ``r = (1 - f) r + f s`` with ``f = momentum`` (or ``1 / num_batches_tracked`` when
    ``cumulative``) and the unbiased batch variance."""
    unbias = count / (count - 1) if count > 1 else 1.0
    if not _backend.use_triton(mean):
        num_batches_tracked.add_(1)
        f = 1.0 / num_batches_tracked.double() if cumulative else momentum
        running_mean.copy_((1 - f) * running_mean.double() + f * mean.double())
        running_var.copy_((1 - f) * running_var.double() + f * var.double() * unbias)
        return
    C = running_mean.numel()
    _bn_update_running_kernel[(1,)](running_mean, running_var, num_batches_tracked, mean, var, C,
                                    float(momentum), unbias, CUMULATIVE=cumulative,
                                    BLOCK_C=min(1024, triton.next_power_of_2(max(C, 1))))


@bn_update_running.register_fake
def _(running_mean, running_var, num_batches_tracked, mean, var, momentum, cumulative, count):
    return None


# ----------------------------------------------------------------------------- SyncBatchNorm
def merge_stats(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan merge of per-rank (count, mean, M2) rows (dim 0) into one; fixed order, fp64."""
    count, mean, m2 = count.double(), mean.double(), m2.double()
    n = count.sum(0)
    mu = (count * mean).sum(0) / n.clamp_min(1)
    M2 = m2.sum(0) + (count * (mean - mu) ** 2).sum(0)
    return n, mu, M2


class _SyncBatchNorm(torch.autograd.Function):
    """Stats phase -> all_gather of (count, mean, M2) -> exact merge -> normalize phase."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, relu, group):
        C = x.shape[1]
        mean_l, lo_l, var_l = batch_stats_split(x)
        n_l = float(_reduced_count(x))
        mean_l64 = mean_l.double() + lo_l.double()  # exact: the pair's full precision crosses ranks
        row = torch.stack([torch.full_like(mean_l64, n_l), mean_l64, var_l.double() * n_l])
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, row, group=group)
        g = torch.stack(rows)  # (world, 3, C)
        n, mu, M2 = merge_stats(g[:, 0], g[:, 1], g[:, 2])
        total = float(n[0].item()) if C else 0.0
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(total)} "
                             "values per channel over all ranks")
        mean, var = mu.to(stat_dtype(x)), (M2 / total).to(stat_dtype(x))
        lo = (mu - mean.double()).to(stat_dtype(x))  # what fp32 rounded off the merged mean
        y = bn_apply(x, mean, var, weight, bias, residual, eps, relu, lo)
        ctx.save_for_backward(x, weight, bias, residual, mean, var, lo)
        ctx.eps, ctx.relu, ctx.group, ctx.total = eps, relu, group, total
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var, torch.tensor(total)

    @staticmethod
    def backward(ctx, dy, _dm, _dv, _dn):
        x, weight, bias, residual, mean, var, lo = ctx.saved_tensors
        sdy, sdyx = bn_backward_reduce(dy, x, mean, var, weight, bias, residual, ctx.eps, ctx.relu, lo)
        both = torch.cat([sdy, sdyx])
        dist.all_reduce(both, group=ctx.group)
        C = x.shape[1]
        dx, dres = bn_backward_apply(dy, x, mean, var, weight, bias, residual, both[:C], both[C:],
                                     ctx.total, ctx.eps, ctx.relu, True, lo)
        dw = sdyx.to(weight.dtype) if weight is not None else None
        db = sdy.to(bias.dtype) if bias is not None else None
        dr = None if residual is None else (dres if ctx.relu else dy)
        return dx, dw, db, dr, None, None, None


# ----------------------------------------------------------------------------- modules
StatsObserver = Callable[[Tensor, Tensor], None]


class _TritonBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in ``nn.BatchNorm*d`` running on the Triton kernels.

    Same constructor, buffers and state_dict keys as torch's layer. Extras:

    * ``forward(x, residual=None)``: fuses ``+ residual`` (and the ReLU when ``fuse_relu``).
    * ``stats_observer``: a callable ``(mean, var)`` handed the per-channel batch mean and biased
      variance (fp32, detached) that the forward already computed -- no extra pass over ``x``.
    * ``process_group``: with ``sync=True`` and a world size > 1, statistics are merged across
      ranks (SyncBatchNorm) between the stats and normalize phases; uneven batches are exact.
    """

    fuse_relu: bool = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, sync: bool = False, process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.sync = sync
        self.process_group = process_group
        self.stats_observer: StatsObserver | None = None

    def set_stats_observer(self, fn: StatsObserver | None) -> None:
        """Register (or clear with ``None``) the batch-statistics observer."""
        self.stats_observer = fn

    def _sync_active(self) -> bool:
        return (self.sync and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        self._check_input_dim(x)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        update = self.training and self.track_running_stats and self.running_mean is not None
        w = self.weight if self.affine else None
        b = self.bias if self.affine else None
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
        if bn_training and self._sync_active():
            y, mean, var, total = _SyncBatchNorm.apply(x, w, b, residual, self.eps, self.fuse_relu,
                                                       self.process_group)
            count = float(total)
        elif bn_training:
            count = _reduced_count(x)
            if count <= 1:
                raise ValueError("Expected more than 1 value per channel when training, got "
                                 f"input size {x.size()}")
            y, mean, var, _ = torch.ops.shiftlab.bn_fwd(x, w, b, residual, None, None, self.eps,
                                                        self.fuse_relu)
        else:
            y, mean, var, _ = torch.ops.shiftlab.bn_fwd(x, w, b, residual, self.running_mean,
                                                        self.running_var, self.eps, self.fuse_relu)
        if update:
            torch.ops.shiftlab.bn_update_running(
                self.running_mean, self.running_var, self.num_batches_tracked, mean.detach(),
                var.detach(), 0.0 if self.momentum is None else float(self.momentum),
                self.momentum is None, float(count))
        if bn_training and self.stats_observer is not None:
            self.stats_observer(mean.detach(), var.detach())
        return y


class TritonBatchNorm1d(_TritonBatchNorm):
    """``nn.BatchNorm1d`` twin for ``(N, C)`` and ``(N, C, L)``."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {x.dim()}D input)")


class TritonBatchNorm2d(_TritonBatchNorm):
    """``nn.BatchNorm2d`` twin for ``(N, C, H, W)``, contiguous or channels-last."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")


class TritonBatchNorm3d(_TritonBatchNorm):
    """``nn.BatchNorm3d`` twin for ``(N, C, D, H, W)``."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(f"expected 5D input (got {x.dim()}D input)")


class TritonSyncBatchNorm(_TritonBatchNorm):
    """``nn.SyncBatchNorm`` twin: any ``(N, C, *)`` input, statistics merged over
    ``process_group`` in training when the world size is above 1."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         sync=True, process_group=process_group)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")


class TritonBatchNormReLU1d(TritonBatchNorm1d):
    """``relu(bn(x) [+ residual])`` in one pass; backward recomputes the ReLU mask."""

    fuse_relu = True


class TritonBatchNormReLU2d(TritonBatchNorm2d):
    """``relu(bn(x) [+ residual])`` in one pass (ResNet's ``bn -> +identity -> relu``)."""

    fuse_relu = True

