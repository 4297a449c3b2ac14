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

Because that held-out split was consulted while the default rule was designed, ``--eval fresh``
reports on the **fresh set** instead (``early_stopping_corpus --set fresh``): (data set, model)
cells and data variants corpus v2 never used, generated after the default was fixed and never
tuned on.

Replay is cheap: each configuration was trained once (``experiments/early_stopping_corpus``)
and every rule reads the cached curves.

Usage::

    python -m shiftlab.experiments.early_stopping_corpus                # make / extend corpus v2 (cached)
    python -m shiftlab.experiments.early_stopping_benchmark             # replay, report, Pareto plot
    python -m shiftlab.experiments.early_stopping_benchmark --eval fresh  # on the fresh set (no tuning)
    python -m shiftlab.experiments.early_stopping_benchmark --tune      # refit the learned rule (tuning split)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from shiftlab.experiments.early_stopping_corpus import CORPUS_FRESH, CORPUS_V1, CORPUS_V2, in_source_checkout
from shiftlab.experiments.early_stopping_frontiers import (GOAL_KEYS, HELD_OUT_CELLS, PATIENCES, bootstrap,
                                                           load_runs, oracle_frontier, patience_frontier,
                                                           replay_rule, split_runs, subgroup_table)
from shiftlab.experiments.early_stopping_tuning import (OTHER_GRIDS, TUNE_GRID, cross_validate, fit_learned,
                                                        tune_robust, tune_rule)

ROOT = Path(__file__).resolve().parent
OUT = Path("outputs") / "early_stopping_benchmark"  # under the working directory
PLOT_COPY = {"held_out": ROOT / "data" / "early_stopping_pareto.png",
             "fresh": ROOT / "data" / "early_stopping_pareto_fresh.png"}


# ------------------------------------------------------------------------------------------------
# the rules compared
# ------------------------------------------------------------------------------------------------
def candidates() -> list[tuple[str, Callable[[], Any]]]:
    """(label, factory) of every rule point on the plot; the default rule is ``curvature``."""
    from shiftlab.callbacks.stopping_rules import make_rule

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
# report
# ------------------------------------------------------------------------------------------------
def plot(points: list[dict], pat: np.ndarray, orc: np.ndarray, idx: np.ndarray, path: Path,
         title: str) -> None:
    from shiftlab.experiments import harness

    plt = harness.plt()
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
    harness.savefig(fig, path, dpi=110)


def evaluate(held: list[dict], reps: int = 1000) -> dict[str, Any]:
    """Every candidate's point, score and intervals on the evaluation curves ``held`` (the
    held-out split, or the fresh set), plus the subgroup table of the default rule and the
    goal's checks. Nothing here is tuned."""
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
    return {"n_held": len(held), "points": points, "subgroups": sub,
            "goal": goal, "p10": {"epochs": float(p10[0]), "regret": float(p10[1])},
            "patience_frontier": pat[:, idx].mean(axis=1).tolist(),
            "oracle_frontier": orc[:, idx].mean(axis=1).tolist(), "_pat": pat, "_orc": orc}


def describe(which: str, runs: list[dict], ev: dict[str, Any]) -> str:
    """One line saying which curves the report is on."""
    if which == "fresh":
        cells = sorted({(r["data"], r["model"]) for r in runs})
        return (f"Fresh held-out set: {len(runs)} curves generated after the default rule was "
                f"fixed, never used for tuning or design (cells: "
                + ", ".join(f"{d}/{m}" for d, m in cells) + ").")
    n1 = sum(r["corpus"] == "v1" for r in runs)
    return (f"Corpus: {len(runs)} curves ({n1} v1 + {len(runs) - n1} v2); tuning split "
            f"{ev['n_tune']}, held-out split {ev['n_held']} (cells: "
            + ", ".join(f"{d}/{m}" for d, m in sorted(HELD_OUT_CELLS)) + ").")


def render(ev: dict[str, Any], header: str) -> str:
    g = ev["goal"]
    lines = [
        header,
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
    lines += ["", "Subgroups (evaluation curves; default rule minus the subgroup's patience frontier at the "
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
    ap.add_argument("--eval", choices=("held_out", "fresh"), default="held_out",
                    help="report on corpus v2's held-out split, or on the fresh set (--fresh)")
    ap.add_argument("--fresh", type=Path, default=CORPUS_FRESH, help="the fresh set (jsonl)")
    ap.add_argument("--tune", action="store_true",
                    help="refit the learned rule on the tuning split, choose p_stop / confirm "
                         "there, and print the numbers to paste into "
                         "callbacks/stopping_rules/learned.py")
    ap.add_argument("--tune-robust", action="store_true",
                    help="re-choose the default's p_stop / confirm / min_behind on the tuning split "
                         "with the subgroup condition over every subgroup key; print the table")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.reps < 10:
        print(f"shiftlab: error: --reps={args.reps} is not allowed; allowed: >= 10", file=sys.stderr)
        return 2
    runs = load_runs(None if str(args.v1) == "none" else args.v1, args.v2)
    if not runs:
        print("shiftlab: error: no cached curves; run python -m shiftlab.experiments.early_stopping_corpus",
              file=sys.stderr)
        return 2
    tune, held = split_runs(runs)
    if args.tune:
        return _tune(tune, args.out)
    if args.tune_robust:
        kw, table = tune_robust(tune)
        for t in sorted(table, key=lambda t: t["regret"] - t["patience_regret"])[:8]:
            print(f"{t['kwargs']}: epochs {t['epochs']:.3f}, regret {t['regret']:.4f}, patience "
                  f"{t['patience_regret']:.4f}, gap closed {t['gap_closed']:.2f}, worse: {t['worse']}")
        print(f"chosen on the {len(tune)} tuning curves: {kw}")
        return 0
    if args.eval == "fresh":
        held = load_runs(None, args.fresh)
        if not held:
            print(f"shiftlab: error: --fresh={args.fresh} is not allowed; allowed: a cached fresh set "
                  "(python -m shiftlab.experiments.early_stopping_corpus --set fresh)", file=sys.stderr)
            return 2
    ev = evaluate(held, args.reps)
    ev["n_tune"] = len(tune)
    text = render(ev, describe(args.eval, held if args.eval == "fresh" else runs, ev))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {k: v for k, v in ev.items() if not k.startswith("_")}, indent=1))
    title = (f"Early stopping on {len(held)} fresh curves (cells and variants never used in design)"
             if args.eval == "fresh" else
             f"Early stopping on {len(held)} held-out curves (data set / model cells not tuned on)")
    plot(ev["points"], ev["_pat"], ev["_orc"], np.arange(len(held)), args.out / "pareto.png", title)
    shipped = args.v2 == CORPUS_V2 and (args.eval == "held_out" or args.fresh == CORPUS_FRESH)
    copy = PLOT_COPY[args.eval]
    if shipped and in_source_checkout(copy):  # the README's copy: shipped corpora only
        copy.write_bytes((args.out / "pareto.png").read_bytes())
    print(text)
    return 0


def _tune(tune: list[dict], out: Path) -> int:
    print(f"cross-validating on the {len(tune)} tuning curves (leave one cell out)")
    cv = cross_validate(tune)
    delta = max(cv, key=lambda d: cv[d]["gap_closed"] if cv[d]["epochs_vs_p10"] <= 1 else -1e9)
    coef = fit_learned(tune, delta=delta)
    kw, table = tune_rule("learned", TUNE_GRID, tune, {"coef": coef}, subgroups=True)
    others = {name: tune_rule(name, grid, tune) for name, grid in OTHER_GRIDS.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").write_text(json.dumps(
        {"cv": {str(k): v for k, v in cv.items()}, "grid": table,
         **{name: t for name, (_, t) in others.items()}}, indent=1))
    print(json.dumps({"delta": delta, "coef": coef,
                      **{k: v for k, v in kw.items() if k != "coef"},
                      **{name: k for name, (k, _) in others.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
