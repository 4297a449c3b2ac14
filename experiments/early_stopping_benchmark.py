"""Benchmark v2 of early-stopping rules against two frontiers, on real learning curves.

Why frontiers: a rule trades epochs for regret, so "beats patience=10" says little -- no rule that
reads only the validation curve can match patience=10's regret with far fewer epochs. Each rule is
judged at its own epoch budget against two curves measured on the same runs:

* the **patience frontier**: Lightning-style patience, p = 1..30;
* the **validation-oracle frontier**: knowing the run's future validation minimum, stop at the
  first epoch whose validation loss is within ``tau`` (relative) of it and restore that epoch,
  tau in [0, 0.2]. It bounds what a rule reading only the validation curve can reach.

Per run, ``epochs`` = (stop epoch + 1) / horizon and ``regret`` = test loss at the restored epoch
minus the run's minimum test loss. A rule's point is the mean of both over runs; the frontiers
are interpolated (linearly in mean epochs; flat beyond their ends) at the rule's mean epochs, and

    gap closed = (R_patience(E) - R_rule) / (R_patience(E) - R_oracle(E)),

with a percentile bootstrap over runs (frontiers and rule resampled together). Tuning uses only
the tuning split; the report is on the held-out split, which holds whole (data set, model)
cells -- including the only ResNet cell and one chain-model cell -- so a tuned rule cannot
memorize a data set / architecture pair. Subgroups (data set, model family, optimizer, label
noise, batch regime, schedule) compare the rule with the subgroup's own patience frontier at the
rule's epochs there, with a bootstrap standard error of the difference.

Replay is cheap: each configuration was trained once (``experiments/early_stopping_corpus``)
and every rule reads the cached curves.

Usage::

    python -m shiftlab.experiments.early_stopping_corpus                # make / extend corpus v2 (cached)
    python -m shiftlab.experiments.early_stopping_benchmark             # replay, report, Pareto plot
    python -m shiftlab.experiments.early_stopping_benchmark --tune      # refit the learned rule (tuning split)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from shiftlab.callbacks.early_stopping import LEARNED_DELTA
from shiftlab.experiments.early_stopping_corpus import CORPUS_V1, CORPUS_V2, in_source_checkout, load_corpus

ROOT = Path(__file__).resolve().parent
OUT = Path("outputs") / "early_stopping_benchmark"  # under the working directory
PLOT_COPY = ROOT / "data" / "early_stopping_pareto.png"

FAMILY = {"mlp": "mlp", "cnn": "cnn", "resnet": "resnet", "crf": "chain",
          "position_softmax": "chain", "hmm": "chain"}
# Held-out cells: every data set and every model family of the tuning split appears, but never
# the same (data set, model) pair; resnet is seen only here.
HELD_OUT_CELLS = frozenset({("digits", "cnn"), ("digits", "resnet"), ("mnist1d", "mlp"),
                            ("synthetic", "cnn"), ("hmm_sequences", "position_softmax")})
PATIENCES = tuple(range(1, 31))
TAUS = tuple(float(t) for t in np.linspace(0.0, 0.2, 41))
SUBGROUP_KEYS = ("data", "family", "optimizer", "noise", "batch", "schedule")
GOAL_KEYS = ("data", "optimizer", "noise", "batch")  # the subgroups (others: shown only)


# ------------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------------
def noise_bucket(rate: float) -> str:
    if rate == 0:
        return "0"
    return "0.1-0.2" if rate <= 0.2 else ("0.3-0.4" if rate <= 0.4 else "0.6")


def _normalize(run: dict[str, Any], corpus: str) -> dict[str, Any]:
    se = run.get("val_loss_se")
    return {
        "id": run["id"], "corpus": corpus, "data": run["data"], "model": run["model"],
        "family": FAMILY[run["model"]], "optimizer": run["optimizer"],
        "schedule": run.get("schedule", "constant"), "label_noise": float(run["label_noise"]),
        "noise": noise_bucket(float(run["label_noise"])), "batch": run.get("batch", "mini"),
        "val_loss": [float(v) for v in run["val_loss"]],
        "val_loss_se": None if se is None else [float(v) for v in se],
        "train_loss": [float(v) for v in run["train_loss"]],
        "test_loss": [float(v) for v in run["test_loss"]],
    }


def load_runs(v1: Path | None = CORPUS_V1, v2: Path | None = CORPUS_V2) -> list[dict[str, Any]]:
    """Corpus v1 (72 constant-lr mini-batch curves, no standard errors) plus corpus v2; runs with
    a non-finite validation or test loss (diverged) are dropped."""
    runs = []
    if v1 is not None and v1.exists():
        runs += [_normalize(r, "v1") for r in json.loads(v1.read_text())["runs"]]
    if v2 is not None:
        runs += [_normalize(r, "v2") for r in load_corpus(v2)]
    return [r for r in runs if all(math.isfinite(v) for v in r["val_loss"] + r["test_loss"])]


def split_runs(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(tuning, held-out) by (data set, model) cell."""
    held = [r for r in runs if (r["data"], r["model"]) in HELD_OUT_CELLS]
    tune = [r for r in runs if (r["data"], r["model"]) not in HELD_OUT_CELLS]
    return tune, held


# ------------------------------------------------------------------------------------------------
# replay and frontiers
# ------------------------------------------------------------------------------------------------
def outcome(run: dict, stop: int, best: int) -> tuple[float, float]:
    """(fraction of the horizon trained, test-loss regret at the restored epoch)."""
    tl = run["test_loss"]
    return (stop + 1) / len(tl), tl[best] - min(tl)


def replay_rule(factory: Callable[[], Any], runs: Sequence[dict], use_se: bool = True
                ) -> np.ndarray:
    """Replay a fresh rule per run; returns (n, 2) of (epochs fraction, regret)."""
    from shiftlab.callbacks.early_stopping import replay

    out = np.empty((len(runs), 2))
    for i, run in enumerate(runs):
        d = replay(factory(), run["val_loss"], run["train_loss"],
                   val_se=run["val_loss_se"] if use_se else None)
        out[i] = outcome(run, d.stop_epoch, d.best_epoch)
    return out


def patience_frontier(runs: Sequence[dict], patiences: Sequence[int] = PATIENCES) -> np.ndarray:
    """(len(patiences), n, 2): Lightning-style patience (raw arg-min restored) per run."""
    out = np.empty((len(patiences), len(runs), 2))
    for j, run in enumerate(runs):
        v = run["val_loss"]
        for i, p in enumerate(patiences):
            best, wait, stop = 0, 0, len(v) - 1
            for t in range(1, len(v)):
                if v[t] < v[best]:
                    best, wait = t, 0
                else:
                    wait += 1
                    if wait >= p:
                        stop = t
                        break
            out[i, j] = outcome(run, stop, best)
    return out


def oracle_frontier(runs: Sequence[dict], taus: Sequence[float] = TAUS) -> np.ndarray:
    """(len(taus), n, 2): stop at the first epoch within ``tau`` (relative) of the run's future
    validation minimum and restore it."""
    out = np.empty((len(taus), len(runs), 2))
    for j, run in enumerate(runs):
        v = np.asarray(run["val_loss"])
        lo = v.min()
        for i, tau in enumerate(taus):
            t = int(np.argmax(v <= lo + tau * abs(lo)))
            out[i, j] = outcome(run, t, t)
    return out


def frontier_at(front: np.ndarray, idx: np.ndarray, epochs: float) -> float:
    """The frontier's mean regret over runs ``idx``, interpolated at mean epochs ``epochs``."""
    m = front[:, idx].mean(axis=1)
    order = np.argsort(m[:, 0], kind="stable")
    return float(np.interp(epochs, m[order, 0], m[order, 1]))


def gap_closed(rule: np.ndarray, pat: np.ndarray, orc: np.ndarray, idx: np.ndarray
               ) -> dict[str, float]:
    """Gap-closed score of ``rule`` on runs ``idx`` at its own mean epochs."""
    e, rr = rule[idx].mean(axis=0)
    rp, ro = frontier_at(pat, idx, e), frontier_at(orc, idx, e)
    gap = rp - ro
    return {"epochs": float(e), "regret": float(rr), "patience_regret": rp, "oracle_regret": ro,
            "gap_closed": float((rp - rr) / gap) if gap > 0 else math.nan}


def bootstrap(rule: np.ndarray, pat: np.ndarray, orc: np.ndarray, idx: np.ndarray,
              reps: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Point estimates plus percentile 95% intervals (runs resampled with replacement)."""
    rng = np.random.default_rng(seed)
    point = gap_closed(rule, pat, orc, idx)
    draws = {k: [] for k in point}
    for _ in range(reps):
        b = idx[rng.integers(0, len(idx), len(idx))]
        for k, v in gap_closed(rule, pat, orc, b).items():
            draws[k].append(v)
    ci = {f"{k}_ci": [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
          for k, v in draws.items()}
    se = {f"{k}_se": float(np.nanstd(v)) for k, v in draws.items()}
    return {**point, **ci, **se}


def subgroup_table(rule: np.ndarray, pat: np.ndarray, runs: Sequence[dict], idx: np.ndarray,
                   reps: int = 300, seed: int = 1) -> list[dict[str, Any]]:
    """Per subgroup of ``idx``: the rule's mean regret minus the subgroup's patience frontier at
    the rule's mean epochs there, with a bootstrap SE; ``worse`` when that exceeds one SE."""
    rng = np.random.default_rng(seed)
    rows = []
    for key in SUBGROUP_KEYS:
        for val in sorted({runs[i][key] for i in idx}):
            g = np.array([i for i in idx if runs[i][key] == val])

            def diff(s: np.ndarray) -> tuple[float, float, float]:
                e, rr = rule[s].mean(axis=0)
                rp = frontier_at(pat, s, e)
                return rr - rp, e, rp

            d, e, rp = diff(g)
            boots = [diff(g[rng.integers(0, len(g), len(g))])[0] for _ in range(reps)]
            se = float(np.std(boots)) if len(g) > 1 else math.inf
            p10 = pat[PATIENCES.index(10), g].mean(axis=0)
            rows.append({"key": key, "value": str(val), "n": int(len(g)), "epochs": e,
                         "regret": float(rule[g, 1].mean()), "patience_regret": rp,
                         "diff": d, "se": se, "worse": bool(d > se),
                         "p10_epochs": float(p10[0]), "p10_regret": float(p10[1])})
    return rows


# ------------------------------------------------------------------------------------------------
# the rules compared
# ------------------------------------------------------------------------------------------------
def candidates() -> list[tuple[str, Callable[[], Any]]]:
    """(label, factory) of every rule point on the plot; the default rule is ``curvature``."""
    from shiftlab.callbacks.early_stopping import make_rule

    def f(name: str, **kw: Any) -> Callable[[], Any]:
        return lambda: make_rule(name, **kw)

    return [
        ("curvature (default)", f("curvature")),
        ("quadratic (v1 default)", f("quadratic")),
        ("se_slope", f("se_slope")),
        ("forecast", f("forecast")),
        ("learned (p_stop=0.2)", f("learned")),
        ("patience=10", f("patience", patience=10)),
        ("GL_5", f("gl", alpha=5)),
        ("PQ_0.5", f("pq", alpha=0.5)),
        ("UP_3", f("up", s=3)),
    ]


# ------------------------------------------------------------------------------------------------
# tuning (tuning split only)
# ------------------------------------------------------------------------------------------------
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
    from shiftlab.callbacks.early_stopping import FEATURES, curve_features

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

    from shiftlab.callbacks.early_stopping import FEATURES

    x, y, w = learned_dataset(runs, target=target, delta=delta)
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=5000)
    model.fit(x, y, sample_weight=w * len(y) / w.sum())
    return {k: round(float(b), 4) for k, b in zip(FEATURES, model.coef_[0])}


def tune_rule(name: str, grid: dict[str, Sequence[Any]], runs: Sequence[dict],
              fixed: dict[str, Any] | None = None, subgroups: bool = False
              ) -> tuple[dict[str, Any], list[dict]]:
    """Grid search on ``runs``: among settings that use no more than ``EPOCH_MARGIN`` times
    patience=10's epochs on the same runs, the largest regret reduction over the patience frontier at the setting's own
    epochs (the gap-closed ratio's numerator: the ratio itself is erratic where the two
    frontiers nearly meet). ``subgroups``: also require that no data set / optimizer /
    label-noise / batch-regime subgroup of ``runs`` is worse than patience at matched epochs by
    more than one SE (the goal's own criteria, checked on the tuning runs)."""
    import itertools

    from shiftlab.callbacks.early_stopping import make_rule

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
                            if r["worse"] and r["key"] in GOAL_KEYS]
        table.append(row)
    ok = [t for t in table if t["epochs"] <= EPOCH_MARGIN * p10 and not t.get("worse")]
    best = max(ok or table, key=lambda t: t["patience_regret"] - t["regret"])
    return best["kwargs"], table


def cross_validate(runs: Sequence[dict], deltas: Sequence[float] = DELTAS
                   ) -> dict[float, dict[str, float]]:
    """Leave-one-(data set, model)-cell-out on ``runs`` (the tuning split): for each cell, fit
    the learned rule and tune ``p_stop`` / ``confirm`` on the other cells, replay it on the cell;
    score the pooled out-of-cell outcomes against the frontiers. Per ``delta``."""
    from shiftlab.callbacks.early_stopping import make_rule

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


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def plot(points: list[dict], pat: np.ndarray, orc: np.ndarray, idx: np.ndarray, path: Path,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    pm, om = pat[:, idx].mean(axis=1), orc[:, idx].mean(axis=1)
    ax.plot(pm[:, 0], pm[:, 1], "-o", color="tab:blue", ms=3, label="patience p=1..30")
    for p in (1, 5, 10, 20, 30):
        i = PATIENCES.index(p)
        ax.annotate(f"p={p}", pm[i], fontsize=7, xytext=(3, -9), textcoords="offset points",
                    color="tab:blue")
    ax.plot(om[:, 0], om[:, 1], "-o", color="tab:green", ms=3,
            label="validation oracle tau=0.2..0")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, pt in enumerate(points):
        (e0, e1), (r0, r1) = pt["epochs_ci"], pt["regret_ci"]
        star = pt["label"].startswith("curvature")
        ax.errorbar(pt["epochs"], pt["regret"], xerr=[[pt["epochs"] - e0], [e1 - pt["epochs"]]],
                    yerr=[[pt["regret"] - r0], [r1 - pt["regret"]]], fmt="*" if star else "s",
                    ms=13 if star else 6, color="tab:red" if star else colors[(k + 3) % 10],
                    capsize=2, label=pt["label"])
    ax.set_xlabel("mean fraction of the epoch budget trained")
    ax.set_ylabel("mean test-loss regret at the restored epoch")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(runs: list[dict], reps: int = 1000) -> dict[str, Any]:
    """Every candidate's point, score and intervals on the held-out split, plus the subgroup
    table of the default rule and the goal's checks."""
    tune, held = split_runs(runs)
    pat, orc = patience_frontier(held), oracle_frontier(held)
    idx = np.arange(len(held))
    p10 = pat[PATIENCES.index(10)].mean(axis=0)
    points, results = [], {}
    for label, factory in candidates():
        t0 = time.time()
        res = replay_rule(factory, held)
        pt = {"label": label, **bootstrap(res, pat, orc, idx, reps),
              "epochs_vs_p10": float(res[:, 0].mean() / p10[0]), "seconds": time.time() - t0}
        points.append(pt)
        results[label] = res
    default = results["curvature (default)"]
    sub = subgroup_table(default, pat, held, idx)
    d = points[0]
    goal = {"gap_closed": d["gap_closed"], "gap_closed_ci": d["gap_closed_ci"],
            "gap_closed_ge_0.5": d["gap_closed"] >= 0.5,
            "epochs_vs_p10": d["epochs_vs_p10"], "epochs_le_p10": d["epochs_vs_p10"] <= 1.0,
            "subgroups_worse": [f"{r['key']}={r['value']}" for r in sub
                                if r["worse"] and r["key"] in GOAL_KEYS],
            "other_subgroups_worse": [f"{r['key']}={r['value']}" for r in sub
                                      if r["worse"] and r["key"] not in GOAL_KEYS]}
    goal["met"] = goal["gap_closed_ge_0.5"] and goal["epochs_le_p10"] and not goal["subgroups_worse"]
    return {"n_tune": len(tune), "n_held": len(held), "points": points, "subgroups": sub,
            "goal": goal, "p10": {"epochs": float(p10[0]), "regret": float(p10[1])},
            "patience_frontier": pat[:, idx].mean(axis=1).tolist(),
            "oracle_frontier": orc[:, idx].mean(axis=1).tolist(), "_pat": pat, "_orc": orc}


def render(ev: dict[str, Any], runs: list[dict]) -> str:
    g = ev["goal"]
    n1 = sum(r["corpus"] == "v1" for r in runs)
    lines = [
        f"Corpus: {len(runs)} curves ({n1} v1 + {len(runs) - n1} v2); tuning split "
        f"{ev['n_tune']}, held-out split {ev['n_held']} (cells: "
        + ", ".join(f"{d}/{m}" for d, m in sorted(HELD_OUT_CELLS)) + ").",
        "",
        "| rule | epochs (frac.) | epochs / patience=10 | test-loss regret [95% CI] | "
        "patience at same epochs | oracle at same epochs | gap closed [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sorted(ev["points"], key=lambda p: p["epochs"]):
        lines.append(
            f"| {p['label']} | {p['epochs']:.3f} | {p['epochs_vs_p10']:.2f} | {p['regret']:.4f} "
            f"[{p['regret_ci'][0]:.4f}, {p['regret_ci'][1]:.4f}] | {p['patience_regret']:.4f} | "
            f"{p['oracle_regret']:.4f} | {p['gap_closed']:.2f} "
            f"[{p['gap_closed_ci'][0]:.2f}, {p['gap_closed_ci'][1]:.2f}] |")
    lines += ["", "Subgroups (held-out; default rule minus the subgroup's patience frontier at the "
              "rule's epochs; worse = difference > 1 SE):", "",
              "| subgroup | n | epochs | regret | patience at same epochs | difference +- SE | "
              "patience=10 epochs / regret | worse |", "|---|---|---|---|---|---|---|---|"]
    for r in ev["subgroups"]:
        lines.append(f"| {r['key']}={r['value']} | {r['n']} | {r['epochs']:.3f} | "
                     f"{r['regret']:.4f} | {r['patience_regret']:.4f} | {r['diff']:+.4f} +- "
                     f"{r['se']:.4f} | {r['p10_epochs']:.3f} / {r['p10_regret']:.4f} | "
                     f"{'**yes**' if r['worse'] else 'no'} |")
    lines += ["", f"Goal (gap closed >= 0.5 at the rule's own epochs, epochs <= patience=10, no "
              f"data set / optimizer / label-noise / batch-regime subgroup worse by > 1 SE): gap "
              f"closed {g['gap_closed']:.2f} [{g['gap_closed_ci'][0]:.2f}, "
              f"{g['gap_closed_ci'][1]:.2f}], epochs {g['epochs_vs_p10']:.2f} x patience=10, "
              f"subgroups worse: {', '.join(g['subgroups_worse']) or 'none'} (model family / "
              f"schedule, not part of the goal: {', '.join(g['other_subgroups_worse']) or 'none'})"
              f" -> met: {g['met']}."]
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--reps", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--v1", type=Path, default=CORPUS_V1, help="corpus v1 (json); 'none' skips it")
    ap.add_argument("--v2", type=Path, default=CORPUS_V2, help="corpus v2 (jsonl)")
    ap.add_argument("--tune", action="store_true",
                    help="refit the learned rule on the tuning split, choose p_stop / confirm "
                         "there, and print the numbers to paste into callbacks/early_stopping.py")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.reps < 10:
        print(f"shiftlab: error: --reps={args.reps} is not allowed; allowed: >= 10", file=sys.stderr)
        return 2
    runs = load_runs(None if str(args.v1) == "none" else args.v1, args.v2)
    if not runs:
        print("shiftlab: error: no cached curves; run python -m shiftlab.experiments.early_stopping_corpus",
              file=sys.stderr)
        return 2
    if args.tune:
        tune, _ = split_runs(runs)
        print(f"cross-validating on the {len(tune)} tuning curves (leave one cell out)")
        cv = cross_validate(tune)
        delta = max(cv, key=lambda d: cv[d]["gap_closed"] if cv[d]["epochs_vs_p10"] <= 1 else -1e9)
        coef = fit_learned(tune, delta=delta)
        kw, table = tune_rule("learned", TUNE_GRID, tune, {"coef": coef}, subgroups=True)
        others = {name: tune_rule(name, grid, tune) for name, grid in OTHER_GRIDS.items()}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tuning.json").write_text(json.dumps(
            {"cv": {str(k): v for k, v in cv.items()}, "grid": table,
             **{name: t for name, (_, t) in others.items()}}, indent=1))
        print(json.dumps({"delta": delta, "coef": coef,
                          **{k: v for k, v in kw.items() if k != "coef"},
                          **{name: k for name, (k, _) in others.items()}}, indent=1))
        return 0
    ev = evaluate(runs, args.reps)
    text = render(ev, runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {k: v for k, v in ev.items() if not k.startswith("_")}, indent=1))
    held = split_runs(runs)[1]
    plot(ev["points"], ev["_pat"], ev["_orc"], np.arange(len(held)), args.out / "pareto.png",
         f"Early stopping on {len(held)} held-out curves (data set / model cells not tuned on)")
    if args.v2 == CORPUS_V2 and in_source_checkout(PLOT_COPY):  # the README's copy: shipped corpus only
        PLOT_COPY.write_bytes((args.out / "pareto.png").read_bytes())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
