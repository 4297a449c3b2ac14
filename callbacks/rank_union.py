"""The gradient tests of a DDP step: reductions over the union of the ranks' batches.

Why: a DDP optimizer step uses the mean gradient of every rank's batch together, so the statistics
of "the batch the step is about to use" are those of the union. Each rank forms the per-example
gradients of its own examples only; what the statistics need of the union is a few sums over
parameters (mean gradient, mean squared element: one all-reduce each, the size of the gradient
DDP already reduces) and, per example, the squared norm and the inner product with the union's
mean gradient (all-gathered: two numbers per example). No per-example gradient leaves its rank.
Ranks may hold different numbers of examples (the last batch of an epoch, ``max_examples``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from shiftlab.callbacks import gradient_stats as gs

__all__ = ["is_distributed", "all_sum", "all_cat", "union_moments"]


def is_distributed(trainer: Any) -> bool:
    """Whether the run has several ranks with a process group to reduce over."""
    return (int(getattr(trainer, "world_size", 1)) > 1 and dist.is_available()
            and dist.is_initialized())


def all_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over ranks (a copy; ``t`` is untouched)."""
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def all_cat(t: Tensor) -> Tensor:
    """The ranks' ``t`` concatenated along dim 0 in rank order; lengths may differ."""
    t = t.detach().contiguous()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def union_moments(G: Tensor) -> gs.GradientMoments:
    """:class:`~shiftlab.callbacks.gradient_stats.GradientMoments` of the union of the ranks'
    per-example gradients (``G``: this rank's ``(n_r, P)``), the same on every rank."""
    Gd = G.double()
    n = int(all_sum(torch.tensor([G.shape[0]], device=G.device)).item())
    if n < 2:
        raise ValueError(f"the ranks' batches hold {n} example(s) in all; need >= 2")
    mean = all_sum(Gd.sum(0)) / n
    coord_sq_mean = all_sum(Gd.square().sum(0)) / n
    sq_norms = all_cat(torch.linalg.vector_norm(Gd, dim=1) ** 2)
    dots = all_cat(Gd @ mean)
    return gs.GradientMoments(n, G.shape[1], mean, sq_norms, dots, coord_sq_mean)
