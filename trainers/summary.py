"""What a finished run writes besides checkpoints: ``summary.json`` and ``plots/``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.nn import functional as F

from shiftlab.callbacks import reporting
from shiftlab.trainers.plots import plot_confusion_matrix, plot_learning_curves


def stop_reason(trainer: L.Trainer, status: str, error: str | None) -> str:
    """The error, else the first stop reason a reporting callback set, else why the loop ended."""
    if error:
        return error
    reason = reporting.stop_reason(trainer.callbacks)
    if reason:
        return reason
    if trainer.interrupted:
        return "interrupted"
    if trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs:
        return f"max_epochs={trainer.max_epochs} reached"
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return f"max_steps={trainer.max_steps} reached"
    return "stopped by a callback" if trainer.should_stop else status


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                   chunk: int = 4096) -> dict[str, float]:
    """Loss and accuracy of ``model`` (eval mode) on a whole split, in the model's own dtype
    (float64 under ``precision=64-true``; mixed precision models keep float32 weights and are
    evaluated in float32, outside autocast)."""
    from shiftlab.trainers.full_batch import as_model_input

    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for s in range(0, x.shape[0], chunk):
        xb, yb = as_model_input(model, x[s:s + chunk], device), y[s:s + chunk].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    n = max(1, x.shape[0])
    return {"loss": loss_sum / n, "acc": correct / n}


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def build_summary(trainer: L.Trainer, module: L.LightningModule, dm, history: list[dict], status: str,
                  error: str | None, wall_time: float, test_metrics: dict | None,
                  train_metrics: dict | None = None) -> dict[str, Any]:
    last = history[-1] if history else {}
    summary: dict[str, Any] = {
        "status": status,
        "stop_reason": stop_reason(trainer, status, error),
        "epochs_run": len(history),
        "global_step": trainer.global_step,
        "wall_time_s": round(wall_time, 3),
        "train/loss_epoch_mean": last.get("train/loss"),
        "train/acc_epoch_mean": last.get("train/acc"),
        "val/loss": last.get("val/loss"),
        "val/acc": last.get("val/acc"),
    }
    if status == "completed" and train_metrics:
        summary.update(train_metrics)
    if test_metrics:
        summary.update({f"test/{k}": v for k, v in test_metrics.items() if k != "confusion_matrix"})
        summary["test/confusion_matrix"] = test_metrics.get("confusion_matrix")
    summary.update(reporting.summary_items(trainer.callbacks))
    if hasattr(dm, "describe") and dm.train_set is not None:
        summary["data"] = dm.describe()
    return {k: _finite(v) for k, v in summary.items()}


def write_summary(out: Path, summary: dict) -> None:
    """``summary.json``, replaced atomically (a failed write keeps the previous file)."""
    from shiftlab.trainers.checkpoint_io import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))


def write_outputs(out: Path, summary: dict, history: list[dict], title: str, note: str | None = None) -> None:
    write_summary(out, summary)
    if history:
        plot_learning_curves(history, out / "plots" / "learning_curves.png", title=title, note=note)
    cm = summary.get("test/confusion_matrix")
    if cm:
        plot_confusion_matrix(cm, out / "plots" / "confusion_matrix.png")
