"""Learning curve over training-set size: train and validation score vs number of samples.

Why: the classic diagnostic (scikit-learn's ``learning_curve``) for whether more data would help;
a persistent gap between the curves means variance (more data helps), two low curves that meet
mean bias. Here each point is a full shiftlab run from a Hydra sweep over ``data.train_fraction``
and ``seed`` (``configs/experiment/learning_curve.yaml``); this script launches the sweep (``--run``)
and/or aggregates its ``summary.json`` files into ``learning_curve.csv`` and ``learning_curve.png``
(mean +- std over seeds).

Scores: ``train`` = accuracy (or loss) of the final model on its whole training subset (labels as
trained on), ``val`` = the last epoch's validation accuracy (or loss).

Usage::

    python -m shiftlab.experiments.learning_curve --run                      # sweep + aggregate
    python -m shiftlab.experiments.learning_curve --run --launcher basic     # one process per run
    python -m shiftlab.experiments.learning_curve --run trainer.max_epochs=10 data=mnist1d model=cnn
    python -m shiftlab.experiments.learning_curve --sweep-dir outputs/learning_curve/multiruns/<stamp>
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterable

from shiftlab.experiments import harness

METRICS = ("acc", "loss")


def collect(sweep_dir: Path) -> list[dict]:
    """One record per completed run under ``sweep_dir``: n_train, fraction, seed, scores."""
    df = harness.collect_runs(sweep_dir, config_keys=["data.train_fraction", "seed"])
    if df.empty:
        return []
    df = df[(df["status"] == "completed") & df["summary"].map(lambda s: "data" in s)]
    return [{"n_train": int(r["summary"]["data"]["train"]),
             "fraction": float(r["data.train_fraction"]) if r["data.train_fraction"] is not None else float("nan"),
             "seed": None if r["seed"] is None or r["seed"] != r["seed"] else int(r["seed"]),
             **{f"{split}_{m}": r["summary"].get(f"{split}/{m}") for split in ("train", "val") for m in METRICS}}
            for _, r in df.iterrows()]


def aggregate(rows: list[dict], metric: str = "acc") -> list[dict]:
    """Mean and std over seeds per training-set size (sorted by size), through the harness (pandas)."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is unknown; allowed: {', '.join(METRICS)}")
    import pandas as pd

    df = pd.DataFrame(rows)
    keys = [f"train_{metric}", f"val_{metric}"]
    agg = harness.aggregate(df, "n_train", keys)
    first = df.groupby("n_train", sort=True).agg(fraction=("fraction", "first"), runs=("n_train", "size"))
    return [{"n_train": int(r["n_train"]), "fraction": float(first.loc[r["n_train"], "fraction"]),
             "runs": int(first.loc[r["n_train"], "runs"]),
             **{f"{k}_{stat}": float(r[f"{k}_{stat}"]) for k in keys for stat in ("mean", "std")}}
            for _, r in agg.iterrows()]


def write_outputs(table: list[dict], out: Path, metric: str, title: str = "") -> tuple[Path, Path]:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "learning_curve.csv", out / "learning_curve.png"
    pd.DataFrame(table).to_csv(csv_path, index=False)
    fig, ax = harness.plt().subplots(figsize=(6.5, 4.2))
    n = [r["n_train"] for r in table]
    for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
        harness.plot_mean_spread(ax, n, [r[f"{split}_{metric}_mean"] for r in table],
                                 [r[f"{split}_{metric}_std"] for r in table], label=f"{split} {metric}",
                                 color=color, style="band", marker="o")
    ax.set_xlabel("number of training samples")
    ax.set_ylabel(metric)
    ax.set_title(title or f"learning curve (mean +- std over {table[0]['runs']} seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    harness.savefig(fig, png_path, dpi=110)
    return csv_path, png_path


def run_sweep(sweep_dir: Path, overrides: list[str], launcher: str = "stacked") -> None:
    """``shiftlab-train -m experiment=learning_curve launcher=<launcher>`` into ``sweep_dir`` (through the
    harness). ``stacked``: the seeds of each training-set size train as one stacked model in one process."""
    rc = harness.multirun(["experiment=learning_curve", f"launcher={launcher}", *overrides], sweep_dir, quiet=False)
    if rc:
        raise SystemExit(f"learning_curve: the sweep failed (exit code {rc})")


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="store_true", help="launch the Hydra sweep first")
    ap.add_argument("--sweep-dir", type=Path, default=None,
                    help="multirun directory to aggregate (default with --run: a new one)")
    ap.add_argument("--metric", default="acc", help="acc | loss")
    ap.add_argument("--out", type=Path, default=None, help="default: the sweep directory")
    ap.add_argument("--launcher", default="stacked", choices=("stacked", "basic"),
                    help="stacked: each size's seeds as one stacked model (default); basic: a run at a time")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the sweep (with --run)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.metric not in METRICS:
        ap.error(f"--metric={args.metric!r} is unknown; allowed: {', '.join(METRICS)}")
    sweep_dir = args.sweep_dir
    if args.run:
        sweep_dir = sweep_dir or Path("outputs") / "learning_curve" / "multiruns" / time.strftime(
            "%Y-%m-%d_%H-%M-%S")
        t0 = time.perf_counter()
        run_sweep(sweep_dir, args.overrides, args.launcher)
        print(f"learning_curve: sweep took {time.perf_counter() - t0:.1f} s (launcher={args.launcher})")
    if sweep_dir is None:
        ap.error("pass --run or --sweep-dir")
    rows = collect(sweep_dir)
    if not rows:
        raise SystemExit(f"--sweep-dir={sweep_dir} holds no completed run (no summary.json)")
    table = aggregate(rows, args.metric)
    csv_path, png_path = write_outputs(table, args.out or sweep_dir, args.metric)
    for r in table:
        print(f"n={r['n_train']:5d}  train {args.metric} {r[f'train_{args.metric}_mean']:.4f} "
              f"+- {r[f'train_{args.metric}_std']:.4f}   val {args.metric} "
              f"{r[f'val_{args.metric}_mean']:.4f} +- {r[f'val_{args.metric}_std']:.4f}  "
              f"({r['runs']} runs)")
    print(f"wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
