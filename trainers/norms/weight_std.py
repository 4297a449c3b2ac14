"""Weight Standardization (Qiao et al. 2019) paired with GroupNorm.

Why: standardizing each conv filter (zero mean, unit variance over its fan-in) smooths the loss
landscape and makes batch-independent GroupNorm competitive with BatchNorm at small batches.

``norm=weight_std`` does two things:

* the normalization layer a model asks for is ``nn.GroupNorm`` (``num_groups``, resolved as in
  ``norm=groupnorm``);
* :func:`prepare_model` swaps every ``nn.Conv1d/2d/3d`` of a built model for a weight-standardized
  subclass (same parameters and state_dict keys): declared as this entry's ``prepare_model``
  capability, which ``shiftlab.trainers.build.build_model`` applies to the built model. Linear layers are left alone (WS is
  defined for convolutions), so on an MLP this variant is plain GroupNorm.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from shiftlab.trainers.norms import register_norm
from shiftlab.trainers.norms.groupnorm import resolve_groups


def standardize_weight(w: Tensor, eps: float) -> Tensor:
    """Zero mean, unit variance per output channel over (in_channels, *kernel)."""
    dims = list(range(1, w.dim()))
    var, mean = torch.var_mean(w, dim=dims, keepdim=True, correction=0)
    return (w - mean) * torch.rsqrt(var + eps)


class _WSMixin:
    ws_eps: float

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, standardize_weight(self.weight, self.ws_eps), self.bias)


class WSConv1d(_WSMixin, nn.Conv1d):
    pass


class WSConv2d(_WSMixin, nn.Conv2d):
    pass


class WSConv3d(_WSMixin, nn.Conv3d):
    pass


_WS = {nn.Conv1d: WSConv1d, nn.Conv2d: WSConv2d, nn.Conv3d: WSConv3d}


def _to_ws(conv: nn.Module, eps: float) -> nn.Module:
    conv.__class__ = _WS[type(conv)]  # class swap in place: parameters, hooks, keys unchanged
    conv.ws_eps = eps
    return conv


def prepare_model(model: nn.Module, eps: float = 1e-5) -> nn.Module:
    """Replace every plain ``nn.Conv1d/2d/3d`` in ``model`` (in place) by its WS counterpart."""
    if type(model) in _WS:
        return _to_ws(model, eps)
    for name, child in list(model.named_children()):
        if type(child) in _WS:
            setattr(model, name, _to_ws(child, eps))
        else:
            prepare_model(child, eps)
    return model


@register_norm("weight_std", prepare_model=prepare_model)
def build(num_features: int, dims: int, num_groups: int = 32, eps: float = 1e-5,
          affine: bool = True, strict: bool = False) -> nn.Module:
    return nn.GroupNorm(resolve_groups(num_features, num_groups, strict), num_features, eps=eps, affine=affine)
