"""MNIST-1D (Greydanus 2020): generated in memory by the ``mnist1d`` package, offline.

Why not ``mnist1d.data.get_dataset``: it writes a pickle into the working directory.
"""
from __future__ import annotations

import functools

import torch

from shiftlab.trainers.data.base import TensorDataModule


@functools.lru_cache(maxsize=4)
def _generate(num_samples: int, seed: int) -> dict:
    """Generation takes ~1.3 s; sweeps run many jobs in one process, so keep the last few."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    return make_dataset(args)


class MNIST1DDataModule(TensorDataModule):
    """4000 train + 1000 test sequences of length 40 (10 classes).

    ``as_sequence=True`` yields ``(N, 1, 40)`` for 1-D CNNs; otherwise flat ``(N, 40)``. The
    package's own train/test split is kept; validation comes out of its training part.
    """

    name = "mnist1d"

    def __init__(self, num_samples: int = 5000, as_sequence: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_samples = int(num_samples)
        self.as_sequence = as_sequence

    def load(self) -> tuple:
        data = _generate(self.num_samples, self.seed)
        x = torch.tensor(data["x"], dtype=torch.float32)
        x_test = torch.tensor(data["x_test"], dtype=torch.float32)
        if self.as_sequence:
            x, x_test = x.unsqueeze(1), x_test.unsqueeze(1)
        self.num_classes = 10
        return (x, torch.tensor(data["y"], dtype=torch.long),
                x_test, torch.tensor(data["y_test"], dtype=torch.long))
