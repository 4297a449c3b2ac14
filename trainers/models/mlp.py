"""Fully connected network: Linear -> norm -> activation per hidden layer."""
from __future__ import annotations

import math
from typing import Callable, Sequence

from torch import nn

from shiftlab.trainers.models import default_norm, make_activation


class MLP(nn.Module):
    """Args:
        input_shape: sample shape; flattened.
        num_classes: output width.
        hidden: widths of the hidden layers (e.g. ``[100, 100, 100]`` for Ioffe & Szegedy 2015).
        activation: ``relu`` | ``sigmoid`` | ``tanh`` | ``gelu`` | ``identity``.
        norm: normalization factory; applied to each hidden pre-activation.
        dropout: dropout after each activation (0 disables).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128, 128),
                 activation: str = "relu", norm: Callable[[int, int], nn.Module] = default_norm,
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), norm(h, 0), make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
