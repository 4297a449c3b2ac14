"""Small helpers shared by the batch-regime probes (memorization, sharpness, gradient noise).

Why: every probe evaluates the model on a fixed piece of the *training* set at epoch end, in eval
mode, without touching ``.grad`` (the full-batch regime accumulates gradients there) and without
disturbing the training RNG. Keeping that in one place keeps the probes consistent.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn


def probe_model(pl_module: nn.Module) -> nn.Module:
    """The network a LightningModule wraps (``module.model``), else the module itself."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def train_split(trainer: Any) -> Any:
    """``trainer.datamodule.train_set`` (a ``TensorSplit`` with ``.x``, ``.y``, ...), set up."""
    dm = getattr(trainer, "datamodule", None)
    split = getattr(dm, "train_set", None) if dm is not None else None
    if split is None:
        raise RuntimeError(
            "batch-regime probes need trainer.datamodule.train_set (a TensorSplit with .x/.y); "
            "fit with a TensorDataModule"
        )
    return split


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (fixed BN statistics, no dropout), restoring each submodule."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t


def trainable_params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def fixed_subset(n: int, size: int | None, seed: int) -> Tensor:
    """The same ``size`` indices of ``range(n)`` on every call and every rank (all if None/0)."""
    if not size or size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:size].sort().values


def is_probe_epoch(trainer: Any, every_n_epochs: int) -> bool:
    """True every ``every_n_epochs`` epochs and on the last epoch (so the end is always probed)."""
    epoch = trainer.current_epoch + 1
    if every_n_epochs > 0 and epoch % every_n_epochs == 0:
        return True
    max_epochs = getattr(trainer, "max_epochs", None)
    last = max_epochs is not None and max_epochs > 0 and epoch >= max_epochs
    return bool(last or getattr(trainer, "should_stop", False))


def check_positive_int(name: str, value: int, allow_zero: bool = False) -> int:
    lo = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value

