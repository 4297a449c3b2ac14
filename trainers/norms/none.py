"""No normalization: the baseline of every covariate-shift comparison."""
from __future__ import annotations

from torch import nn

from shiftlab.trainers.norms import register_norm


@register_norm("none")
def build(num_features: int, dims: int, **_: object) -> nn.Module:
    return nn.Identity()
