"""Per-epoch metric history, kept in the checkpoint so a resumed run's curves are complete."""
from __future__ import annotations

from typing import Any

import lightning as L


class EpochHistory(L.Callback):
    """Records every epoch-level metric in ``trainer.callback_metrics`` after each training epoch.

    The run summary and the learning-curve plot read :attr:`history`.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row = {"epoch": trainer.current_epoch}
        for k, v in trainer.callback_metrics.items():
            try:
                row[k] = float(v)
            except (TypeError, ValueError):
                continue
        self.history.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
