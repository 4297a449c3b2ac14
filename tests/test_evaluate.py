"""shiftlab-eval: a checkpoint evaluated into a new run directory, with the run's own overrides first."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
FAST = ["print_config=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.accelerator=cpu"]


def _cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    run = root / "trained"
    res = _cli("shiftlab.trainers.train", FAST + ["trainer.max_epochs=2", "model.hidden=[48]",
                                                  f"hydra.run.dir={run}"], root)
    assert res.returncode == 0, res.stderr[-2000:]
    return run


def test_eval_reproduces_the_runs_test_figures_from_best_ckpt(trained, tmp_path):
    out = tmp_path / "ev"
    res = _cli("shiftlab.trainers.evaluate", FAST + [f"ckpt_path={trained}/checkpoints/best.ckpt",
                                                     f"hydra.run.dir={out}"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1].startswith("shiftlab: completed test/acc=")
    ours, theirs = (json.loads((p / "summary.json").read_text()) for p in (out, trained))
    # the run's own `model.hidden=[48]` was applied (else the weights would not load) and the same data
    # split and weights give the same figures as the training run's test on best.ckpt
    assert theirs["test/weights"].startswith("best: best.ckpt")
    assert ours["test/acc"] == pytest.approx(theirs["test/acc"], abs=1e-6)
    assert ours["test/weights"].startswith(f"checkpoint: {trained}/checkpoints/best.ckpt")
    table = (out / "per_class.csv").read_text().splitlines()
    assert table[0] == "class,precision,recall,support" and len(table) == 11
    assert sum(int(r.split(",")[3]) for r in table[1:]) == sum(map(sum, ours["test/confusion_matrix"]))
    assert (out / "plots" / "confusion_matrix.png").stat().st_size > 1000


def test_eval_with_a_data_override_changes_the_data_not_the_model(trained, tmp_path):
    out = tmp_path / "ev"
    res = _cli("shiftlab.trainers.evaluate", FAST + [f"ckpt_path={trained}/checkpoints/last.ckpt",
                                                     "data.test_fraction=0.3", f"hydra.run.dir={out}"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["test"] != json.loads((trained / "summary.json").read_text())["data"]["test"]


@pytest.mark.parametrize("args, needle", [
    (["model.hidden=[64]"], "ckpt_path="),               # another model: refused, no traceback
    ([], "ckpt_path is required"),
])
def test_eval_refuses_in_one_line(trained, tmp_path, args, needle):
    ckpt = [f"ckpt_path={trained}/checkpoints/best.ckpt"] if needle != "ckpt_path is required" else []
    res = _cli("shiftlab.trainers.evaluate", FAST + ckpt + args + [f"hydra.run.dir={tmp_path}/ev"], tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("shiftlab: error:") and needle in lines[-1] and "Traceback" not in res.stderr
