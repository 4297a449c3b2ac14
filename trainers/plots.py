"""Run plots (matplotlib, PNG): learning curves and the test confusion matrix."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_png(fig, path: Path) -> None:
    """Write ``fig`` as PNG atomically (a kill mid-write leaves the previous image) and close it."""
    from shiftlab.trainers.checkpoint_io import atomic_open

    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)


def plot_learning_curves(history: list[dict], path: Path, title: str = "", note: str | None = None) -> Path:
    """Train vs validation loss and accuracy per epoch; ``note`` is printed under the title
    (e.g. an over-fitting diagnosis)."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "acc")):
        for split, style in (("train", "-"), ("val", "--")):
            ys = [h.get(f"{split}/{metric}", np.nan) for h in history]
            ax.plot(epochs, ys, style, marker="o", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    return path


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], path: Path, class_names: Sequence[str] | None = None
                          ) -> Path:
    m = np.asarray(matrix)
    k = m.shape[0]
    names = list(class_names) if class_names else [str(i) for i in range(k)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * k, 1.0 + 0.5 * k))
    ax.imshow(m, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    save_png(fig, path)
    return path
