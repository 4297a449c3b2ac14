"""Layer Normalization (Ba, Kiros & Hinton 2016): statistics per sample, over a layer's units.

Why: batch-independent (identical in training and eval) and the usual choice outside vision.
``over="all"`` (default) normalizes each sample over all of a layer's units -- channels *and*
spatial positions -- with a per-channel affine; implemented as ``nn.GroupNorm(1, C)`` because the
spatial size is unknown when the layer is built (on ``(N, C)`` inputs it equals
``nn.LayerNorm(C)``). ``over="channels"`` normalizes each position over channels only
(ConvNeXt style).
"""
from __future__ import annotations

from torch import Tensor, nn

from shiftlab.trainers.norms import register_norm

MODES = ("all", "channels")


class ChannelLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm(C)`` applied over the channel dim (1) of an ``(N, C, *)`` tensor."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return super().forward(x)
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


@register_norm("layernorm")
def build(num_features: int, dims: int, eps: float = 1e-5, affine: bool = True, over: str = "all") -> nn.Module:
    if over not in MODES:
        raise ValueError(f"norm.over={over!r} is invalid; allowed: {', '.join(MODES)}")
    if over == "channels" or dims == 0:
        return ChannelLayerNorm(num_features, eps=eps, elementwise_affine=affine)
    return nn.GroupNorm(1, num_features, eps=eps, affine=affine)
