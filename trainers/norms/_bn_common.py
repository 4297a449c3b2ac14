"""Shared base of the BatchNorm-family variants, with statistics synced across DDP ranks in-layer.

Why a base of our own: torch's ``SyncBatchNorm`` refuses CPU tensors (so no gloo runs) and
``nn.SyncBatchNorm.convert_sync_batchnorm`` silently replaces *subclasses* of ``_BatchNorm``
with plain ``SyncBatchNorm``, dropping whatever a variant changes. Do not combine these layers
with Lightning's ``sync_batchnorm=True``: they already sync themselves.

:class:`StatBatchNorm` owns exactly the parameters and buffers of ``nn.BatchNorm*d``
(``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), so state
dicts load both ways with ``strict=True``.

DDP sync (training mode, ``torch.distributed`` initialised, world size > 1, ``sync=True``): each
rank computes its two-pass ``(count, mean + mean_lo, M2)`` and hands it to the cross-rank merge
that the Triton ``SyncBatchNorm`` uses too (``shiftlab.kernels.ops.stats_merge``: one fp64
all-gather and a fixed-order exact merge forward, one all-reduce of the statistics' gradient
backward). Uneven per-rank batches are weighted by their counts; single-process training uses
the native ``F.batch_norm``. Importing the merge loads neither Triton nor the kernels.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from shiftlab.kernels.ops.stats_merge import synced_moments as merged_moments


def reduce_dims(x: Tensor) -> list[int]:
    """Dimensions BN reduces over: batch and spatial, everything but channels (dim 1)."""
    return [0] + list(range(2, x.dim()))


def channel_view(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-channel vector ``(C,)`` to broadcast against ``x`` ``(N, C, *)``."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def distributed_world(group=None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def synced_moments(x: Tensor, group=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Global per-channel ``(mean, mean_lo, var, count)`` over every rank's ``x``.

    The mean is the pair ``mean + mean_lo``; differentiable w.r.t. ``x`` through this rank's
    mean and M2 (see ``stats_merge.synced_moments``)."""
    mean, var, n = local_moments(x)
    with torch.no_grad():  # what the working dtype rounded off the local mean
        lo = (x.to(mean.dtype) - channel_view(mean, x)).mean(reduce_dims(x))
    return merged_moments(mean, lo, var * n, float(n), group)


def local_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased variance (two-pass) and count of this process's batch."""
    dims = reduce_dims(x)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    var, mean = torch.var_mean(work, dim=dims, correction=0)
    n = torch.tensor(float(work.numel() // work.shape[1]), dtype=work.dtype, device=work.device)
    return mean, var, n


class StatBatchNorm(_BatchNorm):
    """BatchNorm with torch's parameters/buffers whose batch statistics may be synced in-layer.

    Args:
        num_features: channels ``C`` of an ``(N, C, *)`` input.
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm*d``.
        sync: merge statistics across DDP ranks in training mode (no-op without DDP).
        process_group: group to sync over (default: the world).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, sync: bool = True,
                 process_group=None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.sync = sync
        self.process_group = process_group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__}: expected (N, C, *) input, got shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sync={self.sync}"

    # --- pieces the variants reuse -------------------------------------------------------------
    def should_sync(self) -> bool:
        return self.training and self.sync and distributed_world(self.process_group) > 1

    def momentum_factor(self) -> float:
        """Advance ``num_batches_tracked`` (training) and return the running-average factor."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def batch_moments(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, biased variance, count of the (possibly global) training batch."""
        if self.should_sync():
            mean, lo, var, n = synced_moments(x, self.process_group)
            return mean + lo, var, n
        return local_moments(x)

    @torch.no_grad()
    def update_running(self, mean: Tensor, var: Tensor, n: Tensor, factor: float) -> None:
        """torch's convention: EMA of the mean and of the *unbiased* batch variance."""
        if not (self.training and self.track_running_stats):
            return
        count = float(n)
        if count <= 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel when training")
        unbiased = var * (count / (count - 1))
        self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), factor)

    def uses_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def normalize(self, x: Tensor, affine: bool = True) -> Tensor:
        """BN of ``x`` (optionally without the affine part), updating running stats in training."""
        factor = self.momentum_factor()
        w = self.weight if affine else None
        b = self.bias if affine else None
        if not self.should_sync():
            track = not self.training or self.track_running_stats
            return F.batch_norm(x, self.running_mean if track else None,
                                self.running_var if track else None, w, b,
                                self.uses_batch_stats(), factor, self.eps)
        mean, lo, var, n = synced_moments(x, self.process_group)
        self.update_running(mean, var, n, factor)
        centred = (x - channel_view(mean, x).to(x.dtype)) - channel_view(lo, x).to(x.dtype)
        y = centred * channel_view(torch.rsqrt(var + self.eps), x).to(x.dtype)
        if w is not None:
            y = y * channel_view(w, x) + channel_view(b, x)
        return y

    def apply_affine(self, y: Tensor) -> Tensor:
        if self.weight is None:
            return y
        return y * channel_view(self.weight, y) + channel_view(self.bias, y)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        return self.normalize(x)
