"""Plain BatchNorm (Ioffe & Szegedy 2015).

``sync=False`` (default): torch's own ``nn.BatchNorm*d`` (cuDNN / native kernels), each DDP rank
normalizing with its own batch. ``sync=True``: the same parameters and buffers, with the batch
statistics all-reduced across DDP ranks inside the layer (works on CPU/gloo, unlike torch's
``SyncBatchNorm``); identical to ``nn.BatchNorm`` without DDP.
"""
from __future__ import annotations

from torch import nn

from shiftlab.trainers.norms import register_norm
from shiftlab.trainers.norms._bn_common import StatBatchNorm

_BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@register_norm("batchnorm", lightning_sync=True)
def build(num_features: int, dims: int, eps: float = 1e-5, momentum: float | None = 0.1,
          affine: bool = True, track_running_stats: bool = True, sync: bool = False) -> nn.Module:
    if sync:
        return StatBatchNorm(num_features, eps=eps, momentum=momentum, affine=affine,
                             track_running_stats=track_running_stats, sync=True)
    return _BN[dims](num_features, eps=eps, momentum=momentum, affine=affine,
                     track_running_stats=track_running_stats)
