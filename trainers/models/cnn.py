"""Small CNN, 1-D or 2-D picked by the data's shape.

``(C, L)`` samples (mnist1d) get Conv1d, ``(C, H, W)`` images get Conv2d, flat ``(D,)`` vectors
are treated as a one-channel sequence.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from shiftlab.trainers.models import default_norm, make_activation


class CNN(nn.Module):
    """Args:
        channels: output channels of each conv block (conv -> norm -> activation [-> pool]).
        kernel_size / stride / padding: conv geometry (same for every block).
        pool_every: max-pool by 2 after every ``pool_every`` blocks (0 disables).
        head_hidden: width of the hidden linear layer before the classifier (0: none).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 32, 32),
                 kernel_size: int = 3, stride: int = 1, padding: int | None = None, pool_every: int = 1,
                 activation: str = "relu", norm: Callable[[int, int], nn.Module] = default_norm,
                 head_hidden: int = 0) -> None:
        super().__init__()
        shape = tuple(input_shape)
        self.unflatten = len(shape) == 1
        if self.unflatten:
            shape = (1, shape[0])
        dims = len(shape) - 1
        if dims not in (1, 2):
            raise ValueError(f"model=cnn needs (C, L) or (C, H, W) samples, got input shape {tuple(input_shape)}")
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        pool = nn.MaxPool1d if dims == 1 else nn.MaxPool2d
        pad = kernel_size // 2 if padding is None else padding
        blocks: list[nn.Module] = []
        c_in = shape[0]
        for i, c in enumerate(channels):
            blocks += [conv(c_in, c, kernel_size, stride=stride, padding=pad), norm(c, dims),
                       make_activation(activation)]
            if pool_every and (i + 1) % pool_every == 0:
                blocks.append(pool(2))
            c_in = c
        self.features = nn.Sequential(*blocks)
        with torch.no_grad():
            n_flat = self.features(torch.zeros(2, *shape)).flatten(1).shape[1]
        head: list[nn.Module] = [nn.Flatten()]
        if head_hidden:
            head += [nn.Linear(n_flat, head_hidden), norm(head_hidden, 0), make_activation(activation)]
            n_flat = head_hidden
        head.append(nn.Linear(n_flat, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x):
        if self.unflatten:
            x = x.unsqueeze(1)
        return self.head(self.features(x))
