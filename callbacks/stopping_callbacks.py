"""Lightning callbacks over the stopping rules of :mod:`shiftlab.callbacks.early_stopping`.

Why one base class: every rule needs the same plumbing (read the monitored value once per
validation, agree across DDP ranks, keep the best weights, survive a resume, explain itself),
and a replay of the same rule over the same curve must give the same decision.

Timing: the validation value is read at ``on_validation_end`` and the decision is taken at
``on_train_epoch_end``, where the epoch's training metric (``train_monitor``, needed by ``pq``) is
final and before :class:`~lightning.pytorch.callbacks.ModelCheckpoint` saves, so a checkpoint
holds the decision state of the epoch it was written after. One "epoch" of a rule is one
validation run.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from shiftlab.callbacks.early_stopping import StoppingRule, make_rule
from shiftlab.callbacks.reporting import Reporter

__all__ = ["RuleEarlyStopping", "CurvatureEarlyStopping", "PatienceStopping", "GLStopping",
           "PQStopping", "UPStopping"]


def _to_float(v: Any) -> float | None:
    if v is None:
        return None
    return float(v.detach().cpu()) if isinstance(v, torch.Tensor) else float(v)


class RuleEarlyStopping(Callback, Reporter):
    """Stop training when a stopping rule fires.

    Args:
        rule: ``curvature`` | ``quadratic`` | ``se_slope`` | ``forecast`` | ``learned`` |
            ``patience`` | ``gl`` | ``pq`` | ``up``.
        monitor: metric read from ``trainer.callback_metrics`` after each validation.
        mode: ``min`` or ``max`` (what 'better' means for ``monitor``).
        train_monitor: training metric read at the end of each epoch (``pq`` needs it; the
            ``curvature`` / ``learned`` rules use it as evidence; others only record it).
        se_monitor: the standard error of ``monitor`` (``val/loss_se``, logged by the
            classification module); passed to the rule when logged, else the rule estimates the
            noise from the curve itself.
        warmup: validation epochs before any decision (the best epoch is tracked meanwhile).
        restore_best_weights: load the weights of the rule's best epoch when training ends
            (a CPU copy is taken whenever the best epoch changes).
        keep_best_in_checkpoint: also store that copy in the callback's checkpoint state, so a
            resumed run can still restore weights from before the resume.
        log_diagnostics: log the rule's per-epoch numbers (for ``curvature``: smoothed value,
            slope, curvature, slope's standard error, remaining improvement) under
            ``<log_prefix>/<name>``.
        verbose: print the stop reason on rank 0.
        rule_kwargs: further arguments of the rule (see :func:`shiftlab.callbacks.early_stopping.make_rule`).
    """

    def __init__(self, rule: str = "curvature", monitor: str = "val/loss", mode: str = "min",
                 train_monitor: str | None = "train/loss", se_monitor: str | None = "val/loss_se",
                 warmup: int | None = None,
                 restore_best_weights: bool = True, keep_best_in_checkpoint: bool = True,
                 log_diagnostics: bool = True, log_prefix: str = "early_stop",
                 verbose: bool = True, **rule_kwargs: Any) -> None:
        super().__init__()
        if warmup is not None:
            rule_kwargs["warmup"] = warmup
        self.rule_name = rule
        self.rule: StoppingRule = make_rule(rule, mode=mode, **rule_kwargs)
        self.monitor, self.mode, self.train_monitor = monitor, mode, train_monitor
        self.se_monitor = se_monitor
        self.restore_best_weights = restore_best_weights
        self.keep_best_in_checkpoint = keep_best_in_checkpoint
        self.log_diagnostics, self.log_prefix, self.verbose = log_diagnostics, log_prefix, verbose
        self.stop_reason: str | None = None
        self.stopped_epoch: int | None = None  # trainer epoch after which training stopped
        self.restored_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_trainer_epoch: int | None = None
        self._pending: tuple[float, float | None, float | None] | None = None
        self._epoch_map: list[int] = []  # rule epoch -> trainer epoch

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rule=self.rule_name, monitor=self.monitor, mode=self.mode)

    # ---------------------------------------------------------------- reading values
    def _read(self, trainer: L.Trainer, key: str | None) -> float | None:
        if key is None:
            return None
        return _to_float(trainer.callback_metrics.get(key))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or self.rule.stopped:
            return
        value = self._read(trainer, self.monitor)
        if value is None:
            keys = ", ".join(sorted(trainer.callback_metrics)) or "none"
            raise KeyError(f"{type(self).__name__}: monitor={self.monitor!r} was not logged; "
                           f"available: {keys}")
        self._pending = (value, self._read(trainer, self.train_monitor),
                         self._read(trainer, self.se_monitor))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A checkpoint written at validation end (validation not every epoch) may carry a value
        # whose epoch-end decision never ran; take it now so the resumed decision matches.
        if self._pending is not None:
            self._step(trainer, pl_module, epoch=trainer.current_epoch - 1, log=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        train_now = self._read(trainer, self.train_monitor)
        if train_now is not None:
            self._pending = (self._pending[0], train_now, self._pending[2])
        self._step(trainer, pl_module, epoch=trainer.current_epoch, log=True)

    # ---------------------------------------------------------------- the decision
    def _step(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int, log: bool) -> None:
        value, train, se = self._pending
        self._pending = None
        # Every rank takes rank 0's numbers, so every rank's rule state -- and decision -- is equal.
        value, train, se = trainer.strategy.broadcast((value, train, se), src=0)
        if self.rule.needs_train and train is None:
            raise KeyError(f"{type(self).__name__}: rule={self.rule_name!r} needs "
                           f"train_monitor={self.train_monitor!r}, which was not logged")
        before = self.rule.best_epoch
        stop = self.rule.update(value, train, se)
        self._epoch_map.append(epoch)
        if self.rule.best_epoch != before or self.best_state is None:
            self.best_trainer_epoch = self._epoch_map[self.rule.best_epoch]
            if self.restore_best_weights and self.rule.best_epoch == self.rule.epoch:
                self.best_state = {k: v.detach().to("cpu", copy=True)
                                   for k, v in pl_module.state_dict().items()}
        if log and self.log_diagnostics:
            for k, v in self.rule.diagnostics().items():
                if v is not None and math.isfinite(v):
                    pl_module.log(f"{self.log_prefix}/{k}", float(v), on_step=False, on_epoch=True)
        if stop:
            self.stopped_epoch = epoch
            self.stop_reason = (f"{self.rule_name} rule on {self.monitor} stopped after epoch "
                                f"{epoch}: {self.rule.reason}; best epoch {self.best_trainer_epoch}")
            trainer.should_stop = True
            if self.verbose and trainer.is_global_zero:
                print(self.stop_reason)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.restore_best_weights and self.best_state is not None:
            pl_module.load_state_dict(self.best_state)
            self.restored_epoch = self.best_trainer_epoch

    # ---------------------------------------------------------------- reporting
    def summary_items(self) -> dict[str, Any]:
        r = self.rule
        return {"early_stopping": {
            "rule": self.rule_name, "monitor": self.monitor, "mode": self.mode,
            "stopped": r.stopped, "stopped_epoch": self.stopped_epoch,
            "best_epoch": self.best_trainer_epoch,
            "best_value": None if r.best_epoch < 0 else r.values[r.best_epoch],
            "restored_epoch": self.restored_epoch, "reason": r.reason,
            "last_diagnostics": {k: v for k, v in r.diagnostics().items()
                                 if v is not None and math.isfinite(v)} if r.epoch >= 0 else {},
        }}

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        state = {"rule": copy.deepcopy(self.rule.state_dict()), "pending": self._pending,
                 "epoch_map": list(self._epoch_map), "stopped_epoch": self.stopped_epoch,
                 "stop_reason": self.stop_reason, "best_trainer_epoch": self.best_trainer_epoch}
        if self.keep_best_in_checkpoint and self.best_state is not None:
            state["best_state"] = self.best_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rule.load_state_dict(copy.deepcopy(state_dict["rule"]))
        pending = state_dict.get("pending")
        if pending is not None and len(pending) == 2:  # checkpoints from before val/loss_se
            pending = (*pending, None)
        self._pending = None if pending is None else tuple(pending)
        self._epoch_map = list(state_dict.get("epoch_map", []))
        self.stopped_epoch = state_dict.get("stopped_epoch")
        self.stop_reason = state_dict.get("stop_reason")
        self.best_trainer_epoch = state_dict.get("best_trainer_epoch")
        if "best_state" in state_dict:
            self.best_state = state_dict["best_state"]


class CurvatureEarlyStopping(RuleEarlyStopping):
    """shiftlab's default rule as a callback (``callbacks=curvature_stop``).

    Reads ``val/loss``, its standard error ``val/loss_se`` (when logged) and ``train/loss`` each
    epoch and stops when the rule's probability of a further gain (by ``LEARNED_DELTA``) falls
    below ``p_stop`` for ``confirm`` epochs (:class:`shiftlab.callbacks.early_stopping.CurvatureRule`, which documents the
    evidence). Logs ``early_stop/p_continue`` and the forecast -- ``forecast_min`` with the
    interval ``forecast_lo`` / ``forecast_hi``, ``epochs_left``, ``p_improve`` -- every epoch;
    the stop reason quotes them. Arguments left at None take the rule's tuned defaults;
    ``rule`` picks another rule by name (``quadratic``, ``se_slope``, ``forecast``, ``learned``,
    ...) with its own keyword arguments.
    """

    def __init__(self, monitor: str = "val/loss", mode: str = "min", rule: str = "curvature",
                 p_stop: float | None = None, confirm: int | None = None,
                 warmup: int | None = None, **kwargs: Any) -> None:
        given = {"p_stop": p_stop, "confirm": confirm}
        rule_kw = {k: v for k, v in given.items() if v is not None}
        super().__init__(rule, monitor=monitor, mode=mode, warmup=warmup, **rule_kw, **kwargs)


class PatienceStopping(RuleEarlyStopping):
    """Patience baseline (``callbacks=patience_stop``): stop after ``patience`` validation
    epochs without an improvement larger than ``min_delta``."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min", patience: int = 10,
                 min_delta: float = 0.0, **kwargs: Any) -> None:
        super().__init__("patience", monitor=monitor, mode=mode, patience=patience,
                         min_delta=min_delta, **kwargs)


class GLStopping(RuleEarlyStopping):
    """Prechelt's GL_alpha (``callbacks=gl_stop``): stop when ``100 (E_va/E_opt - 1) > alpha``."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min", alpha: float = 5.0,
                 **kwargs: Any) -> None:
        super().__init__("gl", monitor=monitor, mode=mode, alpha=alpha, **kwargs)


class PQStopping(RuleEarlyStopping):
    """Prechelt's PQ_alpha (``callbacks=pq_stop``): at strip ends (every ``k`` epochs) stop when
    ``GL / P_k > alpha``; ``P_k`` from ``train_monitor``."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min", alpha: float = 0.5,
                 k: int = 5, **kwargs: Any) -> None:
        super().__init__("pq", monitor=monitor, mode=mode, alpha=alpha, k=k, **kwargs)


class UPStopping(RuleEarlyStopping):
    """Prechelt's UP_s (``callbacks=up_stop``): stop when ``monitor`` worsened at the end of ``s``
    successive strips of ``k`` epochs."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min", s: int = 3, k: int = 5,
                 **kwargs: Any) -> None:
        super().__init__("up", monitor=monitor, mode=mode, s=s, k=k, **kwargs)
