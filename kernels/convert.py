"""Swap torch's normalization layers in an existing model for the Triton twins, keeping state."""
from __future__ import annotations

import torch
from torch import nn

from .batchnorm import (TritonBatchNorm1d, TritonBatchNorm2d, TritonBatchNorm3d,
                               TritonSyncBatchNorm, _TritonBatchNorm)
from .layernorm import TritonLayerNorm, TritonRMSNorm

_BN = {nn.BatchNorm1d: TritonBatchNorm1d, nn.BatchNorm2d: TritonBatchNorm2d,
       nn.BatchNorm3d: TritonBatchNorm3d}


def _device_dtype(m: nn.Module) -> dict:
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def _swap(m: nn.Module) -> nn.Module | None:
    dd = _device_dtype(m)
    new: nn.Module | None = None
    if isinstance(m, _TritonBatchNorm):
        return None
    if isinstance(m, nn.SyncBatchNorm):
        new = TritonSyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine,
                                  m.track_running_stats, m.process_group, **dd)
    elif type(m) in _BN:
        new = _BN[type(m)](m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **dd)
    elif type(m) is nn.LayerNorm:
        new = TritonLayerNorm(m.normalized_shape, m.eps, m.elementwise_affine,
                              bias=m.bias is not None, **dd)
    elif type(m) is nn.RMSNorm:
        new = TritonRMSNorm(m.normalized_shape, m.eps, m.elementwise_affine, **dd)
    if new is None:
        return None
    new.load_state_dict(m.state_dict())
    new.train(m.training)
    return new


@torch.no_grad()
def convert_to_triton(model: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm{1,2,3}d`` / ``nn.SyncBatchNorm`` / ``nn.LayerNorm`` /
    ``nn.RMSNorm`` in ``model`` (in place, and returned) by its Triton twin with the same state.

    Subclasses of those layers are left alone: they may override ``forward``.
    """
    top = _swap(model)
    if top is not None:
        return top
    for name, child in list(model.named_children()):
        new = _swap(child)
        if new is not None:
            setattr(model, name, new)
        else:
            convert_to_triton(child)
    return model
