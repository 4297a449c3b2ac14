"""The run contract: a signal ends a run at a step boundary with a resumable checkpoint.

Why a callback: SIGINT/SIGTERM arrive at arbitrary points; acting on them only at the end of a
training step (after the optimizer update) gives a checkpoint that resumes *exactly*: the fit
loop's progress, the data order (the sampler skips the batches already seen), the RNG state and
the epoch's running training metrics all travel in it.

Exit codes follow the shell convention (128 + signal): 130 for SIGINT, 143 for SIGTERM.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchmetrics import Metric

from shiftlab.trainers.checkpoint_io import epoch_checkpoint

STATUS_BY_SIGNAL = {signal.SIGINT: "interrupted", signal.SIGTERM: "preempted"}
EXIT_CODES = {"interrupted": 130, "preempted": 143}


class RunInterrupted(Exception):
    """Raised at a step boundary after the resumable checkpoint is written."""

    def __init__(self, status: str, checkpoint: Path | None, epoch: int, step: int) -> None:
        self.status, self.checkpoint, self.epoch, self.step = status, checkpoint, epoch, step
        where = f"resume with ckpt_path={checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(f"{status} by {'SIGINT' if status == 'interrupted' else 'SIGTERM'} at epoch {epoch}, "
                         f"step {step}; {where}")


class RunContract(L.Callback):
    """Turns SIGINT / SIGTERM into a resumable stop, and makes resumes exact.

    Args:
        dirpath: where ``interrupted.ckpt`` (mid-epoch, resumable) is written.
        filename: name of that checkpoint.

    A second SIGINT aborts at once (``KeyboardInterrupt``); the run still writes its summary.
    """

    def __init__(self, dirpath: str | Path, filename: str = "interrupted.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.received: str | None = None
        self._mid_epoch_save = False
        self._pending: dict[str, Any] | None = None

    # ------------------------------------------------------------------ signals
    def _handler(self, signum: int, frame: Any) -> None:
        if self.received == "interrupted" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.received = self.received or STATUS_BY_SIGNAL.get(signum, "interrupted")

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """Install the handlers for the duration of the run (main thread only; elsewhere no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in STATUS_BY_SIGNAL}
        for s in STATUS_BY_SIGNAL:
            signal.signal(s, self._handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ stopping
    def _stop(self, trainer: L.Trainer, save: bool) -> None:
        status = self.received or "interrupted"
        ckpt: Path | None = None
        if save:
            self._mid_epoch_save = True
            try:
                trainer.save_checkpoint(self.path)
                ckpt = self.path
            finally:
                self._mid_epoch_save = False
        else:
            ckpt = epoch_checkpoint(trainer)
        raise RunInterrupted(status, ckpt, trainer.current_epoch, trainer.global_step)

    def _agreed(self, trainer: L.Trainer) -> bool:
        flag = self.received is not None
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
            if flag and self.received is None:
                self.received = "preempted"
        return flag

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._agreed(trainer):
            # The epoch's last batch: the epoch-end checkpoint (last.ckpt) follows; stop there.
            if batch_idx + 1 >= trainer.num_training_batches:
                return
            self._stop(trainer, save=True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A signal during validation or data setup: last.ckpt is the boundary we just crossed.
        if self._agreed(trainer):
            self._stop(trainer, save=False)
        if self._pending and "mid" not in self._pending and self._pending.get("rng") is not None:
            self._restore_rng_at_epoch_start(trainer, self._pending.pop("rng"))

    # ------------------------------------------------------------------ exact resume
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if not self._mid_epoch_save:
            return
        batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        checkpoint["shiftlab_mid_epoch"] = {
            "epoch": trainer.current_epoch,
            "batches_done": int(batches_done),
            "train_metrics": {name: {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                     for k, v in m.metric_state.items()}
                              for name, m in _train_metrics(pl_module)},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(self._pending or {}, rng=state_dict)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        mid = checkpoint.get("shiftlab_mid_epoch")
        if mid:
            self._pending = dict(self._pending or {}, mid=mid)
            dm = trainer.datamodule
            if dm is not None and hasattr(dm, "skip_train_batches"):
                dm.skip_train_batches(mid["epoch"], mid["batches_done"])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
                             ) -> None:
        # Restored here, after the module's on_train_epoch_start has reset its epoch metrics.
        if not self._pending:
            return
        pending, self._pending = self._pending, None
        if pending.get("rng") is not None:
            self._restore_rng(pending["rng"])
        mid = pending.get("mid")
        if mid:
            states = mid.get("train_metrics", {})
            for name, metric in _train_metrics(pl_module):
                for k, v in states.get(name, {}).items():
                    cur = getattr(metric, k)
                    setattr(metric, k, v.to(cur.device) if isinstance(v, torch.Tensor) and
                            isinstance(cur, torch.Tensor) else v)
                metric._update_count = max(1, metric._update_count)


    @classmethod
    def _restore_rng_at_epoch_start(cls, trainer: L.Trainer, rng: dict[str, Any]) -> None:
        """Resuming from an epoch-end checkpoint: the generator as saved, then the draws this epoch's
        training iterator makes from it (DataLoader iterators draw a base seed from the global generator).

        Why: an uninterrupted run creates the epoch's training iterator after ``on_train_epoch_start``,
        from the saved state; a resumed run's iterator was made before the restore, from another state,
        so every later draw (dropout masks) would shift. A throwaway iterator from the restored state
        makes the same draws (single-process loaders only: one with workers would start processes; its
        resumed generator may differ by those draws). A mid-epoch checkpoint was saved after the epoch's
        iterator drew: its state is restored at the first batch."""
        cls._restore_rng(rng)
        loaders = trainer.train_dataloader
        loaders = list(loaders.values()) if isinstance(loaders, dict) else (
            list(loaders) if isinstance(loaders, (list, tuple)) else [loaders])
        for loader in loaders:
            if isinstance(loader, DataLoader) and loader.num_workers == 0:
                iter(loader)

    @staticmethod
    def _restore_rng(rng: dict[str, Any]) -> None:
        torch.set_rng_state(rng["torch_rng"])
        if "cuda_rng" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda_rng"])


def _train_metrics(pl_module: L.LightningModule) -> list[tuple[str, Metric]]:
    """The module's running training metrics: torchmetrics children whose name starts with ``train``."""
    return [(n, m) for n, m in pl_module.named_modules() if isinstance(m, Metric) and n.startswith("train")]

