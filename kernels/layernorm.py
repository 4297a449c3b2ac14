"""LayerNorm / RMSNorm modules on the Triton ops: drop-in ``nn.LayerNorm`` / ``nn.RMSNorm`` twins.

Thin modules only; kernels, launchers and the ``torch.library`` ops are in
``shiftlab.kernels.ops.layernorm`` (``layer_norm`` is re-exported here for existing imports).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops.layernorm import MAX_FUSED_N, layer_norm

__all__ = ["MAX_FUSED_N", "TritonChannelLayerNorm", "TritonLayerNorm", "TritonRMSNorm", "layer_norm"]


class TritonLayerNorm(nn.LayerNorm):
    """Drop-in ``nn.LayerNorm`` (same constructor and state_dict) on the Triton kernels."""

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, tuple(self.normalized_shape), self.weight, self.bias, self.eps)


class TritonRMSNorm(nn.RMSNorm):
    """Drop-in ``nn.RMSNorm`` on the same kernels (no mean subtraction, no bias)."""

    def forward(self, x: Tensor) -> Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return layer_norm(x, tuple(self.normalized_shape), self.weight, None, eps, rms=True)


class TritonChannelLayerNorm(TritonLayerNorm):
    """``TritonLayerNorm(C)`` over dim 1 of ``(N, C, *)`` (each position over its channels).

    Free of copies for channels-last inputs, where the channel dim is already contiguous.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return super().forward(x)
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)
