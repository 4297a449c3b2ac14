"""SyncBatchNorm on the Triton kernels: the autograd Function behind ``TritonSyncBatchNorm``.

Stats phase (local kernels) -> the shared cross-rank merge of ``(count, mean + mean_lo, M2)``
(:mod:`.stats_merge`, the same one the torch-only norms use) -> normalize phase. The backward
reduces ``sum(dy)`` and ``sum(dy * xhat)`` locally, all-reduces them once, and applies ``dx``
with the global count, so uneven per-rank batches are exact.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .batchnorm import _reduced_count, batch_stats_split, bn_apply, bn_backward_apply, bn_backward_reduce
from .stats_merge import merge_across_ranks


class SyncBatchNormFunction(torch.autograd.Function):
    """``(y, mean, var, count)`` of a BatchNorm whose statistics span every rank of ``group``."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, relu, group):  # type: ignore[override]
        mean_l, lo_l, var_l = batch_stats_split(x)
        n_l = float(_reduced_count(x))
        r = merge_across_ranks(n_l, mean_l, lo_l, var_l.double() * n_l, group)
        y = bn_apply(x, r.mean, r.var, weight, bias, residual, eps, relu, r.mean_lo)
        ctx.save_for_backward(x, weight, bias, residual, r.mean, r.var, r.mean_lo)
        ctx.eps, ctx.relu, ctx.group, ctx.total = eps, relu, group, r.count
        ctx.mark_non_differentiable(r.mean, r.var)
        return y, r.mean, r.var, torch.tensor(r.count)

    @staticmethod
    def backward(ctx, dy, _dm, _dv, _dn):  # type: ignore[override]
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
