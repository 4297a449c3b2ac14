"""Two-process CPU DDP (gloo): the real launcher, and full-batch GD equal to one process."""
from __future__ import annotations

import json

import pytest
import torch
from test_spine_cli import cli

pytestmark = pytest.mark.slow

COMMON = ["batching=full", "norm=none", "optimizer=sgd", "optimizer.lr=0.5", "scheduler=constant",
          "trainer.max_epochs=2", "print_config=false", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "test=false", "data=synthetic", "trainer.accelerator=cpu"]


def test_two_process_ddp_full_batch_equals_single_process(tmp_path):
    ddp = cli("trainer=ddp", "trainer.devices=2", *COMMON, f"hydra.run.dir={tmp_path}/ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = cli(*COMMON, f"hydra.run.dir={tmp_path}/single")
    assert single.returncode == 0, single.stderr[-3000:]
    s_ddp = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert s_ddp["status"] == "completed" and s_ddp["epochs_run"] == 2
    a = torch.load(tmp_path / "ddp/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "single/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    for k in a:  # sharded chunks + all-reduce == one process over all samples (up to summation order)
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_ddp_sim_mini_batch_run(tmp_path):
    res = cli("trainer=ddp_sim", "trainer.max_epochs=2", "print_config=false", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_run"] == 2
    assert summary["test/acc"] > 0.5
    assert len(summary["test/precision_per_class"]) == 10
