"""Under-fitting / good fit / over-fitting diagnosis of one run's epoch-wise learning curves.

Why a plain function: the diagnosis is a reading of two lists (train and validation loss per
epoch), so it is testable on hand-made curves and reusable on any recorded history; the callback
only collects the lists, puts the result in ``summary.json`` and draws it on a plot.

Heuristics (all thresholds are arguments):

* curves are smoothed with a trailing moving average of ``window`` epochs (noise in a single
  validation epoch must not flip the label);
* **validation rise**: the smoothed validation loss ends more than ``rise_tol`` (relative) above
  its minimum; the epoch of that minimum is where validation started to rise;
* **generalization gap**: smoothed ``val - train`` loss at the end, its relative size
  ``gap / val`` and its trend (least-squares slope per epoch over the last ``trend_window``);
* **over-fitting**: the validation loss rose. A gap that grows while the validation loss stays flat
  (the training loss falls towards zero, typical of a 98%-accuracy run) is memorization without a
  validation cost: it is named in the line (relative gap above ``gap_tol`` and growing) but is not
  called over-fitting;
* **under-fitting**: not over-fitting and both the training and the validation loss are still falling
  by more than ``improve_tol`` (relative) per epoch at the end (more training would help), or the final
  training accuracy (when given) is below ``underfit_acc``;
* **good fit** otherwise.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback
from shiftlab.callbacks.reporting import Reporter

__all__ = ["Diagnosis", "diagnose", "LearningCurveDiagnosis", "plot_diagnosis"]

LABELS = ("under-fitting", "good fit", "over-fitting")


@dataclass
class Diagnosis:
    label: str
    gap: float  # smoothed val - train loss at the last epoch
    relative_gap: float  # gap / smoothed val loss
    gap_trend: float  # d(gap)/d(epoch) over the last trend_window epochs
    val_rise_epoch: int | None  # epoch of the smoothed validation minimum, if it rose after
    best_val_epoch: int  # arg-min of the raw validation loss
    val_rise: float  # relative rise of the smoothed validation loss above its minimum
    train_slope: float  # relative change of the smoothed train loss per epoch at the end
    line: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _smooth(xs: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _slope(ys: Sequence[float]) -> float:
    n = len(ys)
    if n < 2:
        return 0.0
    mx = (n - 1) / 2
    my = sum(ys) / n
    num = sum((i - mx) * (y - my) for i, y in enumerate(ys))
    den = sum((i - mx) ** 2 for i in range(n))
    return num / den


def diagnose(train_loss: Sequence[float], val_loss: Sequence[float],
             train_acc: Sequence[float] | None = None, window: int = 5,
             trend_window: int | None = None, rise_tol: float = 0.05, gap_tol: float = 0.2,
             improve_tol: float = 0.005, underfit_acc: float | None = None) -> Diagnosis:
    """Diagnose per-epoch train/val loss lists (same length, epoch order)."""
    n = len(val_loss)
    if n == 0 or len(train_loss) != n:
        raise ValueError(f"train_loss ({len(train_loss)}) and val_loss ({n}) must be non-empty "
                         "and of equal length")
    if window < 1:
        raise ValueError(f"window={window} is out of range; allowed: window >= 1")
    tw = trend_window or max(3, n // 5)
    tr, va = _smooth(list(map(float, train_loss)), window), _smooth(list(map(float, val_loss)), window)
    i_min = min(range(n), key=va.__getitem__)
    denom = abs(va[i_min]) or 1.0
    rise = (va[-1] - va[i_min]) / denom
    rose = rise > rise_tol
    gaps = [v - t for v, t in zip(va, tr)]
    gap, gap_trend = gaps[-1], _slope(gaps[-tw:])
    rel_gap = gap / (abs(va[-1]) or 1.0)
    train_slope = _slope(tr[-tw:]) / (abs(tr[-1]) or 1.0)
    val_slope = _slope(va[-tw:]) / (abs(va[-1]) or 1.0)
    best = min(range(n), key=lambda i: val_loss[i])
    if rose:
        label = "over-fitting"
    elif (train_slope < -improve_tol and val_slope < -improve_tol) or (
            underfit_acc is not None and train_acc is not None and train_acc[-1] < underfit_acc):
        label = "under-fitting"
    else:
        label = "good fit"
    trend = "growing" if gap_trend > 0 else "shrinking"
    parts = [f"{label}: gap {gap:.3g} ({100 * rel_gap:.0f}% of val loss, {trend} "
             f"{gap_trend:+.2g}/epoch)"]
    if rose:
        parts.append(f"validation rose {100 * rise:.0f}% after epoch {i_min}")
    else:
        parts.append(f"validation minimum at epoch {best}, no rise")
    if not rose and rel_gap > gap_tol and gap_trend > 0:
        parts.append("the gap grows while validation stays flat (memorization without a validation cost)")
    if label == "under-fitting":
        parts.append(f"train loss still falling {100 * -train_slope:.1f}%/epoch")
    return Diagnosis(label, gap, rel_gap, gap_trend, i_min if rose else None, best, rise,
                     train_slope, "; ".join(parts))


def plot_diagnosis(history: dict[str, list[float]], diag: Diagnosis, path: Path,
                   title: str = "") -> Path:
    """Train vs validation loss with the diagnosis line, the validation minimum and the
    epoch where validation started to rise."""
    import matplotlib.pyplot as plt

    from shiftlab.trainers.plots import MARKERS_UP_TO, save_png, style_epoch_axis, wants_log_scale

    epochs = history["epoch"]
    marker = "o" if len(epochs) <= MARKERS_UP_TO else None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, history["train_loss"], "-", marker=marker, ms=3, label="train")
    ax.plot(epochs, history["val_loss"], "--", marker=marker, ms=3, label="val")
    ax.axvline(epochs[diag.best_val_epoch], color="gray", lw=0.8, ls=":", label="best val")
    if diag.val_rise_epoch is not None:
        ax.axvline(epochs[diag.val_rise_epoch], color="tab:red", lw=1.0, label="val starts rising")
    if wants_log_scale(list(history["train_loss"]) + list(history["val_loss"])):
        ax.set_yscale("log")
    style_epoch_axis(ax, len(epochs))
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    import textwrap

    ax.set_title((title + "\n" if title else "") + textwrap.fill(diag.line, 90), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path)
    return path


class LearningCurveDiagnosis(Callback, Reporter):
    """Collects per-epoch train/val loss, adds ``diagnosis`` to ``summary.json`` and writes
    ``plots/learning_curve_diagnosis.png`` at the end of fitting.

    Args:
        train_key / val_key / train_acc_key: metrics read from ``trainer.callback_metrics``.
        output_dir: run directory (default: ``trainer.default_root_dir``).
        plot: write the PNG (rank 0 only).
        diagnose_kwargs: thresholds passed to :func:`diagnose`.
    """

    def __init__(self, train_key: str = "train/loss", val_key: str = "val/loss",
                 train_acc_key: str | None = "train/acc", output_dir: str | None = None,
                 plot: bool = True, **diagnose_kwargs: Any) -> None:
        super().__init__()
        self.train_key, self.val_key, self.train_acc_key = train_key, val_key, train_acc_key
        self.output_dir, self.plot = output_dir, plot
        self.diagnose_kwargs = diagnose_kwargs
        self.history: dict[str, list[float]] = {"epoch": [], "train_loss": [], "val_loss": [],
                                                "train_acc": []}
        self.diagnosis: Diagnosis | None = None
        self._val: float | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        v = trainer.callback_metrics.get(self.val_key)
        self._val = None if v is None else float(v)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        t = trainer.callback_metrics.get(self.train_key)
        if self._val is None or t is None:
            return
        a = trainer.callback_metrics.get(self.train_acc_key) if self.train_acc_key else None
        self.history["epoch"].append(trainer.current_epoch)
        self.history["train_loss"].append(float(t))
        self.history["val_loss"].append(self._val)
        self.history["train_acc"].append(float("nan") if a is None else float(a))
        self._val = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        h = self.history
        if not h["val_loss"]:
            return
        acc = h["train_acc"] if all(a == a for a in h["train_acc"]) else None
        self.diagnosis = diagnose(h["train_loss"], h["val_loss"], acc, **self.diagnose_kwargs)
        if self.plot and trainer.is_global_zero:
            out = Path(self.output_dir or trainer.default_root_dir)
            plot_diagnosis(h, self.diagnosis, out / "plots" / "learning_curve_diagnosis.png")

    @property
    def plot_note(self) -> str | None:
        """The spine prints this under the title of ``plots/learning_curves.png``."""
        return None if self.diagnosis is None else f"diagnosis: {self.diagnosis.line}"

    def summary_items(self) -> dict[str, Any]:
        return {} if self.diagnosis is None else {"diagnosis": self.diagnosis.to_dict()}

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state_dict["history"].items()}
