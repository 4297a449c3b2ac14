"""Every experiment overlay composes and fast-dev-runs; every config group option composes."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_spine_data import write_tiny_cifar

from shiftlab.trainers.train import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def _first_line_is_the_command(name: str) -> bool:
    lines = (CONFIGS / "experiment" / f"{name}.yaml").read_text().splitlines()
    body = [ln for ln in lines if ln.strip() and not ln.startswith("# @package")]
    return bool(body) and body[0].startswith("#") and f"experiment={name}" in body[0]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_fast_dev_runs(run_cfg, tmp_path, name):
    assert _first_line_is_the_command(name), f"configs/experiment/{name}.yaml must open with its command"
    cfg = run_cfg(f"experiment={name}", "debug=fdr")
    if "cifar10" in str(cfg.data.get("_target_", "")).lower():
        url, md5 = write_tiny_cifar(tmp_path)
        cfg = run_cfg(f"experiment={name}", "debug=fdr", f"data.root={tmp_path}/data", f"data.url={url}",
                      f"data.md5={md5}", "data.val_fraction=0.2")
    summary = train(cfg)
    assert summary["status"] == "completed", summary


@pytest.mark.parametrize("group", ["data", "model", "norm", "optimizer", "scheduler", "batching", "trainer",
                                   "callbacks", "logger", "debug", "launcher", "module"])
def test_every_group_option_composes(run_cfg, group):
    for option in sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")):
        run_cfg(f"{group}={option}")


def test_loggers_write_offline(run_cfg, tmp_path):
    summary = train(run_cfg("logger=many", "debug=limit", "trainer.max_epochs=1"))
    assert summary["status"] == "completed"
    out = tmp_path / "run"
    assert (out / "metrics.csv").exists()
    assert any((out / "tensorboard").rglob("events.out.tfevents*"))
    assert any((out / "wandb").glob("offline-run-*"))
