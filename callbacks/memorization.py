"""Memorization curves (Zhang et al. 2017): fit on clean vs label-corrupted training samples.

Why: with label noise the training accuracy mixes two different things, learning the signal on
the clean samples and memorizing the wrong labels of the corrupted ones. Splitting them, and
scoring the corrupted samples against both the label they were *given* and their *true* label,
shows when a network starts to memorize (given-label accuracy on corrupted samples rises while
their true-label accuracy falls).

Logged keys (``mem/`` prefix), each over the training split (or a fixed subset of it):

* ``clean_acc``, ``clean_loss``: clean samples (given label == true label);
* ``corrupt_acc_given``, ``corrupt_loss_given``: corrupted samples against their noisy label
  (memorization; chance is ``1/num_classes``);
* ``corrupt_acc_true``, ``corrupt_loss_true``: corrupted samples against the true label
  (how much the right answer survives);
* ``frac_corrupted`` (share of corrupted samples in the probed set).

Corrupted-sample keys are skipped when there are none (``data.label_noise=0``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftlab.callbacks.probe import Probe
from shiftlab.callbacks.probe_utils import check_positive_int, eval_mode, fixed_subset, probe_model, train_split

__all__ = ["memorization_metrics", "predict_logits", "MemorizationMonitor"]


def memorization_metrics(
    logits: Tensor, y: Tensor, y_true: Tensor, corrupted: Tensor
) -> dict[str, float]:
    """Accuracy and mean cross-entropy on clean / corrupted samples, vs given and true labels.

    Args:
        logits: ``(N, C)`` model outputs.
        y: ``(N,)`` labels as given for training (noisy).
        y_true: ``(N,)`` labels before corruption.
        corrupted: ``(N,)`` bool, True where label noise changed the label.
    """
    n = logits.shape[0]
    if not (y.shape == y_true.shape == corrupted.shape == (n,)):
        raise ValueError(
            "logits (N, C), y, y_true and corrupted (N,) must agree in N; got "
            f"{tuple(logits.shape)}, {tuple(y.shape)}, {tuple(y_true.shape)}, {tuple(corrupted.shape)}"
        )
    corrupted = corrupted.bool()
    if bool((y[~corrupted] != y_true[~corrupted]).any()):
        raise ValueError("samples marked clean (corrupted=False) have y != y_true")
    logits = logits.detach().float()
    pred = logits.argmax(1)
    loss_given = F.cross_entropy(logits, y, reduction="none")
    loss_true = F.cross_entropy(logits, y_true, reduction="none")
    hit_given = (pred == y).float()
    hit_true = (pred == y_true).float()
    clean = ~corrupted
    out: dict[str, float] = {"frac_corrupted": float(corrupted.float().mean()) if n else 0.0}
    if bool(clean.any()):
        out["clean_acc"] = float(hit_given[clean].mean())
        out["clean_loss"] = float(loss_given[clean].mean())
    if bool(corrupted.any()):
        out["corrupt_acc_given"] = float(hit_given[corrupted].mean())
        out["corrupt_loss_given"] = float(loss_given[corrupted].mean())
        out["corrupt_acc_true"] = float(hit_true[corrupted].mean())
        out["corrupt_loss_true"] = float(loss_true[corrupted].mean())
    return out


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, chunk_size: int = 1024) -> Tensor:
    """Eval-mode logits of ``model`` on ``x`` in chunks, on the model's device, returned on CPU."""
    device = next(model.parameters()).device
    with eval_mode(model):
        outs = [model(x[i : i + chunk_size].to(device)).float().cpu() for i in range(0, len(x), chunk_size)]
    return torch.cat(outs) if outs else torch.empty(0)


class MemorizationMonitor(Probe):
    """Log the clean / corrupted split of training accuracy and loss (see the module docstring).

    Args:
        every_n_epochs: probe after every ``every_n_epochs``-th training epoch and after the last.
        max_samples: probe a fixed random subset of this many training samples (``None``/0: all).
        chunk_size: evaluation chunk size (memory only; results do not depend on it).
        seed: seed of the fixed subset (identical on every rank).

    Needs ``trainer.datamodule.train_set`` with ``.x``, ``.y``, ``.y_true`` and ``.corrupted``.
    Scheduling, cost, summary and resume: :class:`~shiftlab.callbacks.probe.Probe`.
    """

    name = "memorization"

    def __init__(self, every_n_epochs: int = 1, max_samples: int | None = None, chunk_size: int = 1024,
                 seed: int = 0) -> None:
        super().__init__(every_n_epochs=check_positive_int("every_n_epochs", every_n_epochs), log_prefix="mem")
        self.max_samples = None if not max_samples else check_positive_int("max_samples", max_samples)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.seed = seed

    def measure(self, trainer: Any, pl_module: Any, batch: Any = None) -> dict[str, float]:
        split = train_split(trainer)
        for attr in ("y_true", "corrupted"):
            if getattr(split, attr, None) is None:
                raise RuntimeError(f"MemorizationMonitor needs train_set.{attr}; none found")
        idx = fixed_subset(len(split.x), self.max_samples, self.seed)
        logits = predict_logits(probe_model(pl_module), split.x[idx], self.chunk_size)
        return memorization_metrics(logits, split.y[idx].cpu(), split.y_true[idx].cpu(), split.corrupted[idx].cpu())
