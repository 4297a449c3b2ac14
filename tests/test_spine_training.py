"""End-to-end runs of the spine on built-in data (small, CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from shiftlab.trainers.train import train


def test_default_run_writes_the_run_directory(run_cfg, tmp_path):
    cfg = run_cfg("trainer.max_epochs=3", "callbacks=default", "trainer.enable_progress_bar=false")
    summary = train(cfg)
    out = tmp_path / "run"
    for name in ("metrics.csv", "summary.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt",
                 "plots/learning_curves.png", "plots/confusion_matrix.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "summary.json").read_text())
    assert saved["status"] == "completed" and saved["epochs_run"] == 3
    assert saved["stop_reason"] == "max_epochs=3 reached"
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc", "test/f1_macro",
                "test/precision_macro", "test/recall_macro", "wall_time_s"):
        assert isinstance(saved[key], float), key
    assert len(saved["test/precision_per_class"]) == 10
    assert summary["test/acc"] > 0.8  # 3 epochs of Adam on digits


@pytest.mark.parametrize("opt", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_each_optimizer_learns_digits(run_cfg, opt):
    lr = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adam": 2e-3, "adamw": 2e-3}[opt]
    summary = train(run_cfg(f"optimizer={opt}", f"optimizer.lr={lr}", "trainer.max_epochs=3", "test=false"))
    assert summary["train/acc"] > 0.8, summary


def test_lbfgs_with_full_batching(run_cfg):
    summary = train(run_cfg("optimizer=lbfgs", "batching=full", "norm=none", "trainer.max_epochs=3",
                            "scheduler=constant", "optimizer.max_iter=10"))
    assert summary["status"] == "completed"
    assert summary["train/acc"] > 0.9


@pytest.mark.parametrize("data,model", [("mnist1d", "cnn"), ("synthetic", "mlp"), ("digits", "cnn")])
def test_data_model_pairs(run_cfg, data, model):
    extra = ["data.as_images=true"] if (data, model) == ("digits", "cnn") else []
    summary = train(run_cfg(f"data={data}", f"model={model}", "trainer.max_epochs=1", *extra))
    assert summary["status"] == "completed"
    assert summary["test/acc"] > 1.0 / 10


def test_divergence_keeps_last_good_checkpoint(run_cfg, tmp_path):
    cfg = run_cfg("trainer.max_epochs=4", "callbacks=default",
                  "+callbacks.poison._target_=helpers_callbacks.PoisonWeightsAt", "+callbacks.poison.epoch=2")
    summary = train(cfg)
    assert summary["status"] == "diverged"
    assert "nan" in summary["stop_reason"] and "epoch 2" in summary["stop_reason"]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["status"] == "diverged"
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
