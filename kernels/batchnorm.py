"""BatchNorm (+ residual add, + ReLU) modules on the Triton ops: drop-in ``nn.BatchNorm*d`` twins.

Thin modules only: the kernels, launchers, ``torch.library`` ops and the sync autograd Function
are in ``shiftlab.kernels.ops`` (``ops.batchnorm``, ``ops.sync_batchnorm``, ``ops.stats_merge``).
``batch_stats``, ``batch_stats_split`` and ``merge_stats`` are re-exported for existing imports.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .ops.batchnorm import _reduced_count, batch_stats, batch_stats_split
from .ops.stats_merge import merge_stats
from .ops.sync_batchnorm import SyncBatchNormFunction

__all__ = ["TritonBatchNorm1d", "TritonBatchNorm2d", "TritonBatchNorm3d", "TritonBatchNormReLU1d",
           "TritonBatchNormReLU2d", "TritonSyncBatchNorm", "StatsObserver", "batch_stats",
           "batch_stats_split", "merge_stats"]

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
            y, mean, var, total = SyncBatchNormFunction.apply(x, w, b, residual, self.eps,
                                                             self.fuse_relu, self.process_group)
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
