"""experiments/harness.py: collecting run folders a test writes, seed aggregation, plots, the machine."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from shiftlab.experiments import harness


def _write_run(run_dir: Path, overrides: list[str], summary: dict, metrics: str | None = None,
               config: str = "") -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run_dir / ".hydra" / "config.yaml").write_text(config)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if metrics is not None:
        (run_dir / "metrics.csv").write_text(metrics)


METRICS = ("epoch,step,train/acc,val/acc\n"
           "0,9,,0.5\n0,9,0.4,\n1,19,,0.7\n1,19,0.6,\n1,19,,0.75\n")


@pytest.fixture
def multirun(tmp_path):
    """A multirun folder as ``shiftlab-train -m`` lays it out: two lrs x two seeds, plus a stray folder."""
    for i, (lr, seed, acc) in enumerate([(0.1, 0, 0.80), (0.1, 1, 0.90), (1.0, 0, 0.50), (1.0, 1, math.inf)]):
        _write_run(tmp_path / str(i), [f"optimizer.lr={lr}", f"seed={seed}", "+tag=x"],
                   {"status": "completed", "test/acc": acc, "data": {"train": 100}, "per_class": [1, 2]},
                   METRICS, config=f"seed: {seed}\ndata:\n  train_fraction: 0.5\n")
    (tmp_path / "multirun.yaml").write_text("{}")
    return tmp_path


def test_collect_runs_reads_summary_overrides_config_and_curves(multirun):
    df = harness.collect_runs(multirun, config_keys=["data.train_fraction", "data.missing"], curves=True)
    assert len(df) == 4
    assert sorted(df["optimizer.lr"]) == [0.1, 0.1, 1.0, 1.0] and df["seed"].dtype.kind == "f"
    assert df["tag"].tolist() == ["x"] * 4  # '+' of an appended override is not part of the key
    assert set(df["data.train_fraction"]) == {0.5} and df["data.missing"].isna().all()
    assert "per_class" not in df and df["summary"].iloc[0]["data"]["train"] == 100  # nested: via summary
    assert df["curves"].iloc[0] == {"train/acc": [(0, 0.4), (1, 0.6)], "val/acc": [(0, 0.5), (1, 0.75)]}
    assert df["dir"].iloc[0].endswith("/0")


def test_collect_runs_meta_filters_and_adds_columns(multirun):
    df = harness.collect_runs(multirun, meta=lambda d: None if d.name == "3" else {"phase": "tune"})
    assert len(df) == 3 and set(df["phase"]) == {"tune"}
    assert harness.collect_runs(multirun / "nothing-here").empty


def test_aggregate_mean_std_n_over_seeds(multirun):
    df = harness.collect_runs(multirun)
    agg = harness.aggregate(df, "optimizer.lr", ["test/acc"])
    assert agg["optimizer.lr"].tolist() == [0.1, 1.0]
    assert agg["test/acc_mean"].tolist() == pytest.approx([0.85, 0.50])
    assert agg["test/acc_std"].iloc[0] == pytest.approx(math.sqrt(0.005))  # sample std (ddof 1)
    # the infinite value is left out, and one finite run has no spread
    assert agg["test/acc_n"].tolist() == [2, 1] and agg["test/acc_std"].iloc[1] == 0.0


def test_mean_std_helpers():
    assert harness.mean_std([1.0, 3.0, None, math.nan, math.inf, "x"]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    assert harness.mean_std([5.0]) == (5.0, 0.0, 1)
    m, s, n = harness.mean_std([])
    assert math.isnan(m) and math.isnan(s) and n == 0
    assert harness.fmt_mean_std([0.5, 0.7], 100) == "60.0 ± 14.1"
    assert harness.fmt_mean_std([0.5], 100) == "50.0" and harness.fmt_mean_std([]) == "n/a"
    e, m, s = harness.mean_curve([[(0, 1.0), (1, 2.0)], [(0, 3.0)]])
    assert e == [1, 2] and m == [2.0, 2.0] and s[0] == pytest.approx(math.sqrt(2)) and s[1] == 0.0


def test_epoch_series_and_probe_history(multirun):
    assert harness.epoch_series(multirun / "0", "val/acc") == ([9, 19, 19], [0.5, 0.7, 0.75])
    assert harness.epoch_series(multirun / "0", "nope") == ([], [])
    assert harness.probe_history(multirun / "0", "drift") == []
    (multirun / "0" / "probes").mkdir()
    (multirun / "0" / "probes" / "drift.json").write_text(json.dumps({"history": [{"step": 3, "a": 1}, {"step": 5}]}))
    assert harness.series(harness.probe_history(multirun / "0", "drift"), "a") == ([3], [1.0])


def test_describe_machine_keys():
    d = harness.describe_machine()
    assert {"host", "cpu", "logical_cpus", "torch", "python", "torch_threads", "accelerator",
            "load_avg_1min"} <= set(d)
    assert d["logical_cpus"] >= 1 and d["torch"] in harness.machine()


def test_quick_outputs_get_their_own_folder(tmp_path):
    assert harness.output_dir("ioffe2015", quick=False) == Path("outputs/ioffe2015")
    assert harness.output_dir("ioffe2015", quick=True) == Path("outputs/ioffe2015/quick")
    assert harness.output_dir("ioffe2015", quick=True, out=tmp_path) == tmp_path
    args = harness.base_parser("x").parse_args(["--quick"])
    assert args.quick and args.out is None


def test_multirun_command_and_dry_run(tmp_path, capsys):
    cmd = harness.multirun_command(["experiment=learning_curve", "seed=0,1"], tmp_path)
    assert cmd[1:5] == ["-m", "shiftlab.trainers.train", "-m", "experiment=learning_curve"]
    assert f"hydra.sweep.dir={tmp_path}" in cmd and "print_config=false" in cmd
    assert harness.multirun(["seed=0,1"], tmp_path / "sweep", dry_run=True) == 0
    assert "seed=0,1" in capsys.readouterr().out and not (tmp_path / "sweep").exists()


def test_plot_mean_spread_writes_png(tmp_path):
    plt = harness.plt()
    fig, ax = plt.subplots()
    harness.plot_mean_spread(ax, [1, 2], [0.5, 0.6], [0.1, math.nan], label="a", scale=100)
    harness.plot_mean_spread(ax, [1, 2], [0.5, 0.6], [0.1, 0.0], label="b", style="band")
    assert harness.savefig(fig, tmp_path / "f.png").stat().st_size > 1000


def test_median_ignores_nan():
    assert harness.median([3.0, math.nan, 1.0, 2.0]) == 2.0
    assert harness.median([3.0, math.inf, 1.0]) == 3.0
    assert math.isnan(harness.median([math.nan]))


def test_build_and_bare_fit_time_each_epoch(tmp_path):
    """The parts drivers time outside train(): seeded build, training-only fit, one time per epoch."""
    cfg = harness.compose(["data=synthetic", "data.num_samples=200", "model.hidden=[8]", "callbacks=none",
                           "trainer.accelerator=cpu"], tmp_path)
    dm, module = harness.build(cfg, seed=3)
    w0 = next(module.parameters()).detach().clone()
    _, again = harness.build(cfg, seed=3)
    assert torch_equal(w0, next(again.parameters()))  # seeded: the same initial weights
    timer = harness.epoch_timer()
    harness.fit_bare(module, dm, 2, [timer])
    assert len(timer.times) == 2 and all(t > 0 for t in timer.times)
    assert not torch_equal(w0, next(module.parameters()))  # it trained
    assert not list(tmp_path.glob("**/*.ckpt")) and not (tmp_path / "metrics.csv").exists()


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
