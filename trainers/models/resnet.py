"""CIFAR-style ResNet (He et al. 2016, Sec. 4.2): depth 6n+2 with basic blocks, or ResNet-18."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from shiftlab.trainers.models import default_norm


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out, 2)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = norm(c_out, 2)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm(c_out, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Args:
        depth: 6n+2 (8, 20, 32, 56, ...) for the CIFAR family with widths ``base_width * (1,2,4)``,
            or 18 for the four-stage ResNet-18 (widths ``base_width * (1,2,4,8)``, two blocks each).
        base_width: channels of the first stage (16 for the CIFAR family, 64 for ResNet-18).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 20, base_width: int = 16,
                 norm: Callable[[int, int], nn.Module] = default_norm) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"model=resnet needs (C, H, W) images, got input shape {tuple(input_shape)}")
        if depth == 18:
            stages = [(base_width * m, 2) for m in (1, 2, 4, 8)]
        elif (depth - 2) % 6 == 0 and depth >= 8:
            n = (depth - 2) // 6
            stages = [(base_width * m, n) for m in (1, 2, 4)]
        else:
            raise ValueError(f"model.depth={depth} is not allowed; allowed: 18 or 6n+2 (8, 14, 20, 32, 44, 56, ...)")
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], base_width, 3, padding=1, bias=False),
                                  norm(base_width, 2), nn.ReLU())
        blocks: list[nn.Module] = []
        c_in = base_width
        for i, (c, n) in enumerate(stages):
            for j in range(n):
                blocks.append(BasicBlock(c_in, c, 2 if (j == 0 and i > 0) else 1, norm))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
