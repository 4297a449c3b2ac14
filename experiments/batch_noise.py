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
of the training data) to check the pipeline (3.6 min wall on the loaded 2-core CI-class VM); its runs go to
``outputs/batch_noise_<profile>/quick``, never into the full sweep's folders. ``aggregate --out DIR`` rebuilds the
report (:mod:`shiftlab.experiments.batch_noise_report`) from finished runs. Launching, reading runs and
averaging seeds go through :mod:`shiftlab.experiments.harness`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from shiftlab.experiments import harness
from shiftlab.experiments.harness import read_curves  # noqa: F401  (re-exported: part of this driver's API)


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
    # stacked: the jobs of a multirun that differ only in seed (and in what acts per member) train as one
    # stacked model in one process (trainers/stacked/); basic: one run at a time
    launcher: str = "stacked"


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


def launch_overrides(p: Profile, launch: Launch) -> list[str]:
    """The ``shiftlab-train -m`` overrides of one launch (the harness adds the sweep folder and quiet logs)."""
    regime = [o.replace("${gnp_alpha}", repr(float(p.gnp_alpha))) for o in REGIMES[launch.regime]]
    return [f"experiment={p.experiment}", *regime, f"optimizer.lr={_fmt(launch.lrs)}",
            f"data.label_noise={_fmt(launch.noise)}", f"seed={_fmt(launch.seeds)}",
            f"trainer.max_epochs={p.epochs}", f"launcher={p.launcher}", *p.extra]


def _is_done(launch: Launch) -> bool:
    d = Path(launch.dir)
    return (d / "launch.json").exists() and len(list(d.glob("*/summary.json"))) >= launch.n_jobs


def run_launches(p: Profile, launches: list[Launch], jobs: int, niceness: int, dry_run: bool) -> None:
    """Run the multiruns, ``jobs`` at a time, longest first; finished ones are skipped."""
    cost = {r: (BATCH_OF.get(r) and 4096 / BATCH_OF[r]) or 4 for r in REGIMES}
    todo = sorted((ln for ln in launches if not _is_done(ln)), key=lambda ln: -cost[ln.regime] * ln.n_jobs)

    def one(launch: Launch) -> int:
        d = Path(launch.dir)
        overrides = launch_overrides(p, launch)
        if dry_run:
            return harness.multirun(overrides, d, dry_run=True)
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        rc = harness.multirun(overrides, d, log=d / "launch.log", niceness=niceness)
        meta = {**asdict(launch), "command": harness.multirun_command(overrides, d), "returncode": rc,
                "wall_s": round(time.perf_counter() - t0, 1)}
        (d / "launch.json").write_text(json.dumps(meta, indent=2))
        print(f"[batch_noise] {launch.phase}/{d.name}: rc={rc} {meta['wall_s']} s ({launch.n_jobs} runs)", flush=True)
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
def _launch_of(run_dir: Path) -> dict[str, Any] | None:
    """Phase and regime of a run from its multirun's ``launch.json`` (None: not a run of this study)."""
    path = run_dir.parent / "launch.json"
    if not path.exists():
        return None
    launch = json.loads(path.read_text())
    return {"phase": launch["phase"], "regime": launch["regime"]}


def collect_runs(root: Path) -> list[dict[str, Any]]:
    """One record per finished run under ``root`` (any depth): phase, regime, lr, noise, seed, summary, curves."""
    df = harness.collect_runs(root, meta=_launch_of, curves=True)
    if df.empty:
        return []
    df = df.rename(columns={"optimizer.lr": "lr", "data.label_noise": "noise"})
    df["seed"] = df["seed"].fillna(0).astype(int) if "seed" in df else 0
    return df[["phase", "regime", "dir", "lr", "noise", "seed", "summary", "curves"]].to_dict("records")


def first_epoch_reaching(curve: list[tuple[int, float]], level: float) -> float:
    """First epoch (1-based) whose value is >= ``level``; NaN if never."""
    for e, v in curve:
        if v >= level:
            return float(e + 1)
    return math.nan


def _momentum(run_dir: str) -> float:
    """``optimizer.momentum`` of a finished run (0 when the optimizer has none)."""
    if not (Path(run_dir) / ".hydra" / "config.yaml").exists():
        return math.nan
    v = harness.read_config(Path(run_dir), ["optimizer.momentum"])["optimizer.momentum"]
    return harness.to_float(0.0 if v is None else v)


def choose_lrs(tune_runs: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """Best final ``val/acc`` per regime (diverged or failed runs count as -inf; ties: smaller lr)."""
    df = pd.DataFrame(list(tune_runs) if not isinstance(tune_runs, pd.DataFrame) else tune_runs)
    acc = [harness.to_float(s.get("val/acc")) if s.get("status") == "completed" else -math.inf for s in df["summary"]]
    df = df.assign(acc=[a if math.isfinite(a) else -math.inf for a in acc])
    table = {reg: dict(zip(g["lr"], g["acc"])) for reg, g in df.groupby("regime", sort=False)}
    best = {reg: max(sorted(t), key=lambda lr: t[lr]) for reg, t in table.items()}
    return best, table


def aggregate(out: Path, meta: dict[str, Any] | None = None) -> Path:
    """Build ``out/report`` from the finished runs under ``out``."""
    meta = dict(meta or {})
    meta_path = out / "sweep_meta.json"
    if meta_path.exists():
        meta = {**json.loads(meta_path.read_text()), **meta}
    from shiftlab.experiments import batch_noise_report as rep

    sweep, tune = collect_runs(out / "sweep"), collect_runs(out / "tune")
    if not sweep:
        raise SystemExit(f"batch_noise: no finished sweep runs under {out}/sweep")
    report = out / "report"
    plots = rep.make_plots(sweep, report, meta.get("experiment", "batch_noise"))
    rep.write_results_csv(sweep + tune, report / "results.csv")
    rep.write_summary(sweep, tune, report, meta, plots)
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
    for name in ("epochs", "gnp_alpha", "tune_noise", "launcher"):
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
    run.add_argument("--out", type=Path, default=None,
                     help="output folder (default outputs/batch_noise_<profile>, with --quick .../quick)")
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
    run.add_argument("--launcher", choices=("stacked", "basic"),
                     help="stacked (default): seeds of one multirun as one stacked model; basic: a run at a time")
    run.add_argument("--dry-run", action="store_true", help="print the multirun commands only")
    agg = sub.add_parser("aggregate", help="rebuild the report from finished runs")
    agg.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    if args.cmd == "aggregate":
        report = aggregate(args.out)
        print(f"[batch_noise] report: {report / 'summary.md'}")
        return
    p = build_profile(args)
    out = harness.output_dir(f"batch_noise_{args.profile}", args.quick, args.out)
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
            "machine": harness.machine(), "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "sweep_meta.json").write_text(json.dumps(meta, indent=2))
    report = aggregate(out)
    print(f"[batch_noise] report: {report / 'summary.md'}")


if __name__ == "__main__":
    main()
