"""One cost budget for all probes of a run (probes.max_overhead)."""
from __future__ import annotations

import time

import pytest

from shiftlab.callbacks.probe_budget import ProbeBudget
from shiftlab.trainers.train import train


class _Spent:
    def __init__(self, s: float) -> None:
        self.cost_s = s


def test_allows_counts_every_probe_against_training_time():
    b = ProbeBudget(max_overhead=0.5)
    b._probes = [_Spent(1.0), _Spent(2.0)]
    b._fit_start = time.perf_counter() - 9.0  # 9 s of fit, 3 of them probing: 6 s of training
    assert b.spent() == 3.0 and b.train_seconds() == pytest.approx(6.0, abs=0.05)
    assert not b.allows(0.5)  # 3.5 > 0.5 * 6
    b2 = ProbeBudget(max_overhead=1.0)
    b2._probes, b2._fit_start = b._probes, b._fit_start
    assert b2.allows(2.5) and not b2.allows(3.5)
    assert ProbeBudget(None).allows(1e9)  # measured, not enforced
    with pytest.raises(ValueError, match="probes.max_overhead"):
        ProbeBudget(0)


@pytest.mark.parametrize("budget", [None, 0.001])
def test_run_budget_skips_probes_of_every_kind(run_cfg, budget):
    cfg = run_cfg("trainer.max_epochs=4", "callbacks=[none,sharpness,activation_drift]",
                  "callbacks.sharpness.every_n_epochs=1", "callbacks.sharpness.subset_size=64",
                  "callbacks.activation_drift.every_n_steps=5", f"probes.max_overhead={budget or 'null'}")
    s = train(cfg)
    assert s["status"] == "completed"
    assert s["probe_cost/total_s"] > 0 and s["probe_cost/overhead"] > 0
    skipped = s["probe_cost/sharpness_skipped"] if "probe_cost/sharpness_skipped" in s else 0
    if budget is None:
        assert skipped == 0
    else:  # a tiny budget: after each probe's first measurement, only the final epoch is measured
        assert s["probe_cost/max_overhead"] == budget
        assert skipped >= 2
