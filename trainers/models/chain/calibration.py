"""Calibration of per-position posterior marginals: expected calibration error and a
reliability diagram (confidence of the argmax state vs its empirical accuracy, binned)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def reliability_bins(probs: Tensor, target: Tensor, num_bins: int = 15) -> dict[str, Tensor]:
    """Equal-width confidence bins over flattened valid positions.

    ``probs`` (N, K) marginals, ``target`` (N,) true states. Returns per-bin ``count``,
    ``confidence`` (mean max-probability) and ``accuracy``."""
    if num_bins < 1:
        raise ValueError(f"num_bins={num_bins} must be >= 1")
    conf, pred = probs.max(dim=-1)
    correct = (pred == target).double()
    b = (conf.double() * num_bins).long().clamp(0, num_bins - 1)
    count = torch.bincount(b, minlength=num_bins).double()
    s_conf = torch.bincount(b, weights=conf.double(), minlength=num_bins)
    s_acc = torch.bincount(b, weights=correct, minlength=num_bins)
    safe = count.clamp_min(1)
    return {"count": count, "confidence": s_conf / safe, "accuracy": s_acc / safe}


def expected_calibration_error(probs: Tensor, target: Tensor, num_bins: int = 15) -> float:
    """ECE = sum_b (n_b / n) |acc_b - conf_b| (Guo et al. 2017, equal-width bins)."""
    r = reliability_bins(probs, target, num_bins)
    n = r["count"].sum().clamp_min(1)
    return float((r["count"] / n * (r["accuracy"] - r["confidence"]).abs()).sum())


def flatten_valid(marginals: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T, K) marginals and (B, T) targets -> (N, K), (N,) over valid positions."""
    return marginals[mask], target[mask]


def plot_reliability(curves: dict[str, dict[str, Tensor]], path: str | Path, title: str = "") -> Path:
    """Reliability diagram, one line per named curve (e.g. model vs true model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for name, r in curves.items():
        keep = r["count"] > 0
        ax.plot(r["confidence"][keep].numpy(), r["accuracy"][keep].numpy(), marker="o", ms=3, label=name)
    ax.set_xlabel("confidence (max posterior marginal)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title or "reliability diagram")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
