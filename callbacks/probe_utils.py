"""Small helpers shared by the probes (:class:`shiftlab.callbacks.probe.Probe` and its subclasses).

Why: every probe evaluates the model on a fixed piece of the *training* set at epoch end, in eval
mode, without touching ``.grad`` (the full-batch regime accumulates gradients there) and without
disturbing the training RNG. Keeping that in one place keeps the probes consistent.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def probe_model(pl_module: nn.Module) -> nn.Module:
    """The network a LightningModule wraps (``module.model``), else the module itself."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def loss_of(pl_module: Any) -> Callable:
    """The module's training loss (``pl_module.loss_fn``), else cross-entropy."""
    return getattr(pl_module, "loss_fn", None) or F.cross_entropy


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


def train_split_or_batch(trainer: Any) -> Any:
    """:func:`train_split`, or (no ``TensorSplit`` train set) the first training batch as ``.x``/``.y``."""
    dm = getattr(trainer, "datamodule", None)
    split = getattr(dm, "train_set", None) if dm is not None else None
    if split is not None and hasattr(split, "x"):
        return split
    x, y = next(iter(trainer.train_dataloader))[:2]
    return SimpleNamespace(x=x, y=y)


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


SUBSETS = ("first", "random")


def probe_indices(n: int, size: int | None, seed: int, subset: str = "random") -> Tensor:
    """The fixed probe subset of ``range(n)``: the first ``size`` indices, or a random draw seeded by
    ``seed`` (:func:`fixed_subset`); the same on every call and every rank (all if None/0)."""
    if subset not in SUBSETS:
        raise ValueError(f"subset={subset!r} is unknown; allowed: {', '.join(SUBSETS)}")
    if subset == "first":
        return torch.arange(min(n, size) if size else n)
    return fixed_subset(n, size, seed)


def rank0_value(trainer: Any, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the value itself outside DDP), so ranks decide alike."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and getattr(trainer, "world_size", 1) > 1:
        return strategy.broadcast(value, src=0)
    return value


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

