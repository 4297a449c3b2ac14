"""bench_probes: its exact-trace reference and a --quick run of the whole pipeline."""
from __future__ import annotations

import json

import pytest
from helpers_hessian import dense_hessian
import torch
from torch import nn

from shiftlab.experiments import bench_probes as bp


@pytest.mark.parametrize("bn", [False, True])
def test_exact_trace_of_a_piecewise_linear_net_matches_the_dense_hessian(bn):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.ReLU(), nn.Linear(6, 4)]
    model = nn.Sequential(*layers).double()
    x, y = torch.randn(20, 5, dtype=torch.double), torch.randint(0, 4, (20,))
    model.train()
    model(x)
    model.eval()  # eval-mode BatchNorm is affine: the net stays piecewise linear
    dense = dense_hessian(model, x, y)
    assert bp.exact_trace_piecewise_linear(model, x, y, chunk=7) == pytest.approx(
        float(torch.trace(dense)), rel=1e-9)


@pytest.mark.timeout(600)
def test_quick_run_writes_results(tmp_path):
    assert bp.main(["--quick", "--no-cockpit", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "bench_probes.png").stat().st_size > 0
    assert set(res["accuracy"]) == {"plain-eval", "bn-eval", "bn-train"}
    for rows in res["accuracy"].values():
        for row in rows.values():
            eig = row["eig"]
            assert eig["reference_converged"] and eig["lanczos_converged"]
            assert eig["lanczos_max_rel_err"] < 5e-3  # the target, on every checkpoint
    assert res["cost"]["plain"]["gradient_tests"]["ratio"] > 1
    for variant in ("plain-eval", "bn-eval"):  # the layer-factor trace is the exact trace
        for row in res["accuracy"][variant].values():
            if "trace" in row:
                assert row["trace"]["ggn_rel_err"] < 1e-5
    assert all(row["trace"]["ggn"] is None for row in res["accuracy"]["bn-train"].values() if "trace" in row)
    assert {"norm_test_layers", "norm_test_vmap", "trace_ggn", "trace_hutchinson"} <= set(res["cost"]["plain"])
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "| norm test alone |" in summary and "| TIC, diagonal form |" in summary
    assert set(bp.EXTRA_SETS) <= set(res["cost"]["plain"]) and not set(bp.EXTRA_SETS) & set(res["cost"]["bn"])
    tic_cost = res["cost"]["plain"]["tic_diag"]["ms_per_probe"]
    assert "hessian_diagonal" in tic_cost and "per_example_gradients" in tic_cost
    assert "update_size" in res["cost"]["plain"]["update_size"]["ms_per_probe"]  # its end point, a step later
    assert res["cockpit"] is None


def test_added_ms_per_probe_from_step_phases():
    import itertools

    dt = [0.001 + (0.005 if k % 10 == 0 else 0.002 if k % 10 == 1 else 0.0) for k in range(200)]
    dt[57] += 0.5  # another job interrupts one ordinary step: the medians ignore it
    ticks = [0.0, *itertools.accumulate(dt)]
    assert bp.added_ms_per_probe(ticks) == pytest.approx(7.0)


def test_extras_agreement_and_its_line():
    from shiftlab.experiments.bench_probes_cockpit import extras_agreement
    from shiftlab.experiments.bench_probes_report import extras_line

    h1, h2 = [3.0, 5.0, 2.0], [[1.0, 2.0], [3.0, 4.0]]
    values = {0: {"cockpit": {"TICDiag": 10.1, "TICTrace": 2.0, "GradHist1d": [4.0, 4.0, 2.0], "GradHist2d": h2},
                  "shiftlab": {"tic_diag": 10.0, "tic_trace": 2.0, "tic_diag_exact_reference": 10.0,
                               "tic_trace_exact_reference": 2.0, "grad_hist_1d": h1, "grad_hist_2d": h2,
                               "tic_hessian_diagonal": "layers"}}}
    e = extras_agreement(values)
    assert e["tic_diag_max_rel_diff_cockpit"] == pytest.approx(0.01) and e["tic_trace_max_rel_diff_cockpit"] == 0
    assert e["tic_diag_max_rel_diff_exact"] == 0 and e["tic_hessian_diagonal"] == ["layers"]
    assert e["grad_hist_1d_max_count_diff"] == 1 and e["grad_hist_1d_moved_fraction"] == pytest.approx(0.1)
    assert e["grad_hist_2d_max_count_diff"] == 0 and e["grad_hist_2d_moved_fraction"] == 0
    assert "diag 1.0e-02" in extras_line(e) and "1.0e+01% of elements" in extras_line(e)


def test_same_quantity_verdicts_use_the_runs_spread():
    from shiftlab.experiments.bench_probes_report import same_quantity_table

    res = {"cost": {"plain": {"tic_diag": {"added_ms_per_probe": 6.0, "added_ms_runs": [5.0, 6.0, 9.0]},
                              "grad_hist_1d": {"added_ms_per_probe": 20.0, "added_ms_runs": [19.0, 20.0, 21.0]},
                              "distance": {"added_ms_per_probe": 0.1, "added_ms_runs": [0.1, 0.1, 0.2]}}}}
    ck = {"added_ms_per_probe": {"TICDiag": 5.5, "GradHist1d": 15.0, "Distance": 0.3},
          "added_ms_runs": {"TICDiag": [5.2, 5.5, 5.9], "GradHist1d": [14.0, 15.0, 16.0], "Distance": [0.2, 0.3, 0.3]}}
    rows = {line.split("|")[1].strip(): line for line in same_quantity_table(res, ck) if line.startswith("| ")}
    assert rows["TIC, diagonal form"].endswith("| NO (within the runs' spread) |")
    assert "6.0 [5.0-9.0] (layer-factor GGN diagonal)" in rows["TIC, diagonal form"]
    assert rows["gradient histogram 1d"].endswith("| NO |")
    assert rows["distance from initialization"].endswith("| yes |")
    assert rows["update size"].endswith("| n/a |")
