"""Triton-fused normalization kernels (BatchNorm, BatchNorm+ReLU, LayerNorm, RMSNorm).

``TRITON_INTERPRET=1`` is read when this package is first imported (Triton decides then whether
kernels are compiled or interpreted). Without CUDA and outside the interpreter every op falls back
to torch and warns once.
"""
from __future__ import annotations

from ._backend import INTERPRET, backend_name
from .batchnorm import (TritonBatchNorm1d, TritonBatchNorm2d, TritonBatchNorm3d,
                               TritonBatchNormReLU1d, TritonBatchNormReLU2d, TritonSyncBatchNorm,
                               batch_stats)
from .convert import convert_to_triton
from .layernorm import TritonChannelLayerNorm, TritonLayerNorm, TritonRMSNorm, layer_norm

__all__ = [
    "INTERPRET", "backend_name", "batch_stats", "convert_to_triton", "layer_norm",
    "TritonBatchNorm1d", "TritonBatchNorm2d", "TritonBatchNorm3d", "TritonBatchNormReLU1d",
    "TritonBatchNormReLU2d", "TritonSyncBatchNorm", "TritonChannelLayerNorm", "TritonLayerNorm", "TritonRMSNorm",
]
