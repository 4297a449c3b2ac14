"""Model families. Each takes ``input_shape``, ``num_classes`` and a ``norm`` factory
(``norm(num_features, dims) -> nn.Module``) so every model works with every norm variant."""
from __future__ import annotations

from torch import nn

from shiftlab.trainers.registry import Registry

ACTIVATIONS: Registry[nn.Module] = Registry("activation", key="model.activation")
ACTIVATIONS.register("relu")(nn.ReLU)
ACTIVATIONS.register("sigmoid")(nn.Sigmoid)
ACTIVATIONS.register("tanh")(nn.Tanh)
ACTIVATIONS.register("gelu")(nn.GELU)
ACTIVATIONS.register("identity")(nn.Identity)


def make_activation(name: str) -> nn.Module:
    return ACTIVATIONS.create(name)


def default_norm(num_features: int, dims: int) -> nn.Module:
    return nn.Identity()
