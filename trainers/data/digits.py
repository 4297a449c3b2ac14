"""scikit-learn's bundled 8x8 digits (1797 images, 10 classes): offline, the default data set."""
from __future__ import annotations

import torch

from shiftlab.trainers.data.base import TensorDataModule


class DigitsDataModule(TensorDataModule):
    """Digits as flat 64-vectors (``as_images=False``) or 1x8x8 images for 2-D CNNs."""

    name = "digits"

    def __init__(self, as_images: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.as_images = as_images

    def load(self) -> tuple:
        from sklearn.datasets import load_digits

        ds = load_digits()
        x = torch.tensor(ds.data, dtype=torch.float32) / 16.0
        if self.as_images:
            x = x.view(-1, 1, 8, 8)
        self.num_classes = 10
        return x, torch.tensor(ds.target, dtype=torch.long)
