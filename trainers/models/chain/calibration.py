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
    """ECE = sum_b (n_b / n) |acc_b - conf_b| (Guo et al. 2017, equal-width bins), by torchmetrics'
    ``multiclass_calibration_error`` (L1 norm); :func:`reliability_bins` gives the same bins for the diagram
    (tests/test_pgm_models.py checks that the two agree)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    if num_bins < 1:
        raise ValueError(f"num_bins={num_bins} must be >= 1")
    if target.numel() == 0:
        return 0.0
    return float(multiclass_calibration_error(probs.double(), target.long(), num_classes=probs.shape[-1],
                                              n_bins=num_bins, norm="l1", validate_args=False))


def flatten_valid(marginals: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T, K) marginals and (B, T) targets -> (N, K), (N,) over valid positions."""
    return marginals[mask], target[mask]


def plot_reliability(curves: dict[str, dict[str, Tensor]], path: str | Path, title: str = "") -> Path:
    """Reliability diagram, one line per named curve (e.g. model vs true model)."""
    import matplotlib.pyplot as plt

    from shiftlab.trainers.plots import save_png

    path = Path(path)
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
    save_png(fig, path)
    return path
