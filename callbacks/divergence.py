"""Stop a diverging run cleanly, before a NaN/inf model can overwrite the last good checkpoint."""
from __future__ import annotations

import math

import lightning as L
import torch


class DivergenceError(RuntimeError):
    """Raised to end a run whose training loss stopped being finite."""


class DivergenceGuard(L.Callback):
    """Checks the training loss after every optimizer step.

    Raising (rather than setting ``trainer.should_stop``) ends the run before the epoch's
    validation and checkpoint hooks, so ``checkpoints/last.ckpt`` keeps the last finite model. All
    DDP ranks take the same decision.

    Args:
        check_every: check every this many training batches.
    """

    def __init__(self, check_every: int = 1) -> None:
        self.check_every = check_every
        self.stop_reason: str | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if batch_idx % self.check_every:
            return
        loss = getattr(pl_module, "last_loss", None)
        if loss is None:
            return
        value = float(loss.detach().float().cpu()) if isinstance(loss, torch.Tensor) else float(loss)
        bad = not math.isfinite(value)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self.stop_reason = (f"diverged: training loss became {value} at epoch {trainer.current_epoch}, "
                                f"step {trainer.global_step}; last good checkpoint kept")
            raise DivergenceError(self.stop_reason)
