"""LayerNorm on the Triton kernels in ``kernels/`` (same options as ``layernorm``).

``over="channels"`` (default here: it is what the row kernel does natively) normalizes each
position over its channels; ``over="all"`` normalizes each sample over channels and positions
with a per-channel affine (``GroupNorm(1, C)`` semantics): the kernel normalizes the flattened
sample and the affine is a separate torch op. ``kernels`` is imported lazily, see triton_bn.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from shiftlab.trainers.norms import register_norm

MODES = ("all", "channels")


class _SampleLayerNorm(nn.Module):
    """Per-sample normalization over all of ``(C, *)`` with a per-channel affine."""

    def __init__(self, num_features: int, eps: float, affine: bool) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        from shiftlab.kernels import layer_norm

        y = layer_norm(x, tuple(x.shape[1:]), None, None, self.eps)
        if self.weight is None:
            return y
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)


@register_norm("triton_ln")
def build(num_features: int, dims: int, eps: float = 1e-5, affine: bool = True,
          over: str = "channels") -> nn.Module:
    from shiftlab.kernels import TritonChannelLayerNorm

    if over not in MODES:
        raise ValueError(f"norm.over={over!r} is invalid; allowed: {', '.join(MODES)}")
    if over == "channels" or dims == 0:
        return TritonChannelLayerNorm(num_features, eps=eps, elementwise_affine=affine)
    return _SampleLayerNorm(num_features, eps, affine)
