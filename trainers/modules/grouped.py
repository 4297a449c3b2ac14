"""Several optimizer steps per ``training_step`` call (``module.steps_per_call``): the loop-state
bookkeeping and what cannot run that way.

Why a checkpoint is always written in batches: Lightning counts loader items (here groups of up to N
batches) in the fit loop's ``batch_progress``, and a run resumed with another N, or from a
``launcher=stacked`` member (written as a plain N = 1 run), must find the same count. The module
converts the counters on save (groups -> batches) and on load (batches -> the resuming run's groups);
the optimizer-step counts (``global_step``) are steps under every N and need nothing.
"""
from __future__ import annotations

import math
from typing import Any

import lightning as L

from shiftlab.trainers.config_checks import GROUPED_TRAINER_OPTIONS, ConfigError

_BATCH_PROGRESS = "epoch_loop.batch_progress"
_COUNTERS = ("ready", "started", "processed", "completed")


def shift_batch_progress(fit_loop: dict[str, Any], processed: int, total_processed: int | None = None) -> None:
    """Rewrite the fit loop's ``batch_progress`` (in place) so that the current epoch's ``processed``
    count becomes ``processed`` (and the run's, ``total_processed``; None: the totals move with the
    current counts); the other counters of each part keep their offsets from ``processed``.

    Why offsets: Lightning reads the counters' differences (``ready`` vs ``completed`` tell where in
    a step the checkpoint was written) and the current epoch's ``ready`` count (where the epoch
    resumes); the totals only feed ``total_batch_idx``, which a run with N > 1 does not use
    (``check_val_every_n_epoch=null`` is refused)."""
    progress = fit_loop.get(_BATCH_PROGRESS)
    if not isinstance(progress, dict) or "current" not in progress:
        return
    delta = int(processed) - int(progress["current"].get("processed", 0))
    for part in ("current", "total"):
        counts = progress.get(part) or {}
        if part == "total" and total_processed is not None:
            delta = int(total_processed) - int(counts.get("processed", 0))
        for key in _COUNTERS:
            if key in counts:
                counts[key] = int(counts[key]) + delta


def groups_done(batches_done: int, batches_per_epoch: int, steps_per_call: int) -> int:
    """Loader items of an epoch counted as done when ``batches_done`` of its batches are: the epoch's
    item count minus the groups its remaining batches form (they are grouped from the resume point)."""
    items = math.ceil(batches_per_epoch / steps_per_call)
    return items - math.ceil(max(batches_per_epoch - batches_done, 0) / steps_per_call)


def per_step_hook_reason(callback: L.Callback) -> str | None:
    """Why ``callback`` cannot run with several steps per ``training_step`` call, or None.

    It sees the loader item's ``on_train_batch_start`` / ``on_train_batch_end`` once per group (with
    the group as ``batch``) while the backward and optimizer-step hooks still run per step. Allowed:
    callbacks without those hooks; progress bars, learning-rate and device-stats monitors and
    ``Timer`` (they only report or stop later: at the group's end); epoch-wise ``ModelCheckpoint``;
    the run contract (it stops at the group's end, see the module's docstring); the divergence guard
    (it checks every step's loss, :attr:`TaskModule.step_losses`); probes with ``every_n_steps=0``.
    Refused: step probes, the gradient tests (they read each batch whatever their period), step-wise or timed checkpoints and any other per-batch callback, unless it
    declares ``grouped_steps_ok = True`` (it reads the loader item as given: a list of ``(x, y)``
    batches, once per group)."""
    from lightning.pytorch.callbacks import (DeviceStatsMonitor, LearningRateMonitor, ModelCheckpoint,
                                             ProgressBar, Timer)

    from shiftlab.callbacks.divergence import DivergenceGuard
    from shiftlab.callbacks.probe import Probe
    from shiftlab.callbacks.run_contract import RunContract

    cls = type(callback)
    if getattr(callback, "grouped_steps_ok", False) or not any(
            getattr(cls, hook) is not getattr(L.Callback, hook) for hook in ("on_train_batch_start", "on_train_batch_end")):
        return None
    name = cls.__name__
    steps = getattr(callback, "every_n_steps", None)
    if isinstance(callback, ModelCheckpoint):
        if callback._every_n_train_steps or callback._train_time_interval is not None:
            return f"{name} with every_n_train_steps / train_time_interval: it would save at a group's end"
        return None
    if isinstance(callback, (ProgressBar, LearningRateMonitor, DeviceStatsMonitor, Timer, RunContract,
                             DivergenceGuard)):
        return None
    if isinstance(callback, Probe):  # its batch hook acts only on a step schedule
        return None if not steps else f"{name} with every_n_steps={steps}: a step probe needs each step's batch"
    return f"{name}: it reads each training batch (on_train_batch_start / on_train_batch_end)"


def check_grouped_fit(trainer: L.Trainer, steps_per_call: int) -> None:
    """Refuse, before the first step, what cannot run with ``steps_per_call > 1`` that the config
    checks cannot see: several processes and callbacks added in code (one line, a ConfigError)."""
    head = f"module.steps_per_call={steps_per_call} is not allowed"
    for key, ok in GROUPED_TRAINER_OPTIONS.items():
        if not ok(getattr(trainer, key)):
            raise ConfigError(f"{head} with trainer.{key}={getattr(trainer, key)} (Lightning counts it in loader "
                              f"items, or runs it in the automatic loop only); allowed: 1")
    if trainer.world_size > 1:
        raise ConfigError(f"{head} under DDP (world size {trainer.world_size}: each rank would step its own "
                          "groups); allowed: 1")
    for cb in trainer.callbacks:
        reason = per_step_hook_reason(cb)
        if reason:
            raise ConfigError(f"{head} with callback {reason}; allowed: 1")
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and not hasattr(dm, "skip_train_batches"):
        raise ConfigError(f"{head} with data module {type(dm).__name__}: only shiftlab's in-memory data "
                          "modules group batches; allowed: 1")
