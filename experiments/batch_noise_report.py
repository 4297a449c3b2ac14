"""Report of the batch-noise study: figures, ``results.csv`` and ``summary.md`` from finished runs.

Why a module of its own: :mod:`shiftlab.experiments.batch_noise` launches the sweep; this one only
reads its runs (records from ``batch_noise.collect_runs``) and states each paper's claim next to what
was measured. Every number is a mean with its spread over seeds (pandas, through the harness).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pandas as pd

from shiftlab.experiments.batch_noise import (COLORS, GEIPING_CLIP, REGIME_ORDER, _momentum, choose_lrs,
                                              first_epoch_reaching)
from shiftlab.experiments import harness
from shiftlab.experiments.harness import fmt_mean_std as _pm
from shiftlab.experiments.harness import epoch_axis, machine, mean_curve, mean_std as _mean_std, plot_mean_spread, plt, to_float

_float = to_float


def _final(run: dict, key: str) -> float:
    v = _float(run["summary"].get(key))
    if math.isfinite(v):
        return v
    curve = run["curves"].get(key)
    return curve[-1][1] if curve else math.nan


def _mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float], list[float]]:
    return mean_curve(r["curves"].get(key, []) for r in runs)


def _group(runs: list[dict]) -> dict[tuple[str, float], list[dict]]:
    g: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        g.setdefault((r["regime"], r["noise"]), []).append(r)
    return g


def make_plots(runs: list[dict], out: Path, title: str) -> list[str]:
    plt_ = plt()
    out.mkdir(parents=True, exist_ok=True)
    groups = _group(runs)
    regimes = [r for r in REGIME_ORDER if any(k[0] == r for k in groups)]
    noises = sorted({k[1] for k in groups})
    files = []

    # 1. test accuracy vs label noise
    fig, ax = plt_.subplots(figsize=(6.4, 4.4))
    for reg in regimes:
        xs, ms, ss = [], [], []
        for n in noises:
            m, s, k = _mean_std([_final(r, "test/acc") for r in groups.get((reg, n), [])])
            if k:
                xs.append(n), ms.append(100 * m), ss.append(100 * s)
        plot_mean_spread(ax, xs, ms, ss, label=reg, color=COLORS.get(reg))
    ax.set_xlabel("label noise (fraction of training labels corrupted)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}: test accuracy vs label noise (mean ± sd over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    harness.savefig(fig, out / "test_acc_vs_noise.png")
    files.append("test_acc_vs_noise.png")

    # 2. memorization curves (noise > 0)
    noisy = [n for n in noises if n > 0]
    if noisy:
        rows = 1  # legend row under the panels
        fig, axes = plt_.subplots(1, len(noisy), figsize=(max(6.4, 4.2 * len(noisy)), 4.7 + 0.25 * rows),
                                 squeeze=False)
        for ax, n in zip(axes[0], noisy):
            for reg in regimes:
                rs = groups.get((reg, n), [])
                e, v, sd = _mean_curve(rs, "mem/corrupt_acc_given")
                plot_mean_spread(ax, e, v, sd, label=f"{reg} corrupted (given label)", color=COLORS.get(reg),
                                 scale=100, style="band")
                e, v, sd = _mean_curve(rs, "mem/clean_acc")
                plot_mean_spread(ax, e, v, sd, label=f"{reg} clean", color=COLORS.get(reg), scale=100,
                                 style="band", ls="--", lw=1, marker=None)
            ax.set_title(f"label noise {n:g}", fontsize=9)
            epoch_axis(ax)
            ax.set_ylabel("training accuracy (%)")
            ax.set_ylim(0, 101)
            ax.grid(alpha=0.3)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=COLORS.get(reg), label=reg) for reg in regimes]
        fig.legend(handles=handles, fontsize=8, ncol=min(6, len(regimes)), loc="lower center")
        fig.suptitle(f"{title}: memorization (Zhang et al. 2017)\nsolid: corrupted samples scored "
                     "against their given (wrong) label; dashed: clean samples\nbands: ± sd over seeds", fontsize=9)
        fig.tight_layout(rect=(0, 0.06 + 0.04 * rows, 1, 1))
        fig.savefig(out / "memorization.png", dpi=120)
        plt_.close(fig)
        files.append("memorization.png")

    # 3. sharpness at the end
    fig, axes = plt_.subplots(1, 2, figsize=(10, 4.0))
    width = 0.8 / max(1, len(noises))
    for ax, key, label in ((axes[0], "sharpness/top_eigenvalue", "top Hessian eigenvalue"),
                           (axes[1], "sharpness/trace", "Hessian trace (Hutchinson)")):
        for j, n in enumerate(noises):
            xs, ms, ss = [], [], []
            for i, reg in enumerate(regimes):
                m, s, k = _mean_std([_final(r, key) for r in groups.get((reg, n), [])])
                if k:
                    xs.append(i + (j - (len(noises) - 1) / 2) * width), ms.append(m), ss.append(s)
            ax.bar(xs, ms, width=width, yerr=ss, capsize=2, label=f"noise {n:g}")
        ax.set_xticks(range(len(regimes)), regimes, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(label + " at the end")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: sharpness of the training loss at the end of training", fontsize=9)
    harness.savefig(fig, out / "sharpness_end.png")
    files.append("sharpness_end.png")

    # 4. B_simple over training
    fig, axes = plt_.subplots(1, len(noises), figsize=(max(6.4, 4.2 * len(noises)), 4.0), squeeze=False)
    for ax, n in zip(axes[0], noises):
        for reg in regimes:
            e, v, sd = _mean_curve(groups.get((reg, n), []), "noise/b_simple")
            plot_mean_spread(ax, e, v, sd, label=reg, color=COLORS.get(reg), style="band", marker=".")
        ax.set_yscale("log")
        epoch_axis(ax)
        ax.set_ylabel("B_simple = tr(Sigma) / |G|^2")
        ax.set_title(f"label noise {n:g}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}: simple gradient noise scale B_simple (McCandlish et al. 2018) over training,"
                 "\nmean ± sd over seeds", fontsize=9)
    harness.savefig(fig, out / "b_simple.png")
    files.append("b_simple.png")
    return files


RESULT_KEYS = ["test/acc", "train/loss", "train/acc", "train/acc_vs_true_labels", "val/acc", "mem/clean_acc",
               "mem/corrupt_acc_given", "mem/corrupt_acc_true", "sharpness/top_eigenvalue",
               "sharpness/trace", "noise/b_simple", "wall_time_s", "global_step", "epochs_run"]


def write_results_csv(runs: list[dict], path: Path) -> None:
    """One row per run: its grid point, status and final figures (summary, else the curve's last value)."""
    frame = pd.DataFrame([{**{k: r[k] for k in ("phase", "regime", "noise", "seed", "lr")},
                           "status": r["summary"].get("status"), **{k: _final(r, k) for k in RESULT_KEYS},
                           "dir": r["dir"], "_order": REGIME_ORDER.index(r["regime"])} for r in runs])
    frame.sort_values(["phase", "_order", "noise", "seed", "lr"]).drop(columns="_order").to_csv(path, index=False, na_rep="nan")


CLAIMS = {
    "keskar": ("Keskar et al. 2017", "Large-batch (and full-batch) training converges to sharper "
               "minima of the training loss and generalizes worse than small-batch SGD."),
    "geiping": ("Geiping et al. 2022", "Full-batch gradient descent can match SGD once it gets "
                "gradient clipping and an explicit gradient-norm penalty (computed by finite "
                "differences), plus longer training."),
    "zhang": ("Zhang et al. 2017", "Networks fit corrupted (even random) labels to ~100% training "
              "accuracy; the time to fit grows only by a small factor with the corruption level."),
}


def _delta(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean difference a - b and a rough standard error from the two seed spreads."""
    ma, sa, na = _mean_std(a)
    mb, sb, nb = _mean_std(b)
    se = math.sqrt((sa**2 / na if na else 0) + (sb**2 / nb if nb else 0))
    return ma - mb, se


def claims_section(runs: list[dict], noises: list[float]) -> list[str]:
    g = _group(runs)
    have = {k[0] for k in g}
    lines = ["## Claims next to measurements", ""]
    small = next((r for r in ("mini32", "mini128", "mini512") if r in have), None)

    def vals(reg: str, n: float, key: str) -> list[float]:
        return [_final(r, key) for r in g.get((reg, n), [])]

    def verdict(d: float, se: float, sign: int) -> str:
        if not math.isfinite(d):
            return "n/a"
        if se == 0.0:
            return ("agrees" if d * sign > 0 else "disagrees") + " (single seed: no error bar)"
        if abs(d) <= 2 * se:
            return "no clear difference (within 2 standard errors)"
        return "agrees" if d * sign > 0 else "disagrees"

    name, claim = CLAIMS["keskar"]
    lines += [f"### {name}", f"Claim: {claim}", ""]
    large = [r for r in ("mini512", "full") if r in have and r != small]
    if small and large:
        lines += [f"Measured: each large-batch regime against {small} (top-eigenvalue ratio of the means; "
                  "test accuracy difference, mean ± standard error over seeds):", "",
                  f"| noise | regime | top eig / {small} | test acc - {small} (pp) | sharper? | worse? |",
                  "|---|---|---|---|---|---|"]
        for n in noises:
            for big in large:
                eb, _, _ = _mean_std(vals(big, n, "sharpness/top_eigenvalue"))
                es, _, _ = _mean_std(vals(small, n, "sharpness/top_eigenvalue"))
                ratio = eb / es if es and math.isfinite(eb) and math.isfinite(es) else math.nan
                d, se = _delta(vals(big, n, "test/acc"), vals(small, n, "test/acc"))
                dl, sel = _delta(vals(big, n, "sharpness/top_eigenvalue"),
                                 vals(small, n, "sharpness/top_eigenvalue"))
                lines.append(f"| {n:g} | {big} | {ratio:.2f} | {100 * d:+.1f} ± {100 * se:.1f} | "
                             f"{verdict(dl, sel, +1)} | {verdict(d, se, -1)} |")
        lines.append("")
    else:
        lines += ["Not measured in this sweep (needs mini32/mini128 and mini512 or full).", ""]
    name, claim = CLAIMS["geiping"]
    lines += [f"### {name}", f"Claim: {claim}", ""]
    if small and "full" in have:
        fixes = [r for r in ("full_clip", "full_clip_gnp") if r in have]
        lines += ["Measured (test accuracy, mean ± sd over seeds, %):", "",
                  "| noise | full | " + " | ".join(fixes) + f" | {small} | gap to {small} closed by the fixes? |",
                  "|---|---|" + "---|" * len(fixes) + "---|---|"]
        for n in noises:
            cells = [_pm(vals(reg, n, "test/acc"), 100) for reg in ["full", *fixes, small]]
            best_fix = fixes[-1] if fixes else "full"
            d_gap, se_gap = _delta(vals(best_fix, n, "test/acc"), vals(small, n, "test/acc"))
            d_gain, se_gain = _delta(vals(best_fix, n, "test/acc"), vals("full", n, "test/acc"))
            closed = ("n/a" if not fixes else
                      f"{best_fix} vs full: {100 * d_gain:+.1f} pp ({verdict(d_gain, se_gain, +1)}); "
                      f"remaining gap to {small}: {100 * d_gap:+.1f} pp")
            lines.append(f"| {n:g} | " + " | ".join(cells) + f" | {closed} |")
        lines.append("")
    else:
        lines += ["Not measured in this sweep (needs full and a mini-batch regime).", ""]
    name, claim = CLAIMS["zhang"]
    lines += [f"### {name}", f"Claim: {claim}", "",
              "Measured: accuracy on the corrupted training samples against their given (wrong) label at "
              "the end (memorization; chance is 10%), and the first epoch at which it reached 50% "
              "(mean over the runs that reached it; in optimizer steps: epoch x steps/epoch):", "",
              "| regime | " + " | ".join(f"noise {n:g}" for n in noises if n > 0) + " |",
              "|---|" + "---|" * len([n for n in noises if n > 0])]
    for reg in [r for r in REGIME_ORDER if r in have]:
        cells = []
        for n in [n for n in noises if n > 0]:
            rs = g.get((reg, n), [])
            fe = _mean_std([first_epoch_reaching(r["curves"].get("mem/corrupt_acc_given", []), 0.5) for r in rs])
            reached = sum(1 for r in rs if math.isfinite(first_epoch_reaching(
                r["curves"].get("mem/corrupt_acc_given", []), 0.5)))
            spe = _mean_std([_float(r["summary"].get("global_step")) / max(1.0, _float(r["summary"].get("epochs_run")))
                             for r in rs])[0]
            ep = f"epoch {fe[0]:.0f} = {fe[0] * spe:.0f} steps" if fe[2] else "never"
            cells.append(f"{_pm(vals(reg, n, 'mem/corrupt_acc_given'), 100)}% ({ep}, {reached}/{len(rs)} runs)")
        lines.append(f"| {reg} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def write_summary(runs: list[dict], tune_runs: list[dict], out: Path, meta: dict[str, Any], plots: list[str]) -> None:
    g = _group(runs)
    regimes = [r for r in REGIME_ORDER if any(k[0] == r for k in g)]
    noises = sorted({k[1] for k in g})
    best, table = choose_lrs(tune_runs) if tune_runs else ({}, {})
    lines = [f"# Full-batch vs mini-batch training on noisy labels ({meta.get('experiment', '?')})", ""]
    lines += [f"- Command: `{meta.get('command', '?')}`",
              f"- Machine: {meta.get('machine', machine())}",
              f"- Date (UTC): {meta.get('date', time.strftime('%Y-%m-%d %H:%M', time.gmtime()))}; "
              f"wall time of the sweep: {meta.get('wall_s', 'n/a')} s",
              f"- Grid run: label noise {noises}, regimes {regimes}, seeds per cell: "
              f"{sorted({len(v) for v in g.values()})}, epochs: {meta.get('epochs', '?')} (matched across regimes)",
              f"- Extra overrides: {meta.get('extra') or 'none'}; gradient-norm penalty alpha = "
              f"{meta.get('gnp_alpha', '?')}, clip = {GEIPING_CLIP}",
              ""]
    if table:
        lines += ["## Learning rate per regime", "",
                  f"Tuned at label noise {meta.get('tune_noise', 0)}, seed {meta.get('tune_seed', 0)}, on the "
                  "final validation accuracy (clean validation labels); the chosen lr is used at every noise level.",
                  "The last column is the stability bound of gradient descent with heavy-ball momentum "
                  "beta on a quadratic, 2(1+beta)/lr at the peak lr (the cosine schedule lowers lr later): full-batch GD cannot settle where the top Hessian "
                  "eigenvalue exceeds it (edge of stability), so end-of-training sharpness partly reflects "
                  "the tuned lr.",
                  "", "| regime | grid: final val acc (%) | chosen lr | at grid edge? | 2(1+beta)/lr |",
                  "|---|---|---|---|---|"]
        beta = _momentum(runs[0]["dir"]) if runs else math.nan
        for reg in [r for r in REGIME_ORDER if r in table]:
            t = table[reg]
            cells = ", ".join(f"{lr:g}: {100 * a:.1f}" if math.isfinite(a) else f"{lr:g}: diverged/failed"
                              for lr, a in sorted(t.items()))
            edge = "yes" if best[reg] in (min(t), max(t)) and len(t) > 1 else "no"
            lines.append(f"| {reg} | {cells} | {best[reg]:g} | {edge} | {2 * (1 + beta) / best[reg]:.3g} |")
        lines.append("")
    else:
        used = {reg: sorted({r["lr"] for r in runs if r["regime"] == reg}) for reg in regimes}
        lines += ["## Learning rate per regime", "", "Given, not tuned in this sweep: " +
                  ", ".join(f"{reg} {'/'.join(f'{lr:g}' for lr in lrs)}" for reg, lrs in used.items()), ""]
    lines += ["## Test accuracy (%), mean ± sd over seeds", "",
              "| regime | steps/epoch | " + " | ".join(f"noise {n:g}" for n in noises) + " |",
              "|---|---|" + "---|" * len(noises)]
    for reg in regimes:
        steps = [_float(r["summary"].get("global_step")) / max(1, _float(r["summary"].get("epochs_run")))
                 for rs in g.values() for r in rs if r["regime"] == reg]
        spe = f"{_mean_std(steps)[0]:.0f}" if steps else "?"
        lines.append(f"| {reg} | {spe} | " + " | ".join(_pm([_final(r, 'test/acc') for r in g.get((reg, n), [])], 100)
                                                     for n in noises) + " |")
    lines += ["", "## Sharpness at the end (top Hessian eigenvalue / Hutchinson trace, training loss "
              "on a fixed 512-sample training subset, given labels)", "",
              "| regime | " + " | ".join(f"noise {n:g}" for n in noises) + " |", "|---|" + "---|" * len(noises)]
    for reg in regimes:
        cells = []
        for n in noises:
            rs = g.get((reg, n), [])
            cells.append(f"{_pm([_final(r, 'sharpness/top_eigenvalue') for r in rs], 1, 2)} / "
                         f"{_pm([_final(r, 'sharpness/trace') for r in rs], 1, 1)}")
        lines.append(f"| {reg} | " + " | ".join(cells) + " |")
    lines += ["", "## Gradient noise scale B_simple (first probe -> last probe, mean over seeds)", "",
              "| regime | " + " | ".join(f"noise {n:g}" for n in noises) + " |", "|---|" + "---|" * len(noises)]
    for reg in regimes:
        cells = []
        for n in noises:
            _, v, _ = _mean_curve(g.get((reg, n), []), "noise/b_simple")
            cells.append(f"{v[0]:.0f} -> {v[-1]:.0f}" if v else "n/a")
        lines.append(f"| {reg} | " + " | ".join(cells) + " |")
    lines += [""]
    lines += claims_section(runs, noises)
    lines += ["## Figures", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["Each number above comes from `results.csv` in this folder (one row per run); the verdicts "
              "are computed from the sign of the difference and a 2-standard-error band over seeds.", ""]
    (out / "summary.md").write_text("\n".join(lines))


