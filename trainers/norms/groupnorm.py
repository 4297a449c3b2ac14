"""Group Normalization (Wu & He 2018): statistics per sample over groups of channels.

Why: independent of the batch, so it holds up at tiny batches where BatchNorm degrades.
``num_groups`` (paper default 32) must divide the channel count; with ``strict=False`` (the
default, so every model in shiftlab can use ``norm=groupnorm``) a layer whose width is not
divisible uses the largest divisor of its width that is <= ``num_groups`` instead.
"""
from __future__ import annotations

from torch import nn

from shiftlab.trainers.norms import register_norm


def resolve_groups(num_features: int, num_groups: int, strict: bool) -> int:
    if num_groups < 1:
        raise ValueError(f"norm.num_groups={num_groups} must be >= 1")
    if num_features % num_groups == 0:
        return num_groups
    if strict:
        raise ValueError(f"norm.num_groups={num_groups} does not divide a layer's {num_features} channels "
                         "(set norm.strict=false to use the largest divisor instead)")
    return max(g for g in range(1, min(num_groups, num_features) + 1) if num_features % g == 0)


@register_norm("groupnorm")
def build(num_features: int, dims: int, num_groups: int = 32, eps: float = 1e-5,
          affine: bool = True, strict: bool = False) -> nn.Module:
    return nn.GroupNorm(resolve_groups(num_features, num_groups, strict), num_features, eps=eps, affine=affine)
