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
    python -m shiftlab.experiments.learning_curve --run trainer.max_epochs=10 data=mnist1d model=cnn
    python -m shiftlab.experiments.learning_curve --sweep-dir outputs/learning_curve/multiruns/<stamp>
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable

METRICS = ("acc", "loss")


def collect(sweep_dir: Path) -> list[dict]:
    """One record per finished run under ``sweep_dir``: n_train, fraction, seed, scores."""
    rows = []
    for path in sorted(sweep_dir.rglob("summary.json")):
        s = json.loads(path.read_text())
        if s.get("status") != "completed" or "data" not in s:
            continue
        cfg_path = path.parent / ".hydra" / "config.yaml"
        fraction, seed = math.nan, None
        if cfg_path.exists():
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(cfg_path)
            fraction, seed = float(cfg.data.train_fraction), int(cfg.seed)
        rows.append({"n_train": int(s["data"]["train"]), "fraction": fraction, "seed": seed,
                     "train_acc": s.get("train/acc"), "val_acc": s.get("val/acc"),
                     "train_loss": s.get("train/loss"), "val_loss": s.get("val/loss")})
    return rows


def aggregate(rows: list[dict], metric: str = "acc") -> list[dict]:
    """Mean and std over seeds per training-set size (sorted by size)."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is unknown; allowed: {', '.join(METRICS)}")
    groups: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["n_train"]].append(r)
    out = []
    for n, rs in sorted(groups.items()):
        rec = {"n_train": n, "fraction": rs[0]["fraction"], "runs": len(rs)}
        for split in ("train", "val"):
            xs = [float(r[f"{split}_{metric}"]) for r in rs if r[f"{split}_{metric}"] is not None]
            rec[f"{split}_{metric}_mean"] = statistics.fmean(xs) if xs else math.nan
            rec[f"{split}_{metric}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        out.append(rec)
    return out


def write_outputs(table: list[dict], out: Path, metric: str, title: str = "") -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "learning_curve.csv", out / "learning_curve.png"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    n = [r["n_train"] for r in table]
    for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
        m = [r[f"{split}_{metric}_mean"] for r in table]
        s = [r[f"{split}_{metric}_std"] for r in table]
        ax.plot(n, m, "o-", color=color, label=f"{split} {metric}")
        ax.fill_between(n, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                        color=color, alpha=0.2)
    ax.set_xlabel("number of training samples")
    ax.set_ylabel(metric)
    ax.set_title(title or f"learning curve (mean +- std over {table[0]['runs']} seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return csv_path, png_path


def run_sweep(sweep_dir: Path, overrides: list[str]) -> None:
    """``shiftlab-train -m experiment=learning_curve`` into ``sweep_dir``."""
    cmd = [sys.executable, "-m", "shiftlab.trainers.train", "-m", "experiment=learning_curve",
           f"hydra.sweep.dir={sweep_dir}", *overrides]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="store_true", help="launch the Hydra sweep first")
    ap.add_argument("--sweep-dir", type=Path, default=None,
                    help="multirun directory to aggregate (default with --run: a new one)")
    ap.add_argument("--metric", default="acc", help="acc | loss")
    ap.add_argument("--out", type=Path, default=None, help="default: the sweep directory")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the sweep (with --run)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.metric not in METRICS:
        ap.error(f"--metric={args.metric!r} is unknown; allowed: {', '.join(METRICS)}")
    sweep_dir = args.sweep_dir
    if args.run:
        sweep_dir = sweep_dir or Path("outputs") / "learning_curve" / "multiruns" / time.strftime(
            "%Y-%m-%d_%H-%M-%S")
        run_sweep(sweep_dir, args.overrides)
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
