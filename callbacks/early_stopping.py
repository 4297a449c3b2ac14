"""Early stopping for shiftlab runs: one Lightning callback, configured (not subclassed) with a
stopping rule by name.

Why one class: every rule needs the same plumbing -- read the monitored value once per
validation, agree across DDP ranks, keep the best weights, survive a resume, explain itself -- and
a replay of the same rule over the same curve must give the same decision. The rules themselves
(plain objects, a registry, ``replay``) live in :mod:`shiftlab.callbacks.stopping_rules`; the
configs ``callbacks=curvature_stop | patience_stop | gl_stop | pq_stop | up_stop`` all name
:class:`RuleEarlyStopping` with ``rule: <name>`` and that rule's arguments, as Lightning's
``EarlyStopping`` is configured rather than subclassed.

Timing: the validation value is read at ``on_validation_end`` and the decision is taken at
``on_train_epoch_end``, where the epoch's training metric (``train_monitor``, needed by ``pq``) is
final and before :class:`~lightning.pytorch.callbacks.ModelCheckpoint` saves, so a checkpoint
holds the decision state of the epoch it was written after. One "epoch" of a rule is one
validation run.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from shiftlab.callbacks.reporting import Reporter
# The rule API, re-exported: `from shiftlab.callbacks.early_stopping import make_rule` (the
# module's former content) keeps working.
from shiftlab.callbacks.stopping_rules import RULES, StoppingRule, make_rule, replay, training_progress

__all__ = ["RuleEarlyStopping", "LEGACY_KEY_CLASS", "StoppingRule", "make_rule", "replay",
           "training_progress", "RULES"]

# Checkpoints name a callback's state by its ``state_key``. The five per-rule subclasses that this
# class replaced wrote ``<ClassName>{'rule': ..., 'monitor': ..., 'mode': ...}``; the key keeps
# that form (the class a config of that rule used to name) so those checkpoints resume with their
# callback state, and :meth:`RuleEarlyStopping.on_load_checkpoint` also accepts the other names.
LEGACY_KEY_CLASS = {"patience": "PatienceStopping", "gl": "GLStopping", "pq": "PQStopping",
                    "up": "UPStopping"}
_DEFAULT_KEY_CLASS = "CurvatureEarlyStopping"  # curvature_stop, with any rule=<name>
_OLD_CLASSES = ("CurvatureEarlyStopping", "PatienceStopping", "GLStopping", "PQStopping",
                "UPStopping", "RuleEarlyStopping")


def _to_float(v: Any) -> float | None:
    if v is None:
        return None
    return float(v.detach().cpu()) if isinstance(v, torch.Tensor) else float(v)


def _rule_arguments(cls: type) -> list[str] | None:
    """The keyword arguments a rule class takes, following ``**kwargs`` up its bases (None: it
    takes anything)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        names += [p for p, v in params.items() if p != "self" and v.kind is v.KEYWORD_ONLY
                  or p != "self" and v.kind is v.POSITIONAL_OR_KEYWORD]
        if not any(v.kind is v.VAR_KEYWORD for v in params.values()):
            return list(dict.fromkeys(names))
    return None


def _build_rule(name: str, mode: str, kwargs: dict[str, Any]) -> StoppingRule:
    """``make_rule`` with the callback's own one-line error for an argument the rule does not take."""
    allowed = _rule_arguments(RULES.get(name)) if name in RULES else None
    unknown = [] if allowed is None else [k for k in kwargs if k not in allowed]
    if unknown:
        raise ValueError(f"{unknown[0]}={kwargs[unknown[0]]!r} is not allowed for rule={name}; "
                         f"allowed: {', '.join(a for a in allowed if a != 'mode')}")
    return make_rule(name, mode=mode, **kwargs)


class RuleEarlyStopping(Callback, Reporter):
    """Stop training when a stopping rule fires; restore the rule's best epoch.

    Args:
        rule: a registered rule name (:func:`shiftlab.callbacks.stopping_rules.make_rule`):
            ``curvature`` (default) | ``quadratic`` | ``se_slope`` | ``forecast`` | ``learned`` |
            ``patience`` | ``gl`` | ``pq`` | ``up``, or one registered by the user.
        monitor: metric read from ``trainer.callback_metrics`` after each validation.
        mode: ``min`` or ``max`` (what 'better' means for ``monitor``).
        train_monitor: training metric read at the end of each epoch (``pq`` needs it; the
            ``curvature`` / ``learned`` rules use it as evidence; others only record it).
        se_monitor: the standard error of ``monitor`` (``val/loss_se``, logged by the
            classification module); passed to the rule when logged, else the rule estimates the
            noise from the curve itself.
        warmup: validation epochs before any decision (the best epoch is tracked meanwhile);
            None: the rule's default.
        restore_best_weights: load the weights of the rule's best epoch when training ends
            (a CPU copy is taken whenever the best epoch changes).
        keep_best_in_checkpoint: also store that copy in the callback's checkpoint state, so a
            resumed run can still restore weights from before the resume.
        log_diagnostics: log the rule's per-epoch numbers under ``<log_prefix>/<name>``: for
            ``curvature`` the probability of a further gain ``p_continue`` and the forecast
            (``forecast_min`` with ``forecast_lo`` / ``forecast_hi``, ``epochs_left``,
            ``p_improve``); for ``patience`` the wait; for ``gl`` / ``pq`` / ``up`` their
            statistics. The stop reason quotes them.
        log_prefix: prefix of those keys.
        verbose: print the stop reason on rank 0.
        **rule_kwargs: the rule's own arguments, e.g. ``patience`` / ``min_delta`` (patience),
            ``alpha`` (gl, pq), ``k`` (pq, up), ``s`` (up), ``p_stop`` / ``confirm`` (curvature,
            learned, forecast). A None value means the rule's default; an argument the rule
            does not take is an error naming the ones it does.

    Every rank takes rank 0's numbers before the rule sees them, so under DDP every rank's rule
    state and decision are equal.
    """

    def __init__(self, rule: str = "curvature", monitor: str = "val/loss", mode: str = "min",
                 train_monitor: str | None = "train/loss", se_monitor: str | None = "val/loss_se",
                 warmup: int | None = None,
                 restore_best_weights: bool = True, keep_best_in_checkpoint: bool = True,
                 log_diagnostics: bool = True, log_prefix: str = "early_stop",
                 verbose: bool = True, **rule_kwargs: Any) -> None:
        super().__init__()
        rule_kwargs = {k: v for k, v in rule_kwargs.items() if v is not None}
        if warmup is not None:
            rule_kwargs["warmup"] = warmup
        self.rule_name = rule
        self.rule: StoppingRule = _build_rule(rule, mode, rule_kwargs)
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

    # ---------------------------------------------------------------- checkpoint key
    def _key_kwargs(self) -> dict[str, str]:
        return {"rule": self.rule_name, "monitor": self.monitor, "mode": self.mode}

    @property
    def state_key(self) -> str:
        """Stable across the move to one class: the key the former per-rule class wrote."""
        cls = LEGACY_KEY_CLASS.get(self.rule_name, _DEFAULT_KEY_CLASS)
        return f"{cls}{self._key_kwargs()!r}"

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Find this callback's state under any former class name (runs before
        :meth:`load_state_dict`, which Lightning then calls with the aliased state)."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        for cls in _OLD_CLASSES:
            old = f"{cls}{self._key_kwargs()!r}"
            if old in states:
                states[self.state_key] = states[old]
                return

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
