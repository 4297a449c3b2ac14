"""Tuning the learned early-stopping rule on the tuning split only (``early_stopping_benchmark
--tune``): the training set of the logistic rule, its fit, a grid search under an epoch budget and
leave-one-cell-out cross-validation.

Why its own module: tuning must only ever see the tuning split; keeping it apart from the report
makes that easy to check.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from shiftlab.callbacks.stopping_rules import LEARNED_DELTA
from shiftlab.experiments.early_stopping_frontiers import (GOAL_KEYS, PATIENCES, SUBGROUP_KEYS, gap_closed,
                                                           oracle_frontier, patience_frontier, replay_rule,
                                                           subgroup_table)

EPOCH_MARGIN = 0.9  # tune to <= 90% of patience=10's epochs, so the budget holds on new curves
TUNE_GRID = {"p_stop": [0.3, 0.5, 0.7], "confirm": [1, 2], "min_behind": [0, 2, 5]}
OTHER_GRIDS = {  # the other new rules get the same tuning (their shipped defaults come from it)
    "forecast": {"p_stop": [0.1, 0.2, 0.35, 0.5], "min_delta": [0.005, 0.01, 0.03],
                 "horizon_frac": [0.5, 1.0], "confirm": [1, 2]},
    "se_slope": {"z": [1.0, 2.0, 3.0], "min_delta": [0.002, 0.005, 0.01, 0.03], "confirm": [1, 3]},
}
# LEARNED_DELTA: "the validation loss still beats its running best by more than delta" (log
# scale), chosen among DELTAS by leave-one-cell-out cross-validation on the tuning split
DELTAS = (0.005, 0.01, 0.02, 0.03, 0.05)
# ``--tune-robust``: the default's p_stop / confirm / min_behind re-chosen with the subgroup
# condition over every subgroup key (model family and schedule too), on the tuning split
ROBUST_GRID = {"p_stop": [0.2, 0.3, 0.4, 0.5, 0.7], "confirm": [1, 2, 3], "min_behind": [0, 2, 5]}


def learned_dataset(runs: Sequence[dict], warmup: int = 5, window: int = 8,
                    target: str = "val", delta: float = LEARNED_DELTA
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, weights) over every post-warm-up epoch of ``runs``.

    ``target="val"`` (the default rule's): label 1 when the validation loss later improves on
    the running best by more than ``delta`` (log scale), each run weighing 1 in total.
    ``target="cost"`` (cost-sensitive): label 1 when going on to the run's validation minimum lowers the test loss
    at the restored epoch, weighted by how much it changes it (plus a floor of 1e-3), so the
    classifier spends its capacity on the stops that cost regret (worse in cross-validation:
    a few runs with large gains dominate the fit)."""
    from shiftlab.callbacks.stopping_rules import FEATURES, curve_features

    xs, ys, ws = [], [], []
    for run in runs:
        v, tr, se = run["val_loss"], run["train_loss"], run["val_loss_se"] or []
        if min(v) <= 0:
            continue
        lv = np.log(v)
        fut_min = np.minimum.accumulate(lv[::-1])[::-1]  # min over t..T-1
        test, final = run["test_loss"], int(np.argmin(v))
        best, rows, cw = 0, 0, []
        for t in range(len(v) - 1):
            if v[t] < v[best]:
                best = t
            if t < warmup:
                continue
            f = curve_features(v[:t + 1], tr[:t + 1], se[:t + 1], best, window)
            xs.append([f[k] for k in FEATURES])
            if target == "val":
                ys.append(float(lv[best] - fut_min[t + 1] > delta))
            else:
                gain = test[best] - test[final]
                ys.append(float(gain > 0))
                cw.append(abs(gain) + 1e-3)
            rows += 1
        ws += cw if target != "val" else [1.0 / max(rows, 1)] * rows
    return np.asarray(xs), np.asarray(ys), np.asarray(ws)


def fit_learned(runs: Sequence[dict], c: float = 1.0, target: str = "val",
                delta: float = LEARNED_DELTA) -> dict[str, float]:
    """Logistic regression of :func:`learned_dataset` (no intercept: ``bias`` is a feature)."""
    from sklearn.linear_model import LogisticRegression

    from shiftlab.callbacks.stopping_rules import FEATURES

    x, y, w = learned_dataset(runs, target=target, delta=delta)
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=5000)
    model.fit(x, y, sample_weight=w * len(y) / w.sum())
    return {k: round(float(b), 4) for k, b in zip(FEATURES, model.coef_[0])}


def tune_rule(name: str, grid: dict[str, Sequence[Any]], runs: Sequence[dict],
              fixed: dict[str, Any] | None = None, subgroups: bool = False,
              keys: Sequence[str] = GOAL_KEYS) -> tuple[dict[str, Any], list[dict]]:
    """Grid search on ``runs``: among settings that use no more than ``EPOCH_MARGIN`` times
    patience=10's epochs on the same runs, the largest regret reduction over the patience frontier at the setting's own
    epochs (the gap-closed ratio's numerator: the ratio itself is erratic where the two
    frontiers nearly meet). ``subgroups``: also require that no subgroup of ``runs`` along
    ``keys`` (default: data set / optimizer / label noise / batch regime) is worse than patience at matched epochs by
    more than one SE (the goal's own criteria, checked on the tuning runs)."""
    import itertools

    from shiftlab.callbacks.stopping_rules import make_rule

    pat, orc = patience_frontier(runs), oracle_frontier(runs)
    idx = np.arange(len(runs))
    p10 = pat[PATIENCES.index(10), :, 0].mean()
    table = []
    for values in itertools.product(*grid.values()):
        kw = {**(fixed or {}), **dict(zip(grid, values))}
        res = replay_rule(lambda: make_rule(name, **kw), runs)
        row = {"kwargs": kw, **gap_closed(res, pat, orc, idx)}
        if subgroups:
            sub = subgroup_table(res, pat, runs, idx, reps=200)
            row["worse"] = [f"{r['key']}={r['value']}" for r in sub
                            if r["worse"] and r["key"] in keys]
        table.append(row)
    ok = [t for t in table if t["epochs"] <= EPOCH_MARGIN * p10 and not t.get("worse")]
    best = max(ok or table, key=lambda t: t["patience_regret"] - t["regret"])
    return best["kwargs"], table


def cross_validate(runs: Sequence[dict], deltas: Sequence[float] = DELTAS
                   ) -> dict[float, dict[str, float]]:
    """Leave-one-(data set, model)-cell-out on ``runs`` (the tuning split): for each cell, fit
    the learned rule and tune ``p_stop`` / ``confirm`` on the other cells, replay it on the cell;
    score the pooled out-of-cell outcomes against the frontiers. Per ``delta``."""
    from shiftlab.callbacks.stopping_rules import make_rule

    cells = sorted({(r["data"], r["model"]) for r in runs})
    pat, orc = patience_frontier(runs), oracle_frontier(runs)
    idx = np.arange(len(runs))
    p10 = pat[PATIENCES.index(10), :, 0].mean()
    out = {}
    for delta in deltas:
        res = np.zeros((len(runs), 2))
        for cell in cells:
            fit_on = [r for r in runs if (r["data"], r["model"]) != cell]
            held = [i for i, r in enumerate(runs) if (r["data"], r["model"]) == cell]
            coef = fit_learned(fit_on, delta=delta)
            kw, _ = tune_rule("learned", TUNE_GRID, fit_on, {"coef": coef})
            res[held] = replay_rule(lambda: make_rule("learned", **kw), [runs[i] for i in held])
        g = gap_closed(res, pat, orc, idx)
        out[delta] = {**g, "epochs_vs_p10": g["epochs"] / p10}
        print(f"  delta={delta}: {out[delta]}", flush=True)
    return out


def tune_robust(runs: Sequence[dict]) -> tuple[dict[str, Any], list[dict]]:
    """``curvature``'s settings chosen like the shipped default but with no subgroup of any key
    (data set, model family, optimizer, label noise, batch regime, schedule) of the tuning
    ``runs`` worse than patience by more than one SE."""
    return tune_rule("curvature", ROBUST_GRID, runs, subgroups=True, keys=SUBGROUP_KEYS)
