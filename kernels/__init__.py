"""Triton-fused normalization kernels (BatchNorm, BatchNorm+ReLU, LayerNorm, RMSNorm).

Two layers, as in Liger-Kernel: ``ops/`` holds the kernels, launchers, ``torch.library`` ops and
autograd Functions; ``batchnorm.py``, ``layernorm.py`` and ``convert.py`` hold the thin modules.

``TRITON_INTERPRET=1`` is read when the kernels are first imported (Triton decides then whether
kernels are compiled or interpreted). The names below are loaded on first access, so importing
``shiftlab.kernels.ops.stats_merge`` (which the torch norms do) loads neither Triton nor the
kernels. Without CUDA and outside the interpreter every op falls back to torch and warns once.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_WHERE = {
    "INTERPRET": "_backend", "backend_name": "_backend",
    "batch_stats": "batchnorm", "TritonBatchNorm1d": "batchnorm", "TritonBatchNorm2d": "batchnorm",
    "TritonBatchNorm3d": "batchnorm", "TritonBatchNormReLU1d": "batchnorm",
    "TritonBatchNormReLU2d": "batchnorm", "TritonSyncBatchNorm": "batchnorm",
    "convert_to_triton": "convert",
    "layer_norm": "layernorm", "TritonChannelLayerNorm": "layernorm", "TritonLayerNorm": "layernorm",
    "TritonRMSNorm": "layernorm",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
