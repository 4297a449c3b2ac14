"""Extending shiftlab from outside: a user's project registers a norm and an optimizer and names
its own `_target_`s from its own directory and config dir, without editing shiftlab or PYTHONPATH."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

USER_MODULE = '''
import lightning as L
import torch
from torch import nn
from shiftlab.trainers.norms import register_norm
from shiftlab.trainers.optim import register_optimizer, register_scheduler


class ScaledBatchNorm(nn.BatchNorm1d):
    """A user's norm: BatchNorm whose output is halved."""

    def forward(self, x):
        return 0.5 * super().forward(x)


@register_norm("scaled_bn")
def build(num_features, dims, **kwargs):
    return ScaledBatchNorm(num_features)


@register_optimizer("half_sgd")
class HalfSGD(torch.optim.SGD):
    """A user's optimizer: SGD at half the configured rate."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, lr=lr / 2)


@register_scheduler("flat")
class FlatLR(torch.optim.lr_scheduler.LambdaLR):
    """A user's scheduler: the base rate throughout."""

    def __init__(self, optimizer, max_epochs):
        super().__init__(optimizer, lambda epoch: 1.0)


class RecordModules(L.Callback):
    def __init__(self, path):
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        with open(self.path, "w") as f:
            names = ({type(m).__name__ for m in pl_module.modules()} | {type(o).__name__ for o in trainer.optimizers}
                     | {type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs})
            f.write(",".join(sorted(names)))
'''


def _user_project(root: Path) -> Path:
    (root / "my_configs" / "norm").mkdir(parents=True)
    (root / "my_configs" / "callbacks").mkdir(parents=True)
    (root / "my_configs" / "optimizer").mkdir(parents=True)
    (root / "my_configs" / "scheduler").mkdir(parents=True)
    (root / "my_ext.py").write_text(USER_MODULE)
    (root / "my_configs" / "norm" / "scaled.yaml").write_text("_target_: my_ext.build\n_partial_: true\n")
    (root / "my_configs" / "optimizer" / "half.yaml").write_text("_target_: my_ext.HalfSGD\n_partial_: true\nlr: 0.2\n")
    (root / "my_configs" / "scheduler" / "flat.yaml").write_text("_target_: my_ext.FlatLR\n_partial_: true\n")
    (root / "my_configs" / "callbacks" / "record.yaml").write_text(
        "record:\n  _target_: my_ext.RecordModules\n  path: modules.txt\n")
    return root


def _train(exe: Path, cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    quiet = ["print_config=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
             "trainer.max_epochs=1", "trainer.accelerator=cpu"]
    env = dict(env or os.environ, WANDB_MODE="offline")
    env.pop("PYTHONPATH", None)  # nothing but the installed package and the working directory
    return subprocess.run([str(exe), *args, *quiet], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_user_project_registers_a_norm_an_optimizer_a_scheduler_and_a_target_from_its_own_directory(tmp_path):
    project = _user_project(tmp_path)
    exe = Path(sys.executable).with_name("shiftlab-train")
    res = _train(exe, project, "--config-dir", "my_configs", "imports=[my_ext]", "norm=scaled", "optimizer=half",
                 "scheduler=flat", "callbacks=record")
    assert res.returncode == 0, res.stderr[-3000:]
    assert {"ScaledBatchNorm", "HalfSGD", "FlatLR"} <= set((project / "modules.txt").read_text().split(","))
    run_dir = Path(res.stdout.strip().splitlines()[-1].split("run directory: ")[1])
    assert run_dir.is_relative_to(project / "outputs")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_unknown_import_is_one_line(tmp_path):
    exe = Path(sys.executable).with_name("shiftlab-train")
    res = _train(exe, tmp_path, "imports=[no_such_module_here]")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("shiftlab: error: imports='no_such_module_here'")


