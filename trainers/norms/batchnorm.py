"""Plain BatchNorm (Ioffe & Szegedy 2015), torch's own layers."""
from __future__ import annotations

from torch import nn

from trainers.norms import register_norm

_BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@register_norm("batchnorm")
def build(num_features: int, dims: int, eps: float = 1e-5, momentum: float | None = 0.1,
          affine: bool = True, track_running_stats: bool = True) -> nn.Module:
    return _BN[dims](num_features, eps=eps, momentum=momentum, affine=affine,
                     track_running_stats=track_running_stats)
