"""Report the monitored metric to the running sweep trial each epoch; stop pruned trials cleanly.

Why a callback and not an exception thrown from ``validation_step``: a pruned trial should still
end like any other run (checkpoints, ``metrics.csv``, ``summary.json`` with its stop reason), so the
sweep report can show *why* it ended. The callback asks the trial whether to prune, sets
``trainer.should_stop`` and :attr:`stop_reason`; the sweep driver then tells Optuna the trial was
pruned (raising ``optuna.TrialPruned`` in its objective).

The trial is not a config value (it cannot be serialised), so the sweep driver makes it *active*
with :func:`active_reporter` around ``shiftlab.trainers.train.train(cfg)``; the callback looks it up when it
fires. Outside a sweep (no active reporter) the callback does nothing, so the same config still
runs on a laptop.

Reporters:

* :class:`OptunaReporter` -- ``trial.report(value, epoch)`` + ``trial.should_prune()`` (the
  study's pruner decides).
* :class:`RayTuneReporter` -- ``ray.tune.report`` each epoch; Ray Tune's scheduler stops a trial
  that should not go on (Tune ends the training thread at the next report).

DDP: only global rank 0 talks to the trial; its decision is broadcast so every rank stops at the
same epoch.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Protocol

import lightning as L
from shiftlab.callbacks.reporting import Reporter

log = logging.getLogger("shiftlab")

__all__ = ["TrialReporter", "OptunaReporter", "RayTuneReporter", "active_reporter", "current_reporter",
           "OptunaPruning"]


class TrialReporter(Protocol):
    """What the callback needs from a sweep trial."""

    pruner_name: str
    pruned: bool
    reason: str | None
    history: list[tuple[int, float]]

    def report(self, value: float, step: int) -> None: ...

    def should_prune(self) -> bool: ...


class OptunaReporter:
    """Reports to an ``optuna.Trial``; the study's pruner decides."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.pruner_name = type(trial.study.pruner).__name__
        self.pruned = False
        self.reason: str | None = None
        self.history: list[tuple[int, float]] = []

    def report(self, value: float, step: int) -> None:
        self.trial.report(value, step)
        self.history.append((step, value))

    def should_prune(self) -> bool:
        return bool(self.trial.should_prune())


class RayTuneReporter:
    """Reports to Ray Tune; Tune's scheduler stops the trial (the worker is ended at a report).

    ``key`` is the result key the Tune scheduler and search algorithm watch: metric names such as
    ``val/acc`` are not used as Tune keys because Tune splits nested result keys on ``/``.
    """

    def __init__(self, key: str = "objective", scheduler_name: str = "Ray Tune scheduler") -> None:
        self.key = key
        self.pruner_name = scheduler_name
        self.pruned = False
        self.reason: str | None = None
        self.history: list[tuple[int, float]] = []

    def report(self, value: float, step: int) -> None:
        from ray import tune

        self.history.append((step, value))
        try:
            tune.report({self.key: value, "epoch": step})
        except SystemExit:
            # Tune asked this trial to stop (scheduler decision): end training cleanly instead.
            self.pruned = True

    def should_prune(self) -> bool:
        return self.pruned


_ACTIVE: list[TrialReporter] = []


@contextlib.contextmanager
def active_reporter(reporter: TrialReporter) -> Iterator[TrialReporter]:
    """Make ``reporter`` the one :class:`OptunaPruning` callbacks report to while the block runs."""
    _ACTIVE.append(reporter)
    try:
        yield reporter
    finally:
        _ACTIVE.remove(reporter)


def current_reporter() -> TrialReporter | None:
    """The innermost active reporter, or ``None`` outside a sweep trial."""
    return _ACTIVE[-1] if _ACTIVE else None


class OptunaPruning(L.Callback, Reporter):
    """Report ``monitor`` after every validation epoch to the active sweep trial; stop if pruned.

    Args:
        monitor: metric logged by the module each epoch (``val/acc``, ``val/loss``, ...). The sweep
            driver sets it to the config's ``optimized_metric``.
        strict: raise if ``monitor`` is missing from the logged metrics (a typo would otherwise
            silently disable pruning).
        reporter: report to this object instead of the active one (tests, custom drivers).

    After a prune, :attr:`stop_reason` is e.g. ``"pruned by MedianPruner at epoch 3 (val/acc=0.41)"``
    and :attr:`pruned` is ``True``; both go into ``summary.json`` via :meth:`summary_items`.
    """

    def __init__(self, monitor: str = "val/acc", strict: bool = True, reporter: TrialReporter | None = None) -> None:
        super().__init__()
        self.monitor = monitor
        self.strict = strict
        self._reporter = reporter
        self.pruned = False
        self.pruned_epoch: int | None = None
        self.stop_reason: str | None = None
        self.reported = 0

    @property
    def reporter(self) -> TrialReporter | None:
        return self._reporter if self._reporter is not None else current_reporter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.pruned:
            return
        reporter = self.reporter
        if reporter is None:
            return
        value = self._monitored_value(trainer)
        epoch = int(trainer.current_epoch)
        prune = False
        if trainer.is_global_zero and value is not None and math.isfinite(value):
            reporter.report(value, epoch)
            self.reported += 1
            prune = reporter.should_prune()
        prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            self.pruned, self.pruned_epoch = True, epoch
            shown = "n/a" if value is None else f"{value:.4g}"
            self.stop_reason = f"pruned by {reporter.pruner_name} at epoch {epoch} ({self.monitor}={shown})"
            reporter.pruned, reporter.reason = True, self.stop_reason
            trainer.should_stop = True
            log.info(self.stop_reason)

    def _monitored_value(self, trainer: L.Trainer) -> float | None:
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            if self.strict:
                known = ", ".join(sorted(metrics)) or "none yet"
                raise KeyError(f"OptunaPruning: monitor={self.monitor!r} was not logged; logged metrics: {known}")
            return None
        return float(metrics[self.monitor])

    def summary_items(self) -> dict[str, Any]:
        return {"sweep/pruned": self.pruned, "sweep/pruned_epoch": self.pruned_epoch,
                "sweep/reported_epochs": self.reported}

    def state_dict(self) -> dict[str, Any]:
        return {"pruned": self.pruned, "pruned_epoch": self.pruned_epoch, "stop_reason": self.stop_reason,
                "reported": self.reported}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned = bool(state_dict.get("pruned", False))
        self.pruned_epoch = state_dict.get("pruned_epoch")
        self.stop_reason = state_dict.get("stop_reason")
        self.reported = int(state_dict.get("reported", 0))
