"""BatchNorm Triton kernels (no launchers here: see :mod:`.batchnorm`).

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
``dx``. Statistics and sums are fp32 whatever the input dtype. Imported only where Triton is.
"""
from __future__ import annotations

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
def _tile(C, S, sN, sC, sS, num_sb, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's (spatial x channel) tile of an (N, C, S) tensor: channel offsets and mask, the tile's
    mask and its element offsets (int64: large activations overflow int32 offsets)."""
    j = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    n = j // num_sb
    offs_s = (j - n * num_sb) * BLOCK_S + tl.arange(0, BLOCK_S)
    m = (offs_s < S)[:, None] & mask_c[None, :]
    off = (n.to(tl.int64) * sN + offs_s[:, None].to(tl.int64) * sS
           + offs_c[None, :].to(tl.int64) * sC)
    return offs_c, mask_c, m, off


@triton.jit
def _bn_apply_kernel(X, R, Y, MEAN, LO, VAR, W, B, eps, C, S, sN, sC, sS, num_sb,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, HAS_LO: tl.constexpr,
                     RELU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    offs_c, mask_c, m, off = _tile(C, S, sN, sC, sS, num_sb, BLOCK_S, BLOCK_C)
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
def _centred_and_dy(X, DY, R, off, m, mean, lo, scale, beta, HAS_R: tl.constexpr, RELU: tl.constexpr,
                    ACC: tl.constexpr):
    """The centred input (x - mean - mean_lo) and the incoming gradient, masked by the fused ReLU's
    pre-activation (its residual added) when there is one: shared by the backward reduce and apply."""
    xc = (tl.load(X + off, mask=m, other=0.0).to(ACC) - mean[None, :]) - lo[None, :]
    dy = tl.load(DY + off, mask=m, other=0.0).to(ACC)
    if RELU:
        pre = xc * scale[None, :] + beta[None, :]
        if HAS_R:
            pre = pre + tl.load(R + off, mask=m, other=0.0).to(ACC)
        dy = tl.where(pre > 0.0, dy, 0.0)
    return xc, dy


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
        xc, dy = _centred_and_dy(X, DY, R, off, m, mean, lo, scale, beta, HAS_R, RELU, ACC)
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
    offs_c, mask_c, m, off = _tile(C, S, sN, sC, sS, num_sb, BLOCK_S, BLOCK_C)
    mean, lo, inv, scale, beta = _scale_shift(MEAN, LO, VAR, W, B, offs_c, mask_c, eps, HAS_W, HAS_B,
                                               HAS_LO, ACC)
    xc, dy = _centred_and_dy(X, DY, R, off, m, mean, lo, scale, beta, HAS_R, RELU, ACC)
    if RELU and HAS_R:
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
