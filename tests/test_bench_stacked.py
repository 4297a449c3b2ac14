"""experiments/bench_stacked.py: the launcher's fallback lines are read back, the hand-written loop trains
shiftlab's model, and a --quick run times a real stacked multirun and writes its JSON and PNG."""
from __future__ import annotations

import json

from conftest import compose_cfg
from shiftlab.experiments import bench_stacked as bench
from shiftlab.experiments import harness

CONSOLE = """shiftlab: stacked: jobs #0 #2 train as one stacked model (2 members)
shiftlab: stacked: job #1 (seed=1 optimizer=lbfgs) runs alone: optimizer=torch.optim.LBFGS: only elementwise SGD
shiftlab: completed test/acc=0.9 val/acc=0.9; run directory: /x/0
"""


def test_fallback_lines_are_parsed_and_shown_in_the_table():
    fb = bench.fallbacks(CONSOLE)
    assert fb == [{"job": 1, "overrides": "seed=1 optimizer=lbfgs",
                   "reason": "optimizer=torch.optim.LBFGS: only elementwise SGD"}]
    rows = [{"setup": "s", "k": 3, "method": "stacked", "wall_s": 2.0, "cpu_s": 1.5, "samples_per_s": 9.0,
             "peak_rss_mib": 500.0, "fell_back": fb},
            {"setup": "s", "k": 3, "method": "basic", "wall_s": 5.0, "cpu_s": 4.5, "samples_per_s": 3.6,
             "peak_rss_mib": 510.0}]
    line = bench.table(rows).splitlines()[1]
    assert "2.50x" in line and "1/3 jobs ran alone (optimizer=torch.optim.LBFGS" in line
    assert bench.fallbacks("shiftlab: stacked: jobs #0 #1 train as one stacked model (2 members)") == []


def test_hand_loop_trains_the_configured_model(tmp_path):
    cfg = compose_cfg(bench.SETUPS["default_norm_none"] + bench.QUIET + ["trainer.max_epochs=2", "seed=3"])
    got = bench.hand_loop(cfg, "cpu")
    dm, _ = harness.build(cfg)  # the plain run's split
    assert got["n_train"] == len(dm.train_set) and got["val_acc"] > 0.5 and got["test_acc"] > 0.5  # chance: 0.1


def test_quick_run_times_a_stacked_multirun(tmp_path):
    result = bench.main(["--quick", "--ks", "2", "--methods", "stacked", "--out", str(tmp_path)])
    (row,) = result["rows"]
    assert row["method"] == "stacked" and row["jobs"] == 2 and row["stacked_jobs"] == 2 and row["fell_back"] == []
    assert row["wall_s"] > 0 and row["cpu_s"] > 0 and row["peak_rss_mib"] > 100 and row["samples_per_s"] > 0
    assert json.loads((tmp_path / "bench_stacked.json").read_text())["rows"] == result["rows"]
    assert (tmp_path / "bench_stacked.png").stat().st_size > 0 and result["meta"]["threads"] == 1
