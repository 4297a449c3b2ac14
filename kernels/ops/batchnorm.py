"""BatchNorm ops: launchers of the Triton kernels, their torch fallbacks, ``torch.library`` ops.

The kernels themselves are in :mod:`.bn_kernels` (their docstring explains the three-launch
forward and backward); the modules that call these ops are in ``shiftlab.kernels.batchnorm``.
Every function takes the statistics as fp32 (fp64 for fp64 inputs) and the batch mean as the
exact pair ``mean + mean_lo``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .._layout import View3, as_view3, like, tile

if _backend.HAS_TRITON:
    import triton
    import triton.language as tl

    from .bn_kernels import (_bn_apply_kernel, _bn_bwd_apply_kernel, _bn_bwd_reduce_kernel,
                             _bn_combine_kernel, _bn_stats_kernel, _bn_update_running_kernel,
                             _sum_rows_kernel)


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
