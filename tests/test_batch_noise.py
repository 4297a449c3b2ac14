"""Batch-regime probes inside real runs, and the sweep report built from run directories."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from shiftlab.callbacks.gradient_noise import GradientNoiseScale
from shiftlab.experiments import batch_noise as bn
from shiftlab.trainers.train import train


def _fake(split, epoch=0, max_epochs=5):
    trainer = SimpleNamespace(datamodule=SimpleNamespace(train_set=split), current_epoch=epoch,
                              max_epochs=max_epochs, should_stop=False, world_size=1, strategy=None)

    class Module(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
            self.logged = {}

        def log(self, key, value, **_):
            self.logged[key] = value

    return trainer, Module()


def test_noise_probe_on_fake_trainer_logs():  # the sharpness budget: tests/test_early_stopping_sharpness.py
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    y = (x[:, 0] > 0).long()  # a learnable signal, so |G|^2 is well above its estimation noise
    split = SimpleNamespace(x=x, y=y, y_true=y, corrupted=torch.zeros(200, dtype=torch.bool))
    trainer, module = _fake(split)
    noise = GradientNoiseScale(every_n_epochs=1, batch_size=16, num_batches=4)
    noise.on_train_epoch_end(trainer, module)
    assert module.logged["noise/grad_sq"] > 0
    assert module.logged["noise/b_simple"] == pytest.approx(
        module.logged["noise/tr_sigma"] / module.logged["noise/grad_sq"])
    assert module.logged["probe_cost/noise_scale_s"] > 0


def _write_launch(run_dir: Path, phase: str, regime: str, lr: float, noise: float, seed: int) -> None:
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        f"- optimizer.lr={lr}\n- data.label_noise={noise}\n- seed={seed}\n")
    (run_dir.parent / "launch.json").write_text(json.dumps({"phase": phase, "regime": regime}))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """Two real tiny runs (full batch and mini-batch 32, 30% label noise) laid out as a sweep."""
    from conftest import compose_cfg  # noqa: PLC0415

    root = tmp_path_factory.mktemp("bn")
    runs = {"full": ["batching=full", "optimizer.lr=0.5"],
            "mini32": ["batching=mini", "batching.batch_size=32", "optimizer.lr=0.05"]}
    common = ["experiment=batch_noise", "data=synthetic", "~data.as_sequence", "data.num_samples=400", "data.label_noise=0.3",
              "model.hidden=[16]", "trainer.max_epochs=3", "callbacks.noise_scale.every_n_epochs=1",
              "callbacks.sharpness.every_n_epochs=1", "callbacks.sharpness.subset_size=64",
              "callbacks.sharpness.power_iters=5", "callbacks.sharpness.trace_samples=2",
              "callbacks.model_checkpoint=null", "callbacks.rich_progress_bar=null",
              "callbacks.model_summary=null", "print_config=false", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false", "trainer.accelerator=cpu", "test=true"]
    summaries = {}
    for regime, extra in runs.items():
        for phase in ("sweep", "tune"):
            run_dir = root / phase / regime / "0"
            cfg = compose_cfg(common + extra, run_dir)
            summaries[(phase, regime)] = train(cfg) if phase == "sweep" else None
            if phase == "tune":  # reuse the sweep run's outputs as a finished tuning run
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "summary.json").write_text((root / "sweep" / regime / "0" / "summary.json").read_text())
            _write_launch(run_dir, phase, regime, float(extra[-1].split("=")[1]), 0.3, 0)
    return root, summaries


def test_real_runs_log_every_probe(sweep_dir):
    root, summaries = sweep_dir
    for regime in ("full", "mini32"):
        s = summaries[("sweep", regime)]
        for key in ("mem/clean_acc", "mem/corrupt_acc_given", "mem/corrupt_acc_true", "noise/b_simple",
                    "sharpness/top_eigenvalue", "sharpness/trace"):
            assert math.isfinite(float(s[key])), (regime, key)
        assert s["mem/frac_corrupted"] == pytest.approx(0.3, abs=0.01)
        curves = bn.read_curves(root / "sweep" / regime / "0")
        assert [e for e, _ in curves["mem/corrupt_acc_given"]] == [0, 1, 2]
    # full batch takes one optimizer step per epoch, mini-batch 32 many
    assert summaries[("sweep", "full")]["global_step"] == 3
    assert summaries[("sweep", "mini32")]["global_step"] > 3 * 5


def test_report_from_run_directories(sweep_dir):
    root, summaries = sweep_dir
    report = bn.aggregate(root, {"experiment": "test", "epochs": 3})
    for name in ("test_acc_vs_noise.png", "memorization.png", "sharpness_end.png", "b_simple.png"):
        assert (report / name).stat().st_size > 1000, name
    md = (report / "summary.md").read_text()
    for text in ("Keskar et al. 2017", "Geiping et al. 2022", "Zhang et al. 2017", "| full | 1 |"):
        assert text in md
    acc = 100 * summaries[("sweep", "mini32")]["test/acc"]
    assert "| mini32 | " in md and f"{acc:.1f}" in md
    with open(report / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["phase"] == "sweep"]
    assert {r["regime"] for r in rows} == {"full", "mini32"}
    assert all(float(r["noise"]) == 0.3 for r in rows)


def test_lr_choice_and_helpers():
    runs = [{"regime": "full", "lr": lr, "summary": {"status": st, "val/acc": acc}}
            for lr, st, acc in ((0.3, "completed", 0.5), (1.0, "completed", 0.7), (3.0, "diverged", None))]
    runs.append({"regime": "mini32", "lr": 0.01, "summary": {"status": "completed", "val/acc": 0.6}})
    runs.append({"regime": "mini32", "lr": 0.03, "summary": {"status": "completed", "val/acc": 0.6}})
    best, table = bn.choose_lrs(runs)
    assert best == {"full": 1.0, "mini32": 0.01}  # ties go to the smaller lr
    assert table["full"][3.0] == -math.inf
    assert bn.first_epoch_reaching([(0, 0.1), (1, 0.5), (2, 0.9)], 0.5) == 2.0
    assert math.isnan(bn.first_epoch_reaching([(0, 0.1)], 0.5))


def test_cli_rejects_unknown_regime_and_quick_profile_is_small():
    with pytest.raises(SystemExit, match="allowed: full, full_clip"):
        bn.main(["run", "--regimes", "full,tiny", "--dry-run"])
    q = bn.quick(bn.PROFILES["cpu"])
    assert len(q.seeds) == 1 and q.epochs <= 8 and set(q.regimes) <= set(bn.REGIMES)
    p = bn.PROFILES["cpu"]
    assert p.noise == [0.0, 0.2, 0.4, 0.6] and len(p.seeds) >= 3
    assert {"full", "mini32", "mini128", "mini512", "full_clip", "full_clip_gnp"} <= set(p.regimes)


@pytest.mark.parametrize("experiment", ["batch_noise", "batch_noise_cifar10"])
def test_every_regime_composes_for_both_experiments(experiment, tmp_path):
    from conftest import compose_cfg  # noqa: PLC0415

    from shiftlab.trainers.build import build_batching, build_callbacks  # noqa: PLC0415
    from shiftlab.trainers.config_checks import check_config  # noqa: PLC0415

    for regime, overrides in bn.REGIMES.items():
        overrides = [o.replace("${gnp_alpha}", "0.1") for o in overrides]
        cfg = compose_cfg([f"experiment={experiment}", *overrides, "optimizer.lr=0.1"], tmp_path)
        check_config(cfg, machine=False)  # the CIFAR-10 experiment is meant for a GPU machine
        batching = build_batching(cfg)
        assert batching.kind == ("full" if regime.startswith("full") else "mini")
        names = {type(c).__name__ for c in build_callbacks(cfg)}
        assert {"MemorizationMonitor", "GradientNoiseScale", "SharpnessMonitor"} <= names


def test_quick_run_has_its_own_output_folder(tmp_path, monkeypatch, capsys):
    """--quick never writes into (or gets aggregated with) the full sweep's folders."""
    monkeypatch.chdir(tmp_path)
    bn.main(["run", "--quick", "--dry-run", "--jobs", "1"])
    dirs = {o.split("=", 1)[1] for line in capsys.readouterr().out.splitlines() for o in line.split()
            if o.startswith("hydra.sweep.dir=")}
    assert dirs and all(d.startswith("outputs/batch_noise_cpu/quick/") for d in dirs), dirs
    bn.main(["run", "--dry-run", "--jobs", "1", "--regimes", "full"])
    dirs = {o.split("=", 1)[1] for line in capsys.readouterr().out.splitlines() for o in line.split()
            if o.startswith("hydra.sweep.dir=")}
    assert dirs == {"outputs/batch_noise_cpu/tune/full", "outputs/batch_noise_cpu/sweep/full"}
