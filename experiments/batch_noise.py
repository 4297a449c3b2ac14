"""Full-batch vs mini-batch training on label-corrupted data: sweep, then figures + summary.

One command runs the study (``python -m shiftlab.experiments.batch_noise run``):

1. **tune**: for every batching regime, a Hydra multirun over that regime's learning-rate grid at
   ``label_noise=tune_noise`` (default 0), one seed; the lr with the best final ``val/acc`` (clean
   validation labels) is kept for the regime;
2. **sweep**: Hydra multiruns over label noise x seeds for every regime at its tuned lr and the same
   number of epochs (matched epochs, so full batch takes one step per epoch where mini-batch 32
   takes ``N/32``);
3. **aggregate**: ``report/`` with PNGs (test accuracy vs noise, memorization curves, sharpness at
   the end, B_simple over training), ``results.csv`` and ``summary.md`` stating each paper's claim
   next to what was measured.

Regimes: ``full`` (exact full-batch GD), ``full_clip`` (+ gradient clipping at 0.25, Geiping et al.
2022), ``full_clip_gnp`` (+ the finite-difference gradient-norm penalty), ``mini32``, ``mini128``,
``mini512``. Each training run is an ordinary ``shiftlab-train experiment=batch_noise ...`` run,
so any run can be reproduced alone from its ``.hydra/overrides.yaml``.

``--quick`` shrinks everything (2 noise levels, 1 seed, 4 regimes, 2-point lr grids, few epochs, 30%
of the training data) to check the pipeline (3.6 min wall on the loaded 2-core CI-class VM). ``aggregate --out DIR``
rebuilds the report from finished runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence


# ------------------------------------------------------------------------------------------------
# what is swept
# ------------------------------------------------------------------------------------------------
GEIPING_CLIP = 0.25  # Geiping et al. 2022 clip the gradient norm at 0.25
REGIMES: dict[str, list[str]] = {
    "full": ["batching=full"],
    "full_clip": ["batching=full", f"batching.clip_grad_norm={GEIPING_CLIP}"],
    "full_clip_gnp": ["batching=full", f"batching.clip_grad_norm={GEIPING_CLIP}",
                      "batching.grad_norm_penalty=${gnp_alpha}"],
    "mini32": ["batching=mini", "batching.batch_size=32"],
    "mini128": ["batching=mini", "batching.batch_size=128"],
    "mini512": ["batching=mini", "batching.batch_size=512"],
}
REGIME_ORDER = list(REGIMES)
BATCH_OF = {"mini32": 32, "mini128": 128, "mini512": 512}
COLORS = {"full": "#d62728", "full_clip": "#ff7f0e", "full_clip_gnp": "#8c564b",
          "mini32": "#1f77b4", "mini128": "#2ca02c", "mini512": "#9467bd"}
# Runs of every launch share these overrides: quiet logs, no rich widgets in a multirun.
QUIET = ["print_config=false", "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null",
         "trainer.enable_model_summary=false", "callbacks.model_summary=null"]


@dataclass
class Profile:
    """A sweep: which experiment config, grid, epochs and lr grids."""

    experiment: str
    epochs: int
    noise: list[float]
    seeds: list[int]
    regimes: list[str]
    lr_grids: dict[str, list[float]]
    gnp_alpha: float = 0.1
    tune_noise: float = 0.0
    tune_seed: int = 0
    extra: list[str] = field(default_factory=list)


FULL_GRID = [0.3, 1.0, 3.0]
PROFILES: dict[str, Profile] = {
    # mnist1d MLP on CPU. Heavy-ball momentum 0.9; one half-decade grid per regime, larger for
    # larger batches (linear-scaling intuition), the middle value near where short runs trained.
    "cpu": Profile(
        experiment="batch_noise", epochs=100, noise=[0.0, 0.2, 0.4, 0.6], seeds=[0, 1, 2],
        regimes=REGIME_ORDER,
        lr_grids={"mini32": [0.01, 0.03, 0.1], "mini128": [0.03, 0.1, 0.3],
                  "mini512": [0.1, 0.3, 1.0], "full": FULL_GRID, "full_clip": FULL_GRID,
                  "full_clip_gnp": FULL_GRID},
    ),
    # CIFAR-10 ResNet-20 on one GPU (configs/experiment/batch_noise_cifar10.yaml).
    "gpu": Profile(
        experiment="batch_noise_cifar10", epochs=200, noise=[0.0, 0.2, 0.4, 0.6], seeds=[0, 1, 2],
        regimes=REGIME_ORDER,
        lr_grids={"mini32": [0.01, 0.03], "mini128": [0.03, 0.1], "mini512": [0.1, 0.3],
                  "full": [0.2, 0.4, 0.8], "full_clip": [0.2, 0.4, 0.8], "full_clip_gnp": [0.2, 0.4, 0.8]},
    ),
}


def quick(profile: Profile) -> Profile:
    """A minutes-long version of ``profile`` that exercises every stage."""
    regimes = [r for r in ("full", "full_clip_gnp", "mini32", "mini512") if r in profile.regimes]
    grids = {r: profile.lr_grids[r][-2:] for r in regimes}
    return replace(profile, epochs=min(profile.epochs, 8), noise=[0.0, 0.4], seeds=[0], regimes=regimes,
                   lr_grids=grids, extra=profile.extra + ["data.train_fraction=0.3"])


# ------------------------------------------------------------------------------------------------
# launching
# ------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One Hydra multirun: one regime, a list of lrs x noise levels x seeds."""

    phase: str
    regime: str
    lrs: list[float]
    noise: list[float]
    seeds: list[int]
    dir: str

    @property
    def n_jobs(self) -> int:
        return len(self.lrs) * len(self.noise) * len(self.seeds)


def _fmt(values: Iterable[Any]) -> str:
    return ",".join(repr(float(v)) if isinstance(v, float) else str(v) for v in values)


def launch_command(p: Profile, launch: Launch) -> list[str]:
    regime = [o.replace("${gnp_alpha}", repr(float(p.gnp_alpha))) for o in REGIMES[launch.regime]]
    return [
        sys.executable, "-m", "shiftlab.trainers.train", "-m", f"experiment={p.experiment}", *regime,
        f"optimizer.lr={_fmt(launch.lrs)}", f"data.label_noise={_fmt(launch.noise)}",
        f"seed={_fmt(launch.seeds)}", f"trainer.max_epochs={p.epochs}",
        f"hydra.sweep.dir={launch.dir}", "hydra.sweep.subdir=${hydra.job.num}", *QUIET, *p.extra,
    ]


def _is_done(launch: Launch) -> bool:
    d = Path(launch.dir)
    return (d / "launch.json").exists() and len(list(d.glob("*/summary.json"))) >= launch.n_jobs


def run_launches(p: Profile, launches: list[Launch], jobs: int, niceness: int, dry_run: bool) -> None:
    """Run the multiruns, ``jobs`` at a time, longest first; finished ones are skipped."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per run: 2+ threads per tiny run thrash
    env.setdefault("MKL_NUM_THREADS", "1")
    env.setdefault("WANDB_MODE", "offline")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH", "")]))
    cost = {r: (BATCH_OF.get(r) and 4096 / BATCH_OF[r]) or 4 for r in REGIMES}
    todo = sorted((ln for ln in launches if not _is_done(ln)), key=lambda ln: -cost[ln.regime] * ln.n_jobs)

    def one(launch: Launch) -> int:
        cmd = launch_command(p, launch)
        d = Path(launch.dir)
        d.mkdir(parents=True, exist_ok=True)
        if dry_run:
            print(" ".join(cmd))
            return 0
        t0 = time.perf_counter()
        with open(d / "launch.log", "w") as log:
            rc = subprocess.call(cmd, cwd=os.getcwd(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=(lambda: os.nice(niceness)) if niceness else None)
        meta = {**asdict(launch), "command": cmd, "returncode": rc,
                "wall_s": round(time.perf_counter() - t0, 1)}
        (d / "launch.json").write_text(json.dumps(meta, indent=2))
        print(f"[batch_noise] {launch.phase}/{Path(launch.dir).name}: rc={rc} "
              f"{meta['wall_s']} s ({launch.n_jobs} runs)", flush=True)
        return rc

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))


def tune_launches(p: Profile, out: Path) -> list[Launch]:
    return [Launch("tune", r, list(p.lr_grids[r]), [p.tune_noise], [p.tune_seed], str(out / "tune" / r))
            for r in p.regimes]


def sweep_launches(p: Profile, out: Path, lrs: dict[str, float]) -> list[Launch]:
    # one multirun per regime (noise x seeds inside): the interpreter start-up is paid once
    return [Launch("sweep", r, [lrs[r]], list(p.noise), list(p.seeds), str(out / "sweep" / r))
            for r in p.regimes]


# ------------------------------------------------------------------------------------------------
# reading finished runs
# ------------------------------------------------------------------------------------------------
def _overrides(run_dir: Path) -> dict[str, str]:
    import yaml

    path = run_dir / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.exists() else []
    return dict(o.split("=", 1) for o in items or [] if "=" in o)


def _momentum(run_dir: str) -> float:
    """``optimizer.momentum`` of a finished run (0 when the optimizer has none)."""
    import yaml

    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.exists():
        return math.nan
    cfg = yaml.safe_load(path.read_text()) or {}
    return _float((cfg.get("optimizer") or {}).get("momentum", 0.0))


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` as ``{key: [(epoch, value), ...]}`` (last value per epoch)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return {}
    per_epoch: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            epoch = row.get("epoch")
            if epoch in (None, ""):
                continue
            e = int(float(epoch))
            for k, v in row.items():
                if k in ("epoch", "step") or v in (None, ""):
                    continue
                per_epoch.setdefault(k, {})[e] = _float(v)
    return {k: sorted(d.items()) for k, d in per_epoch.items()}


def collect_runs(root: Path) -> list[dict[str, Any]]:
    """One record per finished run under ``root`` (any depth), with its regime and curves."""
    runs = []
    for summary_path in sorted(root.glob("**/summary.json")):
        run_dir = summary_path.parent
        launch_path = run_dir.parent / "launch.json"
        if not launch_path.exists():
            continue
        launch = json.loads(launch_path.read_text())
        ov = _overrides(run_dir)
        summary = json.loads(summary_path.read_text())
        runs.append({
            "phase": launch["phase"], "regime": launch["regime"], "dir": str(run_dir),
            "lr": _float(ov.get("optimizer.lr")), "noise": _float(ov.get("data.label_noise")),
            "seed": int(_float(ov.get("seed", 0))), "summary": summary, "curves": read_curves(run_dir),
        })
    return runs


def choose_lrs(tune_runs: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """Best final ``val/acc`` per regime (diverged or failed runs count as -inf; ties: smaller lr)."""
    table: dict[str, dict[float, float]] = {}
    for r in tune_runs:
        s = r["summary"]
        acc = _float(s.get("val/acc")) if s.get("status") == "completed" else -math.inf
        table.setdefault(r["regime"], {})[r["lr"]] = acc if math.isfinite(acc) else -math.inf
    best = {reg: max(sorted(t), key=lambda lr: t[lr]) for reg, t in table.items()}
    return best, table


# ------------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    v = [x for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
    if not v:
        return math.nan, math.nan, 0
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd, len(v)


def _pm(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    m, sd, n = _mean_std(values)
    if n == 0:
        return "n/a"
    return f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}" if n > 1 else f"{m * scale:.{digits}f}"


def _final(run: dict, key: str) -> float:
    v = _float(run["summary"].get(key))
    if math.isfinite(v):
        return v
    curve = run["curves"].get(key)
    return curve[-1][1] if curve else math.nan


def first_epoch_reaching(curve: list[tuple[int, float]], level: float) -> float:
    """First epoch (1-based) whose value is >= ``level``; NaN if never."""
    for e, v in curve:
        if v >= level:
            return float(e + 1)
    return math.nan


def _mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    by_epoch: dict[int, list[float]] = {}
    for r in runs:
        for e, v in r["curves"].get(key, []):
            if math.isfinite(v):
                by_epoch.setdefault(e, []).append(v)
    epochs = sorted(by_epoch)
    return [e + 1 for e in epochs], [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]


def _group(runs: list[dict]) -> dict[tuple[str, float], list[dict]]:
    g: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        g.setdefault((r["regime"], r["noise"]), []).append(r)
    return g


def make_plots(runs: list[dict], out: Path, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    groups = _group(runs)
    regimes = [r for r in REGIME_ORDER if any(k[0] == r for k in groups)]
    noises = sorted({k[1] for k in groups})
    files = []

    # 1. test accuracy vs label noise
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for reg in regimes:
        xs, ms, ss = [], [], []
        for n in noises:
            m, s, k = _mean_std([_final(r, "test/acc") for r in groups.get((reg, n), [])])
            if k:
                xs.append(n), ms.append(100 * m), ss.append(100 * s)
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=reg, color=COLORS.get(reg))
    ax.set_xlabel("label noise (fraction of training labels corrupted)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}: test accuracy vs label noise (mean ± sd over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "test_acc_vs_noise.png", dpi=120)
    plt.close(fig)
    files.append("test_acc_vs_noise.png")

    # 2. memorization curves (noise > 0)
    noisy = [n for n in noises if n > 0]
    if noisy:
        rows = 1  # legend row under the panels
        fig, axes = plt.subplots(1, len(noisy), figsize=(max(6.4, 4.2 * len(noisy)), 4.4 + 0.25 * rows),
                                 squeeze=False)
        for ax, n in zip(axes[0], noisy):
            for reg in regimes:
                rs = groups.get((reg, n), [])
                e, v = _mean_curve(rs, "mem/corrupt_acc_given")
                ax.plot(e, [100 * x for x in v], color=COLORS.get(reg), label=f"{reg} corrupted (given label)")
                e, v = _mean_curve(rs, "mem/clean_acc")
                ax.plot(e, [100 * x for x in v], color=COLORS.get(reg), ls="--", lw=1, label=f"{reg} clean")
            ax.set_title(f"label noise {n:g}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylabel("training accuracy (%)")
            ax.set_ylim(0, 101)
            ax.grid(alpha=0.3)
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=COLORS.get(reg), label=reg) for reg in regimes]
        fig.legend(handles=handles, fontsize=8, ncol=min(6, len(regimes)), loc="lower center")
        fig.suptitle(f"{title}: memorization (Zhang et al. 2017)\nsolid: corrupted samples scored "
                     "against their given (wrong) label; dashed: clean samples", fontsize=9)
        fig.tight_layout(rect=(0, 0.06 + 0.04 * rows, 1, 1))
        fig.savefig(out / "memorization.png", dpi=120)
        plt.close(fig)
        files.append("memorization.png")

    # 3. sharpness at the end
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0))
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
    fig.tight_layout()
    fig.savefig(out / "sharpness_end.png", dpi=120)
    plt.close(fig)
    files.append("sharpness_end.png")

    # 4. B_simple over training
    fig, axes = plt.subplots(1, len(noises), figsize=(max(6.4, 4.2 * len(noises)), 4.0), squeeze=False)
    for ax, n in zip(axes[0], noises):
        for reg in regimes:
            e, v = _mean_curve(groups.get((reg, n), []), "noise/b_simple")
            ax.plot(e, v, marker=".", color=COLORS.get(reg), label=reg)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("B_simple = tr(Sigma) / |G|^2")
        ax.set_title(f"label noise {n:g}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}: simple gradient noise scale B_simple (McCandlish et al. 2018) over training,"
                 "\nmean over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "b_simple.png", dpi=120)
    plt.close(fig)
    files.append("b_simple.png")
    return files


RESULT_KEYS = ["test/acc", "train/loss", "train/acc", "train/acc_vs_true_labels", "val/acc", "mem/clean_acc",
               "mem/corrupt_acc_given", "mem/corrupt_acc_true", "sharpness/top_eigenvalue",
               "sharpness/trace", "noise/b_simple", "wall_time_s", "global_step", "epochs_run"]


def write_results_csv(runs: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["phase", "regime", "noise", "seed", "lr", "status", *RESULT_KEYS, "dir"])
        for r in sorted(runs, key=lambda r: (r["phase"], REGIME_ORDER.index(r["regime"]), r["noise"], r["seed"], r["lr"])):
            s = r["summary"]
            w.writerow([r["phase"], r["regime"], r["noise"], r["seed"], r["lr"], s.get("status"),
                        *[_final(r, k) for k in RESULT_KEYS], r["dir"]])


CLAIMS = {
    "keskar": ("Keskar et al. 2017", "Large-batch (and full-batch) training converges to sharper "
               "minima of the training loss and generalizes worse than small-batch SGD."),
    "geiping": ("Geiping et al. 2022", "Full-batch gradient descent can match SGD once it gets "
                "gradient clipping and an explicit gradient-norm penalty (computed by finite "
                "differences), plus longer training."),
    "zhang": ("Zhang et al. 2017", "Networks fit corrupted (even random) labels to ~100% training "
              "accuracy; the time to fit grows only by a small factor with the corruption level."),
}


def _machine() -> str:
    try:
        import torch

        tv = torch.__version__
    except Exception:  # pragma: no cover
        tv = "?"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node() or 'host'}: {cpu}, {os.cpu_count()} logical CPUs, torch {tv}, Python {platform.python_version()}"


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
              f"- Machine: {meta.get('machine', _machine())}",
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
            _, v = _mean_curve(g.get((reg, n), []), "noise/b_simple")
            cells.append(f"{v[0]:.0f} -> {v[-1]:.0f}" if v else "n/a")
        lines.append(f"| {reg} | " + " | ".join(cells) + " |")
    lines += [""]
    lines += claims_section(runs, noises)
    lines += ["## Figures", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["Each number above comes from `results.csv` in this folder (one row per run); the verdicts "
              "are computed from the sign of the difference and a 2-standard-error band over seeds.", ""]
    (out / "summary.md").write_text("\n".join(lines))


def aggregate(out: Path, meta: dict[str, Any] | None = None) -> Path:
    """Build ``out/report`` from the finished runs under ``out``."""
    meta = dict(meta or {})
    meta_path = out / "sweep_meta.json"
    if meta_path.exists():
        meta = {**json.loads(meta_path.read_text()), **meta}
    runs = collect_runs(out)
    sweep = [r for r in runs if r["phase"] == "sweep"]
    tune = [r for r in runs if r["phase"] == "tune"]
    if not sweep:
        raise SystemExit(f"batch_noise: no finished sweep runs under {out}")
    report = out / "report"
    plots = make_plots(sweep, report, meta.get("experiment", "batch_noise"))
    write_results_csv(runs, report / "results.csv")
    write_summary(sweep, tune, report, meta, plots)
    return report


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def build_profile(args: argparse.Namespace) -> Profile:
    p = PROFILES[args.profile]
    if args.quick:
        p = quick(p)
    if args.regimes:
        unknown = [r for r in args.regimes.split(",") if r not in REGIMES]
        if unknown:
            raise SystemExit(f"batch_noise: --regimes {unknown} unknown; allowed: {', '.join(REGIMES)}")
        p = replace(p, regimes=args.regimes.split(","))
    for name in ("epochs", "gnp_alpha", "tune_noise"):
        if getattr(args, name) is not None:
            p = replace(p, **{name: getattr(args, name)})
    if args.noise:
        p = replace(p, noise=_floats(args.noise))
    if args.seeds:
        p = replace(p, seeds=_ints(args.seeds))
    grids = dict(p.lr_grids)
    for item in args.lr or []:
        reg, _, values = item.partition("=")
        if reg not in REGIMES or not values:
            raise SystemExit(f"batch_noise: --lr {item!r}: expected REGIME=lr[,lr...] with REGIME in "
                             f"{', '.join(REGIMES)}")
        grids[reg] = _floats(values)
    missing = [r for r in p.regimes if r not in grids]
    if missing:
        raise SystemExit(f"batch_noise: no lr grid for {missing}; give --lr REGIME=...")
    return replace(p, lr_grids=grids, extra=p.extra + list(args.override or []))


def fixed_lrs(p: Profile) -> dict[str, float]:
    """The single lr of every regime (``--skip-tune``)."""
    multi = [r for r in p.regimes if len(p.lr_grids[r]) != 1]
    if multi:
        raise SystemExit(f"batch_noise: --skip-tune needs one lr per regime; give --lr REGIME=LR for {multi}")
    return {r: p.lr_grids[r][0] for r in p.regimes}


def read_tuning(p: Profile, out: Path) -> dict[str, float]:
    """Pick each regime's lr from the finished tuning runs and record the choice."""
    best, table = choose_lrs(collect_runs(out / "tune"))
    missing = [r for r in p.regimes if r not in best]
    if missing:
        raise SystemExit(f"batch_noise: tuning produced no finished run for {missing}; see {out}/tune/*/launch.log")
    (out / "tuned_lr.json").write_text(json.dumps({"chosen": best, "val_acc": {
        r: {str(k): v for k, v in t.items()} for r, t in table.items()}}, indent=2))
    print(f"[batch_noise] tuned lr: {best}", flush=True)
    return {r: best[r] for r in p.regimes}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m shiftlab.experiments.batch_noise", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="tune lr per regime, run the sweep, aggregate")
    run.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    run.add_argument("--quick", action="store_true", help="a minutes-long pipeline check")
    run.add_argument("--out", type=Path, default=None, help="output folder (default outputs/batch_noise_<profile>)")
    run.add_argument("--jobs", type=int, default=2, help="multiruns at a time")
    run.add_argument("--nice", type=int, default=10, help="niceness of the training processes")
    run.add_argument("--regimes", help=f"comma list from {','.join(REGIMES)}")
    run.add_argument("--noise", help="comma list of label-noise levels")
    run.add_argument("--seeds", help="comma list of seeds")
    run.add_argument("--epochs", type=int)
    run.add_argument("--gnp-alpha", dest="gnp_alpha", type=float, help="gradient-norm penalty strength")
    run.add_argument("--tune-noise", dest="tune_noise", type=float)
    run.add_argument("--lr", action="append", help="REGIME=lr[,lr...]: the lr grid of a regime (repeatable)")
    run.add_argument("--override", action="append", help="extra Hydra override for every run (repeatable)")
    run.add_argument("--skip-tune", action="store_true",
                     help="no tuning: every regime's --lr grid must hold exactly one lr, used as is")
    run.add_argument("--dry-run", action="store_true", help="print the multirun commands only")
    agg = sub.add_parser("aggregate", help="rebuild the report from finished runs")
    agg.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    if args.cmd == "aggregate":
        report = aggregate(args.out)
        print(f"[batch_noise] report: {report / 'summary.md'}")
        return
    p = build_profile(args)
    out = args.out or Path("outputs") / f"batch_noise_{args.profile}{'_quick' if args.quick else ''}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.skip_tune:
        best = fixed_lrs(p)
    else:
        run_launches(p, tune_launches(p, out), args.jobs, args.nice, args.dry_run)
        best = ({r: p.lr_grids[r][len(p.lr_grids[r]) // 2] for r in p.regimes} if args.dry_run
                else read_tuning(p, out))
    run_launches(p, sweep_launches(p, out, best), args.jobs, args.nice, args.dry_run)
    if args.dry_run:
        return
    meta = {**asdict(p), "command": "python -m shiftlab.experiments.batch_noise " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": _machine(), "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "sweep_meta.json").write_text(json.dumps(meta, indent=2))
    report = aggregate(out)
    print(f"[batch_noise] report: {report / 'summary.md'}")


if __name__ == "__main__":
    main()
