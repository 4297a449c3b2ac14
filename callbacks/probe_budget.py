"""One cost budget for all the probes of a run (``probes.max_overhead`` in configs/train.yaml).

Why one budget: each probe's own ``max_overhead`` bounds that probe alone, so a run with sharpness, gradient
tests and memorization probes could still spend several times its training time measuring. This callback
measures the training time of the fit (wall time minus every probe's seconds) and the probes' total; a probe
asks :meth:`ProbeBudget.allows` before a scheduled measurement and is skipped while running it would take the
total over ``max_overhead`` x training time. The first measurement of each probe and the final epoch's are not
skipped (the ends of training are always measured). ``summary.json`` gets ``probe_cost/total_s`` and
``probe_cost/overhead`` (probe seconds per training second); each probe logs its own ``probe_cost/<name>_s``
and, where it measures several quantities, the seconds of each.
"""
from __future__ import annotations

import math
import time
from typing import Any

import lightning as L

from shiftlab.callbacks.reporting import Reporter

__all__ = ["ProbeBudget", "budget_of"]


class ProbeBudget(L.Callback, Reporter):
    """The run's probe budget.

    Args:
        max_overhead: probe seconds allowed per second of training, all probes together (``None``: measure
            the total, enforce nothing).
    """

    def __init__(self, max_overhead: float | None = None) -> None:
        if max_overhead is not None and not float(max_overhead) > 0:
            raise ValueError(f"probes.max_overhead={max_overhead} is not allowed; allowed: a number > 0 or null")
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        self._probes: list[Any] = []
        self._fit_start: float | None = None
        self._elapsed = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._probes = [cb for cb in trainer.callbacks if cb is not self and hasattr(cb, "cost_s")]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter() - self._elapsed

    def spent(self) -> float:
        """Seconds all probes have spent so far (resumed runs included)."""
        return float(sum(p.cost_s for p in self._probes))

    def train_seconds(self) -> float:
        if self._fit_start is None:
            return 0.0
        return max(time.perf_counter() - self._fit_start - self.spent(), 0.0)

    def allows(self, next_cost: float | None) -> bool:
        """Whether a measurement expected to cost ``next_cost`` seconds fits (None: unknown yet, allowed)."""
        if self.max_overhead is None or next_cost is None:
            return True
        return self.spent() + next_cost <= self.max_overhead * self.train_seconds()

    def summary_items(self) -> dict[str, Any]:
        if not self._probes:
            return {}
        train_s = self.train_seconds()
        return {"probe_cost/total_s": round(self.spent(), 3),
                "probe_cost/overhead": round(self.spent() / train_s, 4) if train_s > 0 else math.nan,
                "probe_cost/max_overhead": self.max_overhead}

    def state_dict(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self._fit_start if self._fit_start is not None else self._elapsed
        return {"elapsed": elapsed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._elapsed = float(state_dict.get("elapsed", 0.0))


def budget_of(trainer: Any) -> ProbeBudget | None:
    """The run's :class:`ProbeBudget`, if the trainer has one."""
    return next((cb for cb in getattr(trainer, "callbacks", ()) if isinstance(cb, ProbeBudget)), None)
