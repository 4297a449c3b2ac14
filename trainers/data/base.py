"""In-memory tensor data modules: the common base of every built-in data set.

Why tensors in memory: the built-in sets are small, and exact full-batch gradient descent needs
deterministic, index-addressable access to the whole training set. Batches are gathered with one
index operation instead of per-sample collation, which keeps the data loader off the critical path:
in a single process the sampler yields whole slices of the epoch's permutation (one tensor index
per batch, no per-sample Python iteration); under DDP (and ``overfit_batches``) Lightning must
re-shard or replace a per-sample sampler, so those keep :class:`EpochSeededSampler`.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from shiftlab.trainers.data.label_noise import corrupt_labels


@dataclass
class TensorSplit(Dataset):
    """One split held as tensors. For the training split, ``y`` are the labels as given (noisy
    when ``label_noise > 0``), ``y_true`` the clean ones and ``corrupted`` marks changed samples."""

    x: torch.Tensor
    y: torch.Tensor
    y_true: torch.Tensor | None = None
    corrupted: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int | torch.Tensor):
        """One sample, or (``i`` a tensor of indices) one whole batch."""
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]


def collate_batch(batch):
    """The dataset already returns a whole batch ``(x, y)``; nothing left to collate."""
    return batch


class EpochSeededSampler(Sampler[int]):
    """Random permutation that depends only on ``(seed, epoch)``.

    Why: a resumed run must see the same data order as an uninterrupted one; torch's default
    RandomSampler draws from the global RNG, whose state a checkpoint does not restore. Lightning
    calls ``set_epoch`` on samplers that have it.
    """

    def __init__(self, n: int, seed: int, skip: tuple[int, int] | None = None) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self.skip = skip  # (epoch, samples): resume mid-epoch without repeating seen samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.n, self.seed, self.epoch).tolist()
        if self.skip is not None and self.skip[0] == self.epoch:
            order = order[self.skip[1]:]
        self.skip = None
        return iter(order)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of ``epoch``: a permutation that depends only on ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


class EpochSeededBatches(Sampler[torch.Tensor]):
    """The batches :class:`EpochSeededSampler` + ``DataLoader(batch_size=...)`` would form, each
    yielded at once as a slice of the epoch's permutation (used with ``batch_size=None``).

    Why: the per-sample path pulls every index through Python before one gather; here a batch
    costs one slice. Same order, same batches (last one short), same mid-epoch skip.

    With ``group > 1`` (``module.steps_per_call``) it yields tuples of up to ``group`` consecutive
    batches (the same batches in the same order; the epoch's last tuple may be shorter, and after a
    mid-epoch skip the tuples start at the first batch not yet seen).
    """

    def __init__(self, n: int, batch_size: int, seed: int, skip: tuple[int, int] | None = None,
                 group: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0
        self.skip = skip  # (epoch, samples), as EpochSeededSampler
        self.group = int(group)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.n / self.batch_size) / self.group)

    def __iter__(self) -> Iterator[torch.Tensor]:
        # A generator: the order is drawn at the first batch, not when the iterator is made.
        # Lightning may make it before ``set_epoch`` (a resumed run does); the per-sample path
        # is lazy the same way through DataLoader's BatchSampler.
        order = epoch_order(self.n, self.seed, self.epoch)
        if self.skip is not None and self.skip[0] == self.epoch:
            order = order[self.skip[1]:]
        self.skip = None
        batches = order.split(self.batch_size)
        if self.group == 1:
            yield from batches
        else:
            for i in range(0, len(batches), self.group):
                yield batches[i:i + self.group]


class BatchGroups(Dataset):
    """A split read by :class:`EpochSeededBatches` with ``group > 1``: one item is a list of
    ``(x, y)`` batches, one per index tensor of the tuple."""

    def __init__(self, split: TensorSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, group: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.split[idx] for idx in group]


class TensorDataModule(L.LightningDataModule, abc.ABC):
    """Base for data sets that fit in memory as tensors.

    Subclasses implement :meth:`load` returning ``(x, y)`` for the pool that is split into
    train/val (and test, unless :meth:`load` also returns a fixed test set as ``x_test, y_test``).

    Args:
        batch_size: mini-batch size (set from the ``batching`` group).
        label_noise: fraction of training labels replaced by a different, random class.
        val_fraction / test_fraction: held-out fractions of the pool (stratified by nothing,
            seeded shuffle).
        train_fraction: keep only this fraction of the training split (learning curves).
        seed: seeds the split and the label noise (the root ``seed``).
        standardize: scale features with the training split's mean / std.
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).
    """

    name = "tensor"

    def __init__(self, batch_size: int = 128, label_noise: float = 0.0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, train_fraction: float = 1.0, seed: int = 0,
                 standardize: bool = True, num_workers: int = 0, eval_batch_size: int = 1024
                 ) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.label_noise = float(label_noise)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.train_fraction = float(train_fraction)
        self.seed = int(seed)
        self.standardize = standardize
        self.num_workers = int(num_workers)
        self.full_batch = False  # set by the batching regime: one loader item per epoch
        self.train_set: TensorSplit | None = None
        self.val_set: TensorSplit | None = None
        self.test_set: TensorSplit | None = None
        self.num_classes: int = 0
        self.input_shape: tuple[int, ...] = ()
        self._skip: tuple[int, int] | None = None

    # -- to implement -------------------------------------------------------------------------
    @abc.abstractmethod
    def load(self) -> tuple:
        """Return ``(x, y)`` or ``(x, y, x_test, y_test)`` as tensors (float x, long y)."""

    # -- splitting ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        loaded = self.load()
        x, y = loaded[0], loaded[1]
        rng = np.random.default_rng(self.seed)
        perm = torch.from_numpy(rng.permutation(x.shape[0]))
        x, y = x[perm], y[perm]
        n = x.shape[0]
        if len(loaded) == 4:
            x_test, y_test = loaded[2], loaded[3]
            n_test = 0
        else:
            n_test = int(round(self.test_fraction * n))
            x_test, y_test = x[:n_test], y[:n_test]
        n_val = int(round(self.val_fraction * n))
        x_val, y_val = x[n_test:n_test + n_val], y[n_test:n_test + n_val]
        x_tr, y_tr = x[n_test + n_val:], y[n_test + n_val:]
        if self.train_fraction < 1.0:
            keep = max(1, int(round(self.train_fraction * x_tr.shape[0])))
            x_tr, y_tr = x_tr[:keep], y_tr[:keep]
        if self.standardize and x_tr.is_floating_point():
            mean = x_tr.mean(dim=0, keepdim=True)
            std = x_tr.std(dim=0, keepdim=True)
            # A feature (pixel) constant on the training split is only centred: dividing by its
            # ~0 std would blow up the few val/test samples where it is not constant.
            std = torch.where(std < 1e-3, torch.ones_like(std), std)
            x_tr, x_val, x_test = ((t - mean) / std for t in (x_tr, x_val, x_test))
        self.num_classes = int(self.num_classes or int(torch.cat([y_tr, y_val, y_test]).max()) + 1)
        noisy, corrupted = corrupt_labels(y_tr, self.label_noise, self.num_classes, self.seed + 1)
        self.train_set = TensorSplit(x_tr.contiguous(), noisy, y_true=y_tr, corrupted=corrupted)
        self.val_set = TensorSplit(x_val.contiguous(), y_val)
        self.test_set = TensorSplit(x_test.contiguous(), y_test)
        self.input_shape = tuple(x_tr.shape[1:])

    # -- loaders ------------------------------------------------------------------------------
    def skip_train_batches(self, epoch: int, batches: int) -> None:
        """Resume mid-epoch: the next training pass of ``epoch`` starts after ``batches`` batches
        (called when a mid-epoch checkpoint is restored, before the loader is built)."""
        self._skip = (int(epoch), int(batches) * self.batch_size)

    def _loader(self, split: TensorSplit, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = None
        if shuffle:
            sampler = EpochSeededSampler(len(split), self.seed, skip=self._skip)
            self._skip = None
        return DataLoader(split, batch_size=batch_size, sampler=sampler, shuffle=False,
                          collate_fn=collate_batch, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def _per_sample_sampler_needed(self) -> bool:
        """Lightning re-shards (DDP) or replaces (``overfit_batches``) a per-sample sampler."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and (trainer.world_size > 1 or bool(trainer.overfit_batches))

    def train_dataloader(self) -> DataLoader:
        if self.full_batch:  # the module walks the whole training set itself, once per epoch
            return DataLoader([torch.zeros(1)], batch_size=1)
        if self.num_workers or self._per_sample_sampler_needed():
            return self._loader(self.train_set, self.batch_size, shuffle=True)
        group = self._steps_per_call()
        batches = EpochSeededBatches(len(self.train_set), self.batch_size, self.seed, skip=self._skip, group=group)
        self._skip = None
        data = self.train_set if group == 1 else BatchGroups(self.train_set)
        return DataLoader(data, batch_size=None, sampler=batches, collate_fn=collate_batch)

    def _steps_per_call(self) -> int:
        """Batches per loader item: the attached module's ``steps_per_call`` (its ``training_step``
        takes that many steps per call; refused with workers, DDP and overfit_batches)."""
        trainer = getattr(self, "trainer", None)
        return int(getattr(getattr(trainer, "lightning_module", None), "steps_per_call", 1) or 1)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def describe(self) -> dict:
        return {"name": self.name, "train": len(self.train_set), "val": len(self.val_set),
                "test": len(self.test_set), "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "label_noise": self.label_noise,
                "corrupted": int(self.train_set.corrupted.sum())}
