"""The base class of every stopping rule: best-epoch bookkeeping, warm-up, state.

Why plain objects: the same rule must decide identically inside the Lightning callback
(:class:`shiftlab.callbacks.early_stopping.RuleEarlyStopping`), in a unit test on a hand-made
curve, and in the benchmark that replays thousands of recorded curves. A rule consumes one epoch
at a time (``update(value, train_value, se)``), answers stop / go, and remembers the best epoch
(whose weights a callback restores). No torch, no Trainer.
"""
from __future__ import annotations

import abc
import math
from typing import Any

MODES = ("min", "max")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
    return mode


class StoppingRule(abc.ABC):
    """Base class: best-epoch bookkeeping, warm-up, non-finite check, state (de)serialisation.

    Subclasses implement :meth:`_decide` (called after warm-up with the epoch already recorded)
    returning a stop reason or ``None``.
    """

    name = "base"
    needs_train = False

    def __init__(self, mode: str = "min", warmup: int = 0) -> None:
        self.mode = _check_mode(mode)
        if int(warmup) < 0:
            raise ValueError(f"warmup={warmup} is out of range; allowed: warmup >= 0")
        self.warmup = int(warmup)
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        self.epoch = -1  # index of the last epoch seen
        self.values: list[float] = []
        self.train_values: list[float] = []
        self.se_values: list[float] = []  # nan where no standard error was given
        self.best_value = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = -1
        self.stopped_epoch: int | None = None
        self.reason: str | None = None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same decision after a resume (JSON-friendly)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, list(v) if isinstance(v, (list, tuple)) else v)

    # -- helpers --------------------------------------------------------------------------------
    def _better(self, a: float, b: float, delta: float = 0.0) -> bool:
        """True when ``a`` improves on ``b`` by more than ``delta``."""
        return a < b - delta if self.mode == "min" else a > b + delta

    def _sign(self) -> float:
        """+1 in min mode; -1 in max mode, so ``sign * value`` is always 'lower is better'."""
        return 1.0 if self.mode == "min" else -1.0

    @property
    def stopped(self) -> bool:
        return self.stopped_epoch is not None

    def diagnostics(self) -> dict[str, float]:
        """Per-epoch numbers worth logging (why the rule decided what it did)."""
        return {}

    # -- the step ------------------------------------------------------------------------------
    def update(self, value: float, train_value: float | None = None,
               se: float | None = None) -> bool:
        """Record one epoch (``se``: the monitored value's standard error, when measured);
        return True when training should stop after it."""
        if self.stopped:
            return True
        value = float(value)
        self.epoch += 1
        self.values.append(value)
        self.se_values.append(math.nan if se is None else float(se))
        if train_value is not None:
            self.train_values.append(float(train_value))
        elif self.needs_train:
            raise ValueError(f"rule {self.name!r} needs the training curve; pass train_value")
        if not math.isfinite(value):
            return self._stop(f"monitored value is {value} at epoch {self.epoch}")
        self._track_best(value)
        if self.epoch < self.warmup:
            self._observe()
            return False
        reason = self._decide()
        return self._stop(reason) if reason else False

    def _track_best(self, value: float) -> None:
        """Update the epoch whose weights would be restored (raw arg-best by default)."""
        if self.best_epoch < 0 or self._better(value, self.best_value):
            self.best_value, self.best_epoch = value, self.epoch

    def _observe(self) -> None:
        """Hook for rules that keep running statistics during warm-up too."""

    @abc.abstractmethod
    def _decide(self) -> str | None:
        """The reason to stop after this epoch, or None to go on."""

    def _stop(self, reason: str) -> bool:
        self.stopped_epoch, self.reason = self.epoch, reason
        return True
