"""Synthetic classification sets whose difficulty is set by config.

``kind=clusters``: Gaussian class clusters (separation controls the Bayes error).
``kind=teacher``: labels are the argmax of a random two-layer teacher network on Gaussian inputs.
"""
from __future__ import annotations

import torch

from shiftlab.trainers.data.base import TensorDataModule

KINDS = ("clusters", "teacher")


class SyntheticDataModule(TensorDataModule):
    name = "synthetic"

    def __init__(self, kind: str = "clusters", num_samples: int = 2000, dim: int = 20,
                 num_classes: int = 4, separation: float = 2.0, teacher_width: int = 32,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if kind not in KINDS:
            raise ValueError(f"data.kind={kind!r} is unknown; allowed: {', '.join(KINDS)}")
        self.kind, self.n, self.dim = kind, int(num_samples), int(dim)
        self.k, self.separation, self.teacher_width = int(num_classes), float(separation), int(teacher_width)

    def load(self) -> tuple:
        g = torch.Generator().manual_seed(self.seed + 12345)
        self.num_classes = self.k
        if self.kind == "clusters":
            centers = torch.randn(self.k, self.dim, generator=g)
            centers = self.separation * centers / centers.norm(dim=1, keepdim=True)
            y = torch.randint(0, self.k, (self.n,), generator=g)
            x = centers[y] + torch.randn(self.n, self.dim, generator=g) * 0.5
            return x, y
        w1 = torch.randn(self.dim, self.teacher_width, generator=g) / self.dim ** 0.5
        w2 = torch.randn(self.teacher_width, self.k, generator=g) / self.teacher_width ** 0.5
        x = torch.randn(self.n, self.dim, generator=g)
        y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
        return x, y
