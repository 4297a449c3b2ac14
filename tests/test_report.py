"""shiftlab-report on fabricated run directories (the end-to-end case is in test_sweep.py)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from shiftlab.trainers.orchestration import report


def _run(root: Path, name: str, *, summary: dict | None = None, trial: dict | None = None,
         overrides: list[str] | None = None, config: dict | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if trial is not None:
        (d / "trial.json").write_text(json.dumps(trial))
    if overrides is not None or config is not None:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides or []))
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or {}))
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "summary.json").write_text("{}")  # must not be taken for a run
    return d


def build_sweep(root: Path) -> Path:
    """A sweep directory as shiftlab-sweep leaves it: two complete trials, one pruned, one failed."""
    root.mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({
        "metric": "val/loss", "direction": "minimize",
        "settings": {"params": {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1, "log": True},
                                "norm": ["batchnorm", "none"]}}}))
    def trial(n, state, value, lr, norm, reason):
        return {"number": n, "state": state, "value": value, "reason": reason,
                "params": {"optimizer.lr": lr, "norm": norm}}
    _run(root, "trials/0000", summary={"status": "completed", "val/loss": 0.30, "val/acc": 0.91, "epochs_run": 5,
                                       "stop_reason": "max_epochs=5 reached"},
         trial=trial(0, "complete", 0.30, 0.01, "batchnorm", "max_epochs=5 reached"))
    _run(root, "trials/0001", summary={"status": "completed", "val/loss": 0.20, "val/acc": 0.95, "epochs_run": 5},
         trial=trial(1, "complete", 0.20, 0.003, "none", "max_epochs=5 reached"))
    _run(root, "trials/0002", summary={"status": "completed", "val/loss": 0.90, "epochs_run": 1, "sweep/pruned": True,
                                       "stop_reason": "pruned by MedianPruner at epoch 0 (val/loss=0.9)"},
         trial=trial(2, "pruned", 0.90, 1e-4, "none", "pruned by MedianPruner at epoch 0 (val/loss=0.9)"))
    _run(root, "trials/0003", trial=trial(3, "failed", None, 0.5, "batchnorm", "RuntimeError: CUDA out of memory"))
    (root / "ray").mkdir()  # Tune's own directory is not a run
    return root


def build_multirun(root: Path) -> Path:
    """A plain Hydra multirun (no trial records): the parameters come from .hydra/overrides.yaml."""
    cfg = {"optimized_metric": "val/acc", "optimized_metric_mode": "max"}
    _run(root, "0", summary={"status": "completed", "val/acc": 0.8}, overrides=["optimizer.lr=0.1", "seed=0", "hydra.run.dir=x"], config=cfg)
    _run(root, "1", summary={"status": "completed", "val/acc": 0.9}, overrides=["optimizer.lr=0.01", "seed=0"], config=cfg)
    _run(root, "2", summary={"status": "diverged", "stop_reason": "loss is nan at epoch 2"},
         overrides=["optimizer.lr=10.0", "seed=0"], config=cfg)
    return root


def build_mixed(root: Path) -> Path:
    """Awkward cells: integers next to missing values, pipes and newlines in reasons, a NaN metric,
    booleans, a quoted override, a parameter only some runs set, a tie on the metric."""
    cfg = {"optimized_metric": "val/loss", "optimized_metric_mode": "min"}
    _run(root, "a", summary={"status": "completed", "val/loss": 0.5, "epochs_run": 3, "wall_time_s": 1.25,
                             "flag": True, "note": "x|y", "stop_reason": "patience | 3\nepochs"},
         overrides=["model.width=64", "norm=none", "+extra='a b'"], config=cfg)
    _run(root, "b", summary={"status": "completed", "val/loss": 0.5, "epochs_run": 4},
         overrides=["model.width=128", "norm=batchnorm"], config=cfg)
    _run(root, "c", summary={"status": "completed", "val/loss": "nan", "epochs_run": 2},
         overrides=["model.width=32", "norm=none"], config=cfg)
    _run(root, "d", summary={"status": "interrupted", "stop_reason": "SIGINT", "epochs_run": 1, "val/loss": 0.1},
         overrides=["model.width=16", "norm=none", "optimizer=adam"], config=cfg)
    _run(root, "e", trial={"state": "pruned", "value": 0.7, "reason": "pruned", "params": {"model.width": 8}},
         config=cfg)
    return root


BUILDERS = {"sweep": build_sweep, "multirun": build_multirun, "mixed": build_mixed}


@pytest.fixture()
def sweep_dir(tmp_path: Path) -> Path:
    return build_sweep(tmp_path / "sw")


def test_table_csv_plots_and_best_run(sweep_dir: Path) -> None:
    out = report.make_report(sweep_dir)
    assert out["best"] == "trials/0001" and out["metric"] == "val/loss" and out["rows"] == 4
    with out["csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == ["trials/0001", "trials/0000", "trials/0002", "trials/0003"]
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned", "failed"]
    assert rows[0]["optimizer.lr"] == "0.003" and rows[0]["norm"] == "none" and rows[0]["val/acc"] == "0.95"
    assert rows[3]["reason"] == "RuntimeError: CUDA out of memory" and rows[3]["val/loss"] == ""
    md = out["markdown"].read_text()
    assert "**Best run: `trials/0001`** -- val/loss = 0.2 (optimizer.lr=0.003, norm=none)" in md
    assert "4 runs: 2 complete, 1 pruned, 1 failed" in md
    assert "pruned by MedianPruner at epoch 0" in md and "CUDA out of memory" in md
    assert "| `trials/0001` (best) | complete | 0.2 |" in md
    names = sorted(p.name for p in out["plots"])
    assert names == ["val_loss_vs_norm.png", "val_loss_vs_optimizer_lr.png"]
    assert all(p.stat().st_size > 5000 for p in out["plots"])


def test_metric_and_direction_from_the_command_line(sweep_dir: Path, capsys) -> None:
    assert report.main([str(sweep_dir), "--metric", "val/acc", "--direction", "maximize"]) == 0
    assert "best: trials/0001" in capsys.readouterr().out
    assert report.main([str(sweep_dir), "--metric", "val/loss", "--direction", "maximize"]) == 0
    # maximizing the loss: the pruned (0.9) and failed runs never count as best
    assert "best: trials/0000" in capsys.readouterr().out


def test_plain_hydra_multirun_without_trial_records(tmp_path: Path) -> None:
    root = build_multirun(tmp_path / "multirun")
    out = report.make_report(root)
    assert out["best"] == "1" and out["direction"] == "maximize"
    md = out["markdown"].read_text()
    assert "diverged: loss is nan at epoch 2" in md and "from run config" in md
    # seed is the same in every run: a column, not a plot; hydra.* overrides are not parameters
    assert {p.name for p in out["plots"]} == {"val_acc_vs_optimizer_lr.png"}
    assert "| seed |" in md and "hydra.run.dir" not in md


def test_no_completed_run_still_reports(tmp_path: Path) -> None:
    root = tmp_path / "s"
    _run(root, "a", trial={"state": "failed", "reason": "boom", "params": {"x": 1}, "metric": "val/acc"})
    out = report.make_report(root, metric="val/acc")
    assert out["best"] is None
    assert "**Best run: none**" in out["markdown"].read_text()


def test_bad_input_is_one_line(tmp_path: Path, capsys) -> None:
    assert report.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("shiftlab-report: error: sweep dir")
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no run directories" in capsys.readouterr().err
    _run(tmp_path / "nometric", "a", summary={"status": "completed", "x": 1})
    assert report.main([str(tmp_path / "nometric")]) == 2
    assert "pass --metric" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_pandas_tables_equal_the_string_built_ones(name: str, tmp_path: Path) -> None:
    """runs.csv and report.md byte for byte as the former csv-module / string-join report wrote
    them for the same run directories (tests/golden/report/, written by commit c894504)."""
    root = BUILDERS[name](tmp_path / name)
    out = report.make_report(root)
    golden = Path(__file__).parent / "golden" / "report" / name
    assert out["csv"].read_bytes() == (golden / "runs.csv").read_bytes()
    assert out["markdown"].read_text() == (golden / "report.md").read_text()


def _seed_runs(root: Path, table: dict[tuple, float], keys: tuple[str, ...]) -> Path:
    cfg = {"optimized_metric": "val/acc", "optimized_metric_mode": "max"}
    for i, (values, acc) in enumerate(table.items()):
        overrides = [f"{k}={v}" for k, v in zip(keys, values)]
        _run(root, str(i), summary={"status": "completed", "val/acc": acc, "epochs_run": 3}, overrides=overrides,
             config=cfg)
    return root


def test_seeds_only_multirun_reports_mean_and_spread_not_a_best_seed(tmp_path: Path, capsys) -> None:
    import statistics

    accs = {(0,): 0.90, (1,): 0.94, (2,): 0.92}
    root = _seed_runs(tmp_path / "seeds", accs, ("seed",))
    _run(root, "3", summary={"status": "diverged", "stop_reason": "loss is nan"}, overrides=["seed=3"],
         config={"optimized_metric": "val/acc"})
    out = report.make_report(root)
    mean, std = statistics.mean(accs.values()), statistics.stdev(accs.values())
    assert out["best"] is None and len(out["across_seeds"]) == 1
    spread = out["across_seeds"][0]
    assert spread["n"] == 3 and spread["mean"] == pytest.approx(mean) and spread["std"] == pytest.approx(std)
    md = out["markdown"].read_text()
    assert f"**Across seeds: val/acc = {mean:.4g} ± {std:.4g} (mean ± sample std over n=3 seeds; " in md
    assert "The runs differ only in their seed (0, 1, 2, 3): no run is best." in md
    assert "Best run" not in md and "(best)" not in md
    assert out["plots"] == []  # no val/acc-vs-seed figure
    assert report.main([str(root)]) == 0
    printed = capsys.readouterr().out
    assert "best: none (runs repeat seeds; val/acc mean 0.92 ± 0.02 over n=3" in printed


def test_seeds_with_a_knob_rank_configurations_by_their_mean(tmp_path: Path) -> None:
    accs = {(0.1, 0): 0.80, (0.1, 1): 0.99, (0.01, 0): 0.93, (0.01, 1): 0.95}  # the best single run has lr=0.1
    root = _seed_runs(tmp_path / "grid", accs, ("optimizer.lr", "seed"))
    out = report.make_report(root)
    assert out["best"] is None
    rows = {r["optimizer.lr"]: r for r in out["across_seeds"]}
    assert [r["optimizer.lr"] for r in out["across_seeds"]] == [0.01, 0.1]  # best mean first
    assert rows[0.01]["mean"] == pytest.approx(0.94) and rows[0.1]["mean"] == pytest.approx(0.895)
    assert rows[0.01]["n"] == rows[0.1]["n"] == 2
    md = out["markdown"].read_text()
    assert "**Best configuration: optimizer.lr=0.01** -- val/acc = 0.94 ± 0.01414" in md
    assert "## Across seeds" in md and "| optimizer.lr | mean | std | n | min | max |" in md
    assert "(best)" not in md
    assert [p.name for p in out["plots"]] == ["val_acc_vs_optimizer_lr.png"]


def test_seeds_without_a_completed_run_still_report(tmp_path: Path, capsys) -> None:
    cfg = {"optimized_metric": "val/acc"}
    for i, lr in enumerate((0.1, 0.01)):
        for seed in (0, 1):
            _run(tmp_path / "s", f"{i}{seed}", summary={"status": "diverged", "stop_reason": "nan"},
                 overrides=[f"optimizer.lr={lr}", f"seed={seed}"], config=cfg)
    assert report.main([str(tmp_path / "s")]) == 0
    assert "best: none (runs repeat seeds; no configuration completed)" in capsys.readouterr().out
    md = (tmp_path / "s" / "report" / "report.md").read_text()
    assert "**Across seeds: no run completed with a finite metric.**" in md


def test_overrides_are_read_with_hydras_grammar(tmp_path: Path) -> None:
    """``1e-3`` is a float on Hydra's command line; YAML 1.1 (the former reader) made it the string '1e-3'."""
    cfg = {"optimized_metric": "val/acc", "optimized_metric_mode": "max"}
    _run(tmp_path / "m", "0", summary={"status": "completed", "val/acc": 0.9}, config=cfg,
         overrides=["optimizer.lr=1e-3", "+tags=[a,b]", "model='mlp'", "~callbacks.x"])
    _run(tmp_path / "m", "1", summary={"status": "completed", "val/acc": 0.8}, config=cfg,
         overrides=["optimizer.lr=1e-1", "+tags=[a,b]", "model='mlp'"])
    rows = {r["run"]: r["params"] for r in report.collect(tmp_path / "m")}
    assert rows["0"] == {"optimizer.lr": 0.001, "tags": ["a", "b"], "model": "mlp"}
    assert rows["1"]["optimizer.lr"] == 0.1


def test_out_dir_elsewhere_links_the_plots_next_to_the_report(sweep_dir: Path, tmp_path: Path) -> None:
    out = report.make_report(sweep_dir, out_dir=tmp_path / "elsewhere" / "rep")
    md = out["markdown"].read_text()
    assert md.startswith("# Sweep report: sw\n")
    links = [line[line.index("](") + 2:-1] for line in md.splitlines() if line.startswith("![")]
    assert len(links) == 2 and all((out["markdown"].parent / link).is_file() for link in links)
