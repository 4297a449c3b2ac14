"""The early-stopping benchmark's frontier and score math on tiny hand-made curves, and the
corpus builder's caching (fast: no corpus is read)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from shiftlab.callbacks.stopping_rules import replay
from shiftlab.experiments import early_stopping_benchmark as bench
from shiftlab.experiments import early_stopping_frontiers as B
from shiftlab.experiments.early_stopping_tuning import tune_rule
from shiftlab.experiments.early_stopping_corpus import design, design_fresh, load_corpus
from shiftlab.experiments.early_stopping_curves import _summary


def run(val, test, data="digits", model="mlp", **kw):
    base = {"id": f"{data}-{model}-{len(val)}-{val[0]}", "corpus": "v2", "data": data,
            "model": model, "family": B.FAMILY[model], "optimizer": "adam",
            "schedule": "constant", "label_noise": 0.0, "noise": "0", "batch": "mini",
            "val_loss": list(map(float, val)), "val_loss_se": None,
            "train_loss": [1.0] * len(val), "test_loss": list(map(float, test))}
    return base | kw


CURVES = [
    run([3, 2, 1.05, 1, 1.2, 1.3, 1.4, 1.5], [3, 2, 1.1, 1.0, 0.9, 1.3, 1.4, 1.6]),
    run([2, 1.5, 1.6, 1.7, 1.0, 0.8, 0.9, 1.0], [2, 1.5, 1.6, 1.7, 1.0, 0.7, 0.9, 1.0]),
]


def test_patience_frontier_matches_the_patience_rule():
    front = B.patience_frontier(CURVES, patiences=(1, 2, 3))
    for i, p in enumerate((1, 2, 3)):
        for j, r in enumerate(CURVES):
            d = replay("patience", r["val_loss"], patience=p)
            assert tuple(front[i, j]) == pytest.approx(B.outcome(r, d.stop_epoch, d.best_epoch))
    # curve 1 with p=1: epoch 2 does not improve on 1.5 -> stop at 2, restore 1 (test 1.5)
    assert tuple(front[0, 1]) == pytest.approx((3 / 8, 1.5 - 0.7))


def test_oracle_frontier_stops_within_tau_of_the_future_minimum():
    front = B.oracle_frontier(CURVES[:1], taus=(0.0, 0.06, 1.0))
    # val minimum 1.0 at index 3; 1.05 (index 2) is within 6 %; 3 is within 200 % only
    assert tuple(front[0, 0]) == pytest.approx((4 / 8, 1.0 - 0.9))
    assert tuple(front[1, 0]) == pytest.approx((3 / 8, 1.1 - 0.9))
    assert tuple(front[2, 0]) == pytest.approx((2 / 8, 2.0 - 0.9))  # 2 <= 1 * (1 + 1)


def test_frontier_interpolates_linearly_and_is_flat_beyond_its_ends():
    # two frontier points over one run: (0.2, 0.3) and (0.6, 0.1)
    front = np.array([[[0.6, 0.1]], [[0.2, 0.3]]])
    idx = np.array([0])
    assert B.frontier_at(front, idx, 0.4) == pytest.approx(0.2)
    assert B.frontier_at(front, idx, 0.1) == pytest.approx(0.3)
    assert B.frontier_at(front, idx, 0.9) == pytest.approx(0.1)


def test_gap_closed_is_zero_on_patience_and_one_on_the_oracle():
    pat = np.array([[[0.2, 0.3], [0.2, 0.5]], [[0.6, 0.1], [0.6, 0.1]]])  # means (.2,.4), (.6,.1)
    orc = np.array([[[0.2, 0.1], [0.2, 0.1]], [[0.6, 0.0], [0.6, 0.0]]])  # (.2,.1), (.6,0)
    idx = np.arange(2)
    on_pat = np.array([[0.4, 0.25], [0.4, 0.25]])  # patience at 0.4: 0.25; oracle: 0.05
    assert B.gap_closed(on_pat, pat, orc, idx)["gap_closed"] == pytest.approx(0.0)
    on_orc = np.array([[0.4, 0.05], [0.4, 0.05]])
    g = B.gap_closed(on_orc, pat, orc, idx)
    assert g["gap_closed"] == pytest.approx(1.0)
    assert (g["patience_regret"], g["oracle_regret"]) == pytest.approx((0.25, 0.05))
    half = np.array([[0.3, 0.10], [0.5, 0.20]])  # mean (0.4, 0.15): half the gap
    assert B.gap_closed(half, pat, orc, idx)["gap_closed"] == pytest.approx(0.5)


def test_bootstrap_interval_contains_the_point_and_is_seeded():
    rng = np.random.default_rng(0)
    n = 40
    pat = np.stack([np.stack([np.full(n, e), rng.gamma(2, r / 2, n)], axis=1)
                    for e, r in ((0.2, 0.4), (0.6, 0.1))])
    orc = np.stack([np.stack([np.full(n, e), rng.gamma(2, r / 2, n)], axis=1)
                    for e, r in ((0.2, 0.1), (0.6, 0.0))])
    rule = np.stack([np.full(n, 0.4), rng.gamma(2, 0.08, n)], axis=1)
    idx = np.arange(n)
    a = B.bootstrap(rule, pat, orc, idx, reps=200, seed=3)
    b = B.bootstrap(rule, pat, orc, idx, reps=200, seed=3)
    assert a == b
    lo, hi = a["gap_closed_ci"]
    assert lo <= a["gap_closed"] <= hi and hi - lo > 0
    assert a["epochs_ci"] == pytest.approx([0.4, 0.4])


def test_subgroup_table_flags_a_group_worse_than_patience_by_more_than_one_se():
    runs = [run([1, 0.5], [1, 0.5], optimizer=opt) for opt in ["adam"] * 6 + ["sgd"] * 6]
    pat = np.zeros((len(B.PATIENCES), 12, 2))
    pat[:, :, 0] = 0.5
    rule = np.zeros((12, 2))
    rule[:, 0] = 0.5
    rule[6:, 1] = [0.1, 0.12, 0.11, 0.09, 0.1, 0.1]  # sgd: clearly worse than patience (0)
    rows = {(r["key"], r["value"]): r for r in B.subgroup_table(rule, pat, runs, np.arange(12))}
    assert not rows[("optimizer", "adam")]["worse"]
    assert rows[("optimizer", "sgd")]["worse"]
    assert rows[("optimizer", "sgd")]["diff"] == pytest.approx(0.1033, abs=1e-3)
    assert rows[("data", "digits")]["n"] == 12


def test_split_keeps_each_data_model_cell_on_one_side():
    runs = [run([1, 0.5], [1, 0.5], data=d, model=m)
            for d, m in [("digits", "mlp"), ("digits", "cnn"), ("digits", "resnet"),
                         ("mnist1d", "mlp"), ("mnist1d", "cnn"), ("hmm_sequences", "crf")]]
    tune, held = B.split_runs(runs)
    assert {(r["data"], r["model"]) for r in held} == {("digits", "cnn"), ("digits", "resnet"),
                                                       ("mnist1d", "mlp")}
    assert len(tune) + len(held) == len(runs)
    assert {r["family"] for r in tune} >= {"mlp", "cnn", "chain"}


def test_tune_rule_respects_the_patience10_epoch_budget():
    r = [run([3, 2, 1.5, 1.2, 1.1, 1.05, 1.0, 1.0, 1.01, 1.02, 1.03, 1.04, 1.05] + [1.1] * 20,
             [3, 2, 1.5, 1.2, 1.1, 1.05, 1.0, 1.0, 1.01, 1.02, 1.03, 1.04, 1.05] + [1.1] * 20)]
    kw, table = tune_rule("patience", {"patience": [1, 5, 25]}, r)
    assert len(table) == 3
    p10 = B.patience_frontier(r, (10,))[0, :, 0].mean()
    assert all(t["epochs"] <= p10 for t in table if t["kwargs"] == kw)
    assert kw["patience"] != 25  # 25 uses more epochs than patience=10


def test_corpus_design_is_deterministic_and_covers_the_grid():
    assert design(7) == design(7) and design(7)["id"] != design(8)["id"]
    cfgs = [design(i) for i in range(300)]
    assert {c["data"] for c in cfgs} == {"digits", "mnist1d", "synthetic", "hmm_sequences"}
    assert {c["model"] for c in cfgs} >= {"mlp", "cnn", "resnet", "crf", "position_softmax", "hmm"}
    assert {c["optimizer"] for c in cfgs} == {"sgd", "momentum", "adam", "adamw"}
    assert {c["schedule"] for c in cfgs} == {"constant", "step", "cosine"}
    assert {c["batch"] for c in cfgs} == {"mini", "full"}
    assert min(c["epochs"] for c in cfgs) == 50 and max(c["epochs"] for c in cfgs) == 300
    assert max(c["label_noise"] for c in cfgs) == 0.6


def test_load_corpus_skips_a_truncated_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "a"}) + "\n" + '{"id": "b", "val_lo')
    assert [r["id"] for r in load_corpus(path)] == ["a"]


def test_standard_error_is_the_ratio_estimator():
    import torch

    nll = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mean, se = _summary(nll, torch.ones(4))
    assert mean == pytest.approx(3.0)
    assert se == pytest.approx(float(nll.std()) / 2.0)
    # token-weighted (chain models): the mean is per token
    mean_w, _ = _summary(nll, torch.tensor([1.0, 1.0, 1.0, 3.0]))
    assert mean_w == pytest.approx(12.0 / 6.0)


def test_train_curve_records_standard_errors_on_a_tiny_run():
    from shiftlab.experiments.early_stopping_curves import train_curve

    cfg = design(3) | {"data": "digits", "model": "mlp", "epochs": 3, "batch": "full",
                       "batch_size": 0, "train_fraction": 0.25}
    out = train_curve(cfg)
    assert all(len(v) == 3 for v in out.values())
    assert all(math.isfinite(v) and v > 0 for v in out["val_loss_se"])
    assert all(0 <= a <= 1 for a in out["test_acc"])


def test_benchmark_command_writes_report_and_plot_on_a_tiny_corpus(tmp_path):
    import random

    rng = random.Random(0)
    lines = []
    for i, (d, m) in enumerate([("digits", "mlp"), ("digits", "cnn"), ("mnist1d", "mlp"),
                                ("synthetic", "mlp")] * 3):
        t0 = rng.randint(10, 30)
        val = [0.5 + ((t - t0) / 30) ** 2 + rng.gauss(0, 0.01) for t in range(60)]
        test = [v + rng.gauss(0, 0.01) for v in val]
        lines.append(json.dumps({"id": f"r{i}", "data": d, "model": m, "optimizer": "adam",
                                 "label_noise": 0.2, "val_loss": val, "val_loss_se": [0.01] * 60,
                                 "train_loss": [1 / (1 + t) for t in range(60)],
                                 "test_loss": test}))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert bench.main(["--v1", "none", "--v2", str(corpus), "--out", str(out), "--reps", "20"]) == 0
    report = (out / "report.md").read_text()
    assert "| curvature (default) |" in report and "-> met:" in report
    res = json.loads((out / "results.json").read_text())
    assert res["n_held"] == 6 and res["n_tune"] == 6
    assert (out / "pareto.png").stat().st_size > 10_000
    assert bench.main(["--reps", "3"]) == 2  # bad input: one line, exit code 2


def test_fresh_set_shares_no_cell_seed_or_id_with_corpus_v2():
    v2 = [design(i) for i in range(400)]
    fresh = [design_fresh(i) for i in range(200)]
    v2_cells = {(c["data"], c["model"]) for c in v2}
    assert not v2_cells & {(c["data"], c["model"]) for c in fresh}
    assert not {c["seed"] for c in v2} & {c["seed"] for c in fresh}
    assert not {c["id"] for c in v2} & {c["id"] for c in fresh}
    assert design_fresh(7) == design_fresh(7)  # run i is always the same run
    hmm = [c for c in fresh if c["source"] == "hmm_sequences"]
    assert hmm and all(c["data_kw"]["hmm_seed"] >= 20 for c in hmm)  # v2 drew chains 0..4


def test_fresh_variants_train_a_few_epochs():
    from shiftlab.experiments.early_stopping_curves import train_curve

    seen = set()
    for i in range(60):
        cfg = design_fresh(i)
        if cfg["data"] in seen or cfg["model"] == "hmm":
            continue
        seen.add(cfg["data"])
        out = train_curve(cfg | {"epochs": 2, "batch": "full", "batch_size": 0,
                                 "train_fraction": 0.25})
        assert len(out["val_loss"]) == 2 and all(v > 0 for v in out["val_loss"]), cfg["id"]
    assert len(seen) == 4


def test_benchmark_reports_on_the_fresh_set(tmp_path):
    import random

    rng = random.Random(1)
    lines = []
    for i in range(8):
        t0 = rng.randint(10, 30)
        val = [0.5 + ((t - t0) / 30) ** 2 + rng.gauss(0, 0.01) for t in range(50)]
        lines.append(json.dumps({"id": f"f{i}", "data": "synthetic_clusters", "model": "vgg",
                                 "optimizer": "nesterov", "schedule": "warmup_cosine",
                                 "label_noise": 0.5, "val_loss": val, "val_loss_se": [0.01] * 50,
                                 "train_loss": [1 / (1 + t) for t in range(50)],
                                 "test_loss": [v + 0.01 for v in val]}))
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    v2 = tmp_path / "none.jsonl"
    v2.write_text(lines[0] + "\n")
    assert bench.main(["--v1", "none", "--v2", str(v2), "--eval", "fresh", "--fresh", str(fresh),
                       "--out", str(out), "--reps", "20"]) == 0
    report = (out / "report.md").read_text()
    assert report.startswith("Fresh held-out set: 8 curves") and "synthetic_clusters/vgg" in report
    assert json.loads((out / "results.json").read_text())["n_held"] == 8
    assert bench.main(["--v2", str(v2), "--eval", "fresh", "--fresh", str(tmp_path / "no.jsonl")]) == 2
