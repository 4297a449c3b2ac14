"""experiments/learning_curve.py: aggregation over a sweep directory and the experiment config."""
from __future__ import annotations

import csv
import json

import pytest

from shiftlab.experiments.learning_curve import aggregate, collect, main


def _fake_sweep(root, results):
    for i, (frac, seed, n, tr, va) in enumerate(results):
        d = root / str(i)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "config.yaml").write_text(
            f"seed: {seed}\ndata:\n  train_fraction: {frac}\n")
        (d / "summary.json").write_text(json.dumps({
            "status": "completed", "data": {"train": n}, "train/acc": tr, "val/acc": va,
            "train/loss": 1 - tr, "val/loss": 1 - va}))
    (root / "99").mkdir()
    (root / "99" / "summary.json").write_text(json.dumps({"status": "failed"}))


def test_aggregate_mean_std_per_size(tmp_path):
    _fake_sweep(tmp_path, [(0.5, 0, 50, 1.0, 0.6), (0.5, 1, 50, 0.9, 0.8),
                           (1.0, 0, 100, 0.95, 0.85), (1.0, 1, 100, 0.95, 0.87)])
    rows = collect(tmp_path)
    assert len(rows) == 4 and {r["seed"] for r in rows} == {0, 1}
    table = aggregate(rows, "acc")
    assert [r["n_train"] for r in table] == [50, 100]
    assert table[0]["val_acc_mean"] == pytest.approx(0.7)
    assert table[0]["val_acc_std"] == pytest.approx(0.1414, abs=1e-3)
    assert table[1]["train_acc_std"] == 0.0 and table[1]["fraction"] == 1.0
    loss = aggregate(rows, "loss")
    assert loss[0]["train_loss_mean"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="allowed: acc, loss"):
        aggregate(rows, "f1")


def test_main_writes_csv_and_png(tmp_path):
    _fake_sweep(tmp_path, [(0.5, 0, 50, 1.0, 0.6), (1.0, 0, 100, 0.95, 0.85)])
    assert main(["--sweep-dir", str(tmp_path)]) == 0
    with (tmp_path / "learning_curve.csv").open() as f:
        assert [int(r["n_train"]) for r in csv.DictReader(f)] == [50, 100]
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000


def test_experiment_config_sweeps_train_fraction_and_seed():
    from shiftlab.trainers.compose import compose

    cfg = compose(["experiment=learning_curve"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert "data.train_fraction" in params and "seed" in params
    assert cfg.task_name == "learning_curve" and cfg.test is False
