"""Run plots (matplotlib, PNG): learning curves and the test confusion matrix."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_png(fig, path: Path, dpi: int = 110) -> None:
    """Write ``fig`` as PNG atomically (a kill mid-write leaves the previous image) and close it.

    ``fig.tight_layout()`` leaves a placeholder layout engine behind, and savefig then runs a whole
    extra (non-rendering) draw only to lay the figure out again; the layout is already done, so the
    placeholder is dropped first (same pixels, one text-layout pass less: ~30% of a figure's time)."""
    from matplotlib.layout_engine import PlaceHolderLayoutEngine

    from shiftlab.trainers.checkpoint_io import atomic_open

    if isinstance(fig.get_layout_engine(), PlaceHolderLayoutEngine):
        fig.set_layout_engine(None)
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)


# Up to this many points a curve gets markers (one or a few points are invisible as a bare line).
MARKERS_UP_TO = 40
# A loss axis whose positive values span more than this ratio is drawn on a log scale.
LOG_RATIO = 30.0


def style_epoch_axis(ax, n_points: int) -> None:
    """Integer epoch ticks (never 0.5 epochs) and a label; shared by every per-epoch plot."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def wants_log_scale(values: Sequence[float]) -> bool:
    """True when the finite positive values span more than :data:`LOG_RATIO` (decades of loss)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return v.size > 1 and float(v.max() / v.min()) > LOG_RATIO


def finish_panels(fig) -> None:
    """What every panel of a run's figure should have, applied after the fact to figures drawn elsewhere
    (probe plots): markers on short lines (a single point drawn as a bare line is invisible), a y-label
    (the panel's title when it has none) and a legend when it holds several labelled lines."""
    for ax in fig.axes:
        if getattr(ax, "_colorbar", None) is not None:
            continue
        lines = ax.get_lines()
        for ln in lines:
            if len(ln.get_xdata()) <= MARKERS_UP_TO and ln.get_marker() in (None, "None", "", " "):
                ln.set_marker("o")
                ln.set_markersize(3)
        if not ax.get_ylabel() and ax.get_title():
            ax.set_ylabel(ax.get_title(), fontsize=8)
        labelled = [ln for ln in lines if not str(ln.get_label()).startswith("_")]
        if len(labelled) > 1 and ax.get_legend() is None:
            ax.legend(fontsize=6)


def plot_learning_curves(history: list[dict], path: Path, title: str = "", note: str | None = None) -> Path:
    """Train vs validation loss and accuracy per epoch; ``note`` is printed under the title (e.g. the
    diagnosis). With label noise, the training accuracy on clean and on corrupted samples is drawn too."""
    epochs = [h["epoch"] for h in history]
    marker = "o" if len(epochs) <= MARKERS_UP_TO else None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "acc")):
        series = [("train", f"train/{metric}", "-"), ("val", f"val/{metric}", "--")]
        if metric == "acc":
            series += [("train, clean samples", "mem/clean_acc", ":"),
                       ("train, corrupted vs given labels", "mem/corrupt_acc_given", "-."),
                       ("train, corrupted vs true labels", "mem/corrupt_acc_true", (0, (1, 3)))]
        drawn = []
        for label, key, style in series:
            ys = [h.get(key, np.nan) for h in history]
            if all(y is None or not np.isfinite(y) for y in ys):
                continue
            ax.plot(epochs, ys, linestyle=style, marker=marker, ms=3, label=label)
            drawn += [y for y in ys if y is not None]
        if metric == "loss" and wants_log_scale(drawn):
            ax.set_yscale("log")
        style_epoch_axis(ax, len(epochs))
        ax.set_ylabel("cross-entropy loss" + (" (log scale)" if ax.get_yscale() == "log" else "")
                      if metric == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    import textwrap

    wrapped = textwrap.fill(note, width=120) if note else ""
    fig.suptitle(title + (f"\n{wrapped}" if wrapped else ""), fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    return path


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], path: Path, class_names: Sequence[str] | None = None
                          ) -> Path:
    """Counts and the row-normalized matrix (recall per true class) side by side, each with a colour bar,
    drawn by scikit-learn's ConfusionMatrixDisplay."""
    from sklearn.metrics import ConfusionMatrixDisplay

    m = np.asarray(matrix)
    k = m.shape[0]
    names = list(class_names) if class_names else [str(i) for i in range(k)]
    rows = m.sum(axis=1, keepdims=True)
    normalized = np.divide(m, rows, out=np.zeros(m.shape, dtype=float), where=rows > 0)
    side = 2.0 + 0.45 * k
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.5, side))
    for ax, values, fmt, title in ((axes[0], m, "d", "counts"),
                                   (axes[1], normalized, ".2f", "normalized by true class (recall)")):
        ConfusionMatrixDisplay(values, display_labels=names).plot(
            ax=ax, cmap="Blues", values_format=fmt, colorbar=True, text_kw={"fontsize": 7})
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"test confusion matrix ({int(m.sum())} samples)", fontsize=11)
    fig.tight_layout()
    save_png(fig, path)
    return path
