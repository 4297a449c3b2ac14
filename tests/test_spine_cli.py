"""The command line: bad input errors, multirun resilience, metrics against scikit-learn."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from shiftlab.trainers.config_checks import ConfigError
from shiftlab.trainers.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.path.join(REPO, "tests"), WANDB_MODE="offline")
    return subprocess.run([sys.executable, "-m", "shiftlab.trainers.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override,key", [
    ("optimizer.lr=-0.1", "optimizer.lr"),
    ("data.label_noise=1.5", "data.label_noise"),
    ("batching.batch_size=0", "batching.batch_size"),
    ("batching=full batching.chunk_size=0", "batching.chunk_size"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("optimizer=momentum optimizer.momentum=1.2", "optimizer.momentum"),
    ("norm._target_=shiftlab.trainers.norms.bogus.build", "norm._target_="),
    ("model.activation=swishy", "model.activation"),
    ("data=synthetic data.kind=spiral", "data.kind"),
])
def test_bad_values_fail_before_training_naming_the_key(run_cfg, override, key):
    with pytest.raises(ConfigError) as err:
        train(run_cfg(*override.split()))
    msg = str(err.value)
    assert key in msg and ("allowed" in msg.lower() or "known" in msg), msg
    assert "\n" not in msg


def test_cli_error_is_one_line_on_stderr(tmp_path):
    res = cli("optimizer.lr=-1", f"hydra.run.dir={tmp_path}", "print_config=false")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("shiftlab: error: optimizer.lr=-1"), res.stderr
    assert "allowed: a number > 0" in lines[-1]


def test_unknown_norm_lists_known_names(run_cfg):
    with pytest.raises(ConfigError, match="registered norm builder: .*batchnorm.build.*none.build"):
        train(run_cfg("norm._target_=shiftlab.trainers.norms.bogus.build"))


def test_multirun_keeps_going_after_a_crashed_job(tmp_path):
    res = cli("-m", "optimizer.lr=0.01,-1,0.02", "debug=fdr", f"hydra.sweep.dir={tmp_path}", "callbacks=none")
    assert res.returncode == 0, res.stderr[-2000:]
    status = [json.loads((tmp_path / str(i) / "summary.json").read_text())["status"] for i in range(3)]
    assert status == ["completed", "failed", "completed"]
    reason = json.loads((tmp_path / "1" / "summary.json").read_text())["stop_reason"]
    assert "optimizer.lr" in reason


def test_test_metrics_match_scikit_learn():
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from shiftlab.trainers.batching import MiniBatch
    from shiftlab.trainers.modules.classification import ClassificationModule

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (400,), generator=g)
    logits = torch.randn(400, 5, generator=g) + 1.5 * torch.nn.functional.one_hot(y, 5)
    module = ClassificationModule(torch.nn.Identity(), None, None, MiniBatch(), num_classes=5)
    module.test_metrics.update(logits, y)
    got = {k: v.numpy() for k, v in module.test_metrics.compute().items()}
    pred = logits.argmax(1).numpy()
    p, r, f, _ = precision_recall_fscore_support(y.numpy(), pred, average="macro", zero_division=0)
    pc, rc, _, _ = precision_recall_fscore_support(y.numpy(), pred, average=None, zero_division=0)
    assert got["acc"] == pytest.approx((pred == y.numpy()).mean(), abs=1e-6)
    assert got["precision_macro"] == pytest.approx(p, abs=1e-6)
    assert got["recall_macro"] == pytest.approx(r, abs=1e-6)
    assert got["f1_macro"] == pytest.approx(f, abs=1e-6)
    assert got["precision_per_class"] == pytest.approx(pc, abs=1e-6)
    assert got["recall_per_class"] == pytest.approx(rc, abs=1e-6)
    assert (got["confusion_matrix"] == confusion_matrix(y.numpy(), pred)).all()


def test_kubeflow_environment_detection():
    from shiftlab.trainers.build import kubeflow_env_present

    base = {"MASTER_ADDR": "h", "MASTER_PORT": "1", "WORLD_SIZE": "2", "RANK": "0"}
    assert kubeflow_env_present(base)
    assert not kubeflow_env_present({**base, "LOCAL_RANK": "0"})  # torchrun
    assert not kubeflow_env_present({**base, "SLURM_JOB_ID": "3"})
    assert not kubeflow_env_present({"MASTER_ADDR": "h"})


@pytest.mark.parametrize("overrides,key", [
    (["trainer.sync_batchnorm=true"], "trainer.sync_batchnorm"),
    (["norm=ghost_bn", "trainer.sync_batchnorm=true", "trainer.accelerator=gpu"], "norm=ghost_bn"),
])
def test_sync_batchnorm_switch_errors(run_cfg, overrides, key):
    with pytest.raises(ConfigError, match=key):
        train(run_cfg(*overrides))


def test_batchnorm_sync_switch_builds_the_in_layer_synced_layer(run_cfg):
    from shiftlab.trainers.norms import create_norm_layer
    from shiftlab.trainers.norms._bn_common import StatBatchNorm

    assert isinstance(create_norm_layer("batchnorm", 8, 2, sync=True), StatBatchNorm)
    assert type(create_norm_layer("batchnorm", 8, 2)) is torch.nn.BatchNorm2d
    assert train(run_cfg("norm.sync=true", "trainer.max_epochs=1"))["status"] == "completed"
