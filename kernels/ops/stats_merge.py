"""The one cross-rank merge of BatchNorm statistics, shared by the Triton and the torch paths.

Why one: the Triton ``SyncBatchNorm`` (``shiftlab.kernels``) and the torch-only variants of
``trainers/norms`` (BatchNorm, Batch Renorm, Noisy BN synced in-layer) must agree on what a
"global batch" is, uneven per-rank batches included. Each rank contributes a row
``(count, mean, M2)`` with its mean given as the exact pair ``mean + mean_lo`` (see
``batch_stats_split``); the rows are all-gathered in fp64 and merged in a fixed rank order
(:func:`merge_stats`), so every rank computes the same bits. The merged mean comes back as an
fp32 pair again, so a mean of 1e4 with a spread of 1e-2 reaches the normalize phase exactly.

:func:`merge_across_ranks` is the plain merge (the Triton path calls it inside its own autograd
Function, whose backward all-reduces the per-channel gradient sums). :func:`synced_moments`
wraps it for the torch path, differentiable with respect to each rank's local mean and M2: its
backward all-reduces the gradient of the merged statistics once, then applies the merge's own
derivative. Only torch here (no Triton import): the norm registry imports this module, and
importing Triton must not happen before a test has chosen the interpreter.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor


def merge_stats(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-rank rows (dim 0) of ``(count, mean, M2)`` into one; fixed order, fp64.

    ``M = sum M2_r + sum n_r (mean_r - mu)^2`` around the merged mean ``mu``: no cancellation,
    exact for uneven counts."""
    count, mean, m2 = count.double(), mean.double(), m2.double()
    n = count.sum(0)
    mu = (count * mean).sum(0) / n.clamp_min(1)
    M2 = m2.sum(0) + (count * (mean - mu) ** 2).sum(0)
    return n, mu, M2


def split_pair(mu: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``mu`` (fp64) as ``hi + lo`` in ``dtype``: ``lo`` is what rounding to ``dtype`` lost."""
    hi = mu.to(dtype)
    return hi, (mu - hi.double()).to(dtype)


class Merged(NamedTuple):
    """Global statistics: ``count`` (a float, equal on every rank), the mean as the pair
    ``mean + mean_lo``, the biased variance, and the fp64 merged mean and this rank's fp64
    mean (what the differentiable wrapper needs)."""

    count: float
    mean: Tensor
    mean_lo: Tensor
    var: Tensor
    mu64: Tensor
    local_mean64: Tensor


def merge_across_ranks(count: float, mean: Tensor, mean_lo: Optional[Tensor], m2: Tensor,
                       group=None) -> Merged:
    """All-gather this rank's ``(count, mean + mean_lo, M2)`` and merge every rank's row.

    Not differentiable by itself. Raises when the ranks hold one value per channel or fewer in
    all (a variance cannot be estimated); every rank raises together, since all see the same
    total."""
    dtype = mean.dtype
    local = mean.double() + (mean_lo.double() if mean_lo is not None else 0.0)
    row = torch.stack([torch.full_like(local, float(count)), local, m2.double()])
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row.contiguous(), group=group)
    g = torch.stack(rows)  # (world, 3, C)
    n, mu, M2 = merge_stats(g[:, 0], g[:, 1], g[:, 2])
    total = float(g[:, 0, 0].sum().item()) if mean.numel() else 0.0
    if total <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {int(total)} "
                         "values per channel over all ranks")
    hi, lo = split_pair(mu, dtype)
    return Merged(total, hi, lo, (M2 / total).to(dtype), mu, local)


class _SyncedMoments(torch.autograd.Function):
    """:func:`merge_across_ranks` with a backward for the torch path.

    Forward: ``mu = sum n_r m_r / N``, ``var = (sum M2_r + sum n_r (m_r - mu)^2) / N``. Every
    rank's loss depends on every rank's row, so the gradients of ``(mu, var)`` are first summed
    over ranks (one all-reduce); then ``dmu/dm_l = n_l / N``, ``dvar/dm_l = 2 n_l (m_l - mu) / N``
    (the ``mu`` term vanishes because ``sum n_r (m_r - mu) = 0``) and ``dvar/dM2_l = 1 / N``."""

    @staticmethod
    def forward(ctx, mean: Tensor, mean_lo: Tensor, m2: Tensor, count: float,  # type: ignore[override]
                group) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r = merge_across_ranks(count, mean, mean_lo, m2, group)
        ctx.save_for_backward(r.mu64, r.local_mean64)
        ctx.count, ctx.total, ctx.group = float(count), r.count, group
        n = torch.tensor(r.count, dtype=mean.dtype, device=mean.device)
        ctx.mark_non_differentiable(r.mean_lo, n)
        return r.mean, r.mean_lo, r.var, n

    @staticmethod
    def backward(ctx, g_mean: Tensor, _g_lo, g_var: Tensor, _g_n):  # type: ignore[override]
        mu, local = ctx.saved_tensors
        C = mu.numel()
        g = torch.cat([g_mean.double(), g_var.double()]).contiguous()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        g_mu, g_v = g[:C], g[C:]
        frac = ctx.count / ctx.total
        d_mean = g_mu * frac + g_v * 2.0 * frac * (local - mu)
        d_m2 = g_v / ctx.total
        return d_mean.to(g_mean.dtype), None, d_m2.to(g_var.dtype), None, None


def synced_moments(mean: Tensor, mean_lo: Tensor, m2: Tensor, count: float,
                   group=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Global ``(mean, mean_lo, var, count)`` from this rank's ``(mean, mean_lo, M2, count)``.

    Differentiable with respect to ``mean`` and ``m2`` (``mean_lo`` is a rounding correction
    and carries no gradient); one all-gather forward, one all-reduce backward."""
    return _SyncedMoments.apply(mean, mean_lo.detach(), m2, float(count), group)
