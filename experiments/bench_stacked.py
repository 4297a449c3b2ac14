"""Many seeds: ``launcher=stacked`` vs ``launcher=basic``, wall time from the command line.

For K seeds, runs ``shiftlab-train -m seed=0,...,K-1 launcher=<L> <setup>`` as a fresh process, as a user
would (process start-up, Hydra, checkpoints, plots included), and records wall time, samples/s (training
samples of all K runs / wall time) and the process's peak resident memory.

    python -m shiftlab.experiments.bench_stacked [--ks 1 2 4 8] [--epochs 3] [--device cpu|cuda]

The default experiment uses BatchNorm, which the stacked launcher does not stack yet: the setup here is the
default experiment with ``norm=none`` (digits, MLP [256, 128], Adam, cosine, batch 64).
Writes outputs/bench_stacked/bench_stacked.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

SETUPS = {"default_norm_none": ["norm=none"]}
PEAK = "bench_stacked: peak_rss_kib="


def child(argv: list[str]) -> None:
    """Run ``shiftlab-train argv`` in this process and print its peak RSS on exit."""
    import resource

    from shiftlab.trainers import train

    sys.argv = ["shiftlab-train", *argv]
    try:
        train.main()
    finally:
        print(f"{PEAK}{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)


def run_once(k: int, launcher: str, setup: str, epochs: int, device: str, root: Path) -> dict:
    seeds = ",".join(str(s) for s in range(k))
    accel = "gpu" if device == "cuda" else "cpu"
    args = ["-m", f"seed={seeds}", f"launcher={launcher}", *SETUPS[setup], f"trainer.max_epochs={epochs}",
            f"trainer.accelerator={accel}", "print_config=false"]
    env = dict(os.environ, SHIFTLAB_ROOT=str(root / f"{launcher}_k{k}"))
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "shiftlab.experiments.bench_stacked", "--child", *args], env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"{launcher} K={k} failed:\n{r.stderr[-3000:]}")
    peak = re.search(re.escape(PEAK) + r"(\d+)", r.stdout)
    runs = sorted((root / f"{launcher}_k{k}" / "outputs" / "train" / "multiruns").glob("*/*/summary.json"))
    summaries = [json.loads(p.read_text()) for p in runs]
    n_train = summaries[0]["data"]["train"]
    stacked = sum(1 for s in summaries if "stacked" in s)
    return {"k": k, "launcher": launcher, "wall_s": round(wall, 2), "samples_per_s": round(k * epochs * n_train / wall, 1),
            "peak_rss_mib": round(int(peak.group(1)) / 1024, 1) if peak else None, "jobs": len(summaries),
            "stacked_jobs": stacked, "val_acc_mean": sum(s["val/acc"] for s in summaries) / len(summaries)}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for launcher in ("basic", "stacked"):
        rs = [r for r in rows if r["launcher"] == launcher]
        ax[0].plot([r["k"] for r in rs], [r["wall_s"] for r in rs], "o-", label=f"launcher={launcher}")
        ax[1].plot([r["k"] for r in rs], [r["samples_per_s"] for r in rs], "o-", label=f"launcher={launcher}")
    for a, label in zip(ax, ("wall time [s]", "training samples / s")):
        a.set_xscale("log", base=2)
        a.set_xlabel("seeds K")
        a.set_ylabel(label)
        a.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--epochs", type=int, default=30)  # the default experiment's trainer.max_epochs
    p.add_argument("--setup", choices=sorted(SETUPS), default="default_norm_none")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_stacked"))
    a = p.parse_args(argv)
    root = a.out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for k in a.ks:
        for launcher in ("basic", "stacked"):
            rows.append(run_once(k, launcher, a.setup, a.epochs, a.device, root))
            print(json.dumps(rows[-1]), flush=True)
    speedups = {}
    print(f"\n{'K':>3} {'basic s':>9} {'stacked s':>10} {'speed-up':>9} {'basic smp/s':>12} {'stacked smp/s':>14}")
    for k in a.ks:
        b, s = (next(r for r in rows if r["k"] == k and r["launcher"] == n) for n in ("basic", "stacked"))
        speedups[k] = round(b["wall_s"] / s["wall_s"], 2)
        print(f"{k:>3} {b['wall_s']:>9.2f} {s['wall_s']:>10.2f} {speedups[k]:>8.2f}x {b['samples_per_s']:>12.0f} "
              f"{s['samples_per_s']:>14.0f}")
    import torch

    meta = {"setup": a.setup, "overrides": SETUPS[a.setup], "epochs": a.epochs, "device": a.device,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "python": platform.python_version(), "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    out = {"meta": meta, "rows": rows, "speedup_basic_over_stacked": speedups}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_stacked.json").write_text(json.dumps(out, indent=2))
    plot(rows, a.out / "bench_stacked.png", f"{a.setup}, {a.epochs} epochs, {a.device}, {meta['machine']}")
    print(f"wrote {a.out / 'bench_stacked.json'} and {a.out / 'bench_stacked.png'}")


if __name__ == "__main__":
    main()
