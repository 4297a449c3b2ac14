"""Callbacks used only by tests, referenced from configs as ``helpers_callbacks.<Name>``."""
from __future__ import annotations

import lightning as L
import torch


class PoisonWeightsAt(L.Callback):
    """Turns the first parameter into NaN at the start of epoch ``epoch`` (simulated divergence)."""

    def __init__(self, epoch: int = 2) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


class StopAfterEpoch(L.Callback):
    """Simulates an interruption: stops the fit loop after epoch ``epoch`` (checkpoints intact)."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class SignalAt(L.Callback):
    """Sends ``signum`` to this process after training batch ``batch`` of epoch ``epoch`` (a real
    signal through the real handler, as a scheduler's preemption or a Ctrl-C would)."""

    def __init__(self, epoch: int = 1, batch: int = 3, signum: int = 15) -> None:
        self.epoch, self.batch, self.signum = epoch, batch, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import os

        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)
