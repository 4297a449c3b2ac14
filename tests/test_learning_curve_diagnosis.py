"""Learning-curve diagnosis on hand-made curves, and in an end-to-end spine run."""
from __future__ import annotations

import json
import math
import random

import pytest

from shiftlab.callbacks.learning_curve_diagnosis import LABELS, diagnose


def _noise(seed: int, n: int, sd: float) -> list[float]:
    r = random.Random(seed)
    return [r.gauss(0, sd) for _ in range(n)]


def test_overfitting_curve_reports_the_rise_epoch():
    n = 60
    train = [1.5 * math.exp(-t / 8) + 0.01 for t in range(n)]
    val = [0.5 + 1.0 * math.exp(-t / 6) + 0.004 * max(0, t - 20) ** 1.5 / 5 + e
           for t, e in zip(range(n), _noise(0, n, 0.005))]
    d = diagnose(train, val)
    assert d.label == "over-fitting"
    assert d.val_rise_epoch is not None and 15 <= d.val_rise_epoch <= 30
    assert d.gap > 0 and d.gap_trend > 0
    assert "over-fitting" in d.line and f"epoch {d.val_rise_epoch}" in d.line


def test_underfitting_curve_still_falling_with_small_gap():
    n = 30
    train = [2.0 - 0.04 * t for t in range(n)]
    val = [2.02 - 0.04 * t for t in range(n)]
    d = diagnose(train, val)
    assert d.label == "under-fitting" and d.val_rise_epoch is None
    assert abs(d.relative_gap) < 0.1


def test_good_fit_plateau_with_small_gap():
    n = 60
    train = [0.3 + 1.5 * math.exp(-t / 5) for t in range(n)]
    val = [0.33 + 1.5 * math.exp(-t / 5) + e for t, e in zip(range(n), _noise(1, n, 0.003))]
    d = diagnose(train, val)
    assert d.label == "good fit", d
    assert d.val_rise_epoch is None


def test_low_train_accuracy_is_underfitting_when_asked():
    n = 40
    train = [0.3 + 1.5 * math.exp(-t / 5) for t in range(n)]
    val = [0.31 + 1.5 * math.exp(-t / 5) for t in range(n)]
    assert diagnose(train, val, [0.5] * n).label == "good fit"  # threshold off by default
    assert diagnose(train, val, [0.5] * n, underfit_acc=0.8).label == "under-fitting"


def test_flat_validation_with_a_growing_gap_is_not_over_fitting():
    # a 98%-accuracy run: train loss falls towards zero, validation loss stays flat at its minimum level
    n = 40
    train = [0.02 + 1.5 * math.exp(-t / 6) for t in range(n)]
    val = [0.12 + 1.5 * math.exp(-t / 4) + e for t, e in zip(range(n), _noise(3, n, 0.0005))]
    d = diagnose(train, val, [0.98] * n)
    assert d.label == "good fit", d
    assert "validation stays flat" in d.line and d.relative_gap > 0.2
    # the same gap with a validation loss that rises is over-fitting
    rising = [v + 0.004 * max(0, t - 20) for t, v in enumerate(val)]
    assert diagnose(train, rising).label == "over-fitting"


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="equal length"):
        diagnose([1.0, 0.5], [1.0])
    with pytest.raises(ValueError, match="window"):
        diagnose([1.0], [1.0], window=0)


@pytest.mark.slow
def test_spine_run_with_curvature_stop_and_diagnosis(run_cfg, tmp_path):
    """callbacks=curvature_stop in a real run: the stop reason and the diagnosis reach
    summary.json, the plots are written, and the restored weights are tested."""
    from shiftlab.trainers.train import train

    cfg = run_cfg("callbacks=curvature_stop", "trainer.enable_progress_bar=false",
                  "data.label_noise=0.4", "optimizer.lr=0.01", "scheduler=constant",
                  "trainer.max_epochs=40")  # the diagnosis is one of the default callbacks
    summary = train(cfg)
    out = tmp_path / "run"
    saved = json.loads((out / "summary.json").read_text())
    es = saved["early_stopping"]
    assert es["rule"] == "curvature" and es["stopped"], saved["stop_reason"]
    assert saved["stop_reason"].startswith("curvature rule on val/loss stopped after epoch")
    assert saved["epochs_run"] == es["stopped_epoch"] + 1 < 40
    assert es["restored_epoch"] == es["best_epoch"] <= es["stopped_epoch"]
    assert saved["diagnosis"]["label"] in LABELS
    assert (out / "plots" / "learning_curve_diagnosis.png").exists()
    assert (out / "plots" / "learning_curves.png").exists()
    assert summary["diagnosis"]["line"] == saved["diagnosis"]["line"]
