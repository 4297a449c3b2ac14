"""Many seeds: ``launcher=stacked`` vs ``launcher=basic`` vs a hand-written sequential loop, from the command line.

For each setup and K seeds, three fresh processes are timed as a user would run them:

- ``stacked``: ``shiftlab-train -m seed=0,...,K-1 launcher=stacked <setup>``
- ``basic``: the same with ``launcher=basic`` (one job after another in one process)
- ``hand``: one process, K plain PyTorch training loops one after another (no Lightning, no Hydra sweep):
  each seed's model, data split, optimizer and scheduler built by shiftlab's builders from the same config,
  then shuffle / forward / backward / step, one validation pass per epoch and one test pass, nothing
  written. It is the floor a framework run is compared with, not a run with the same outputs.

Recorded per run: wall time (process start to exit: start-up, Hydra, checkpoints, plots included), CPU
time of the process and its children (on a shared machine it moves less with other processes' load than
wall time), training samples per second (K x epochs x training samples / wall), the main process's peak
resident memory (the stacked launcher's forked plot workers are not in it; peak CUDA memory with
``--device cuda``), and, for the stacked launcher, which jobs
fell back to the basic path and why (the launcher's console line).

    python -m shiftlab.experiments.bench_stacked [--ks 1 2 4 8 16 32] [--setups default mnist1d_cnn]
        [--methods stacked basic hand] [--epochs N] [--device cpu|cuda] [--quick]

``default`` is the default experiment (digits, MLP [256, 128] with BatchNorm, Adam, cosine, batch 64, 30
epochs); ``default_norm_none`` the same without normalization; ``mnist1d_cnn`` the MNIST-1D CNN (40 epochs).
Writes <out>/bench_stacked.json and .png (default out: outputs/bench_stacked).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SETUPS = {"default": [], "default_norm_none": ["norm=none"], "mnist1d_cnn": ["experiment=mnist1d_cnn"]}
METHODS = ("stacked", "basic", "hand")
QUIET = ["print_config=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
PEAK = "bench_stacked: peak_rss_kib="
PEAK_CUDA = "bench_stacked: peak_cuda_mib="
HAND = "bench_stacked: hand "
STACKED_LINE = re.compile(r"^shiftlab: stacked: jobs (.*) train as one stacked model", re.M)
ALONE_LINE = re.compile(r"^shiftlab: stacked: job #(\d+) \((.*)\) runs alone: (.*)$", re.M)


def fallbacks(console: str) -> list[dict[str, str]]:
    """The jobs the stacked launcher ran on the basic path, with its reason, from its console lines."""
    return [{"job": int(m.group(1)), "overrides": m.group(2), "reason": m.group(3).strip()}
            for m in ALONE_LINE.finditer(console)]


def _report_peaks() -> None:
    print(f"{PEAK}{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f"{PEAK_CUDA}{torch.cuda.max_memory_allocated() / 2**20:.1f}", flush=True)


def child_train(argv: list[str]) -> None:
    """``shiftlab-train argv`` in this process, then its peak memory."""
    from shiftlab.trainers import train

    sys.argv = ["shiftlab-train", *argv]
    try:
        train.main()
    finally:
        _report_peaks()


def hand_loop(cfg: Any, device: str) -> dict[str, float]:
    """One seed's training written by hand on shiftlab's model, data split, optimizer and scheduler."""
    import torch
    from torch.nn import functional as F

    from shiftlab.experiments import harness

    dm, module = harness.build(cfg)
    dev = torch.device(device)
    model = module.model.to(dev)
    opt = module.optimizer_factory(model.parameters())
    epochs = int(cfg.trainer.max_epochs)
    sched = module.scheduler_factory(opt, max_epochs=epochs) if module.scheduler_factory is not None else None
    x, y = dm.train_set.x.to(dev), dm.train_set.y.to(dev)
    gen = torch.Generator().manual_seed(int(cfg.seed))

    def evaluate(split) -> tuple[float, float]:
        model.eval()
        loss, correct = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(split), dm.eval_batch_size):
                xb, yb = split.x[s:s + dm.eval_batch_size].to(dev), split.y[s:s + dm.eval_batch_size].to(dev)
                logits = model(xb)
                loss += float(F.cross_entropy(logits, yb, reduction="sum"))
                correct += int((logits.argmax(1) == yb).sum())
        return loss / len(split), correct / len(split)

    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(x.shape[0], generator=gen).to(dev).split(dm.batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
        val = evaluate(dm.val_set)
    test = evaluate(dm.test_set)
    return {"val_acc": val[1], "test_acc": test[1], "n_train": int(x.shape[0])}


def child_hand(setup: str, k: int, epochs: int | None, device: str) -> None:
    """K hand-written loops one after another in this process; one result line per seed."""
    from shiftlab.trainers.compose import compose

    try:
        for seed in range(k):
            extra = [f"trainer.max_epochs={epochs}"] if epochs else []
            cfg = compose(SETUPS[setup] + QUIET + [f"seed={seed}", *extra])
            print(f"{HAND}{json.dumps({'seed': seed, **hand_loop(cfg, device)})}", flush=True)
    finally:
        _report_peaks()


def setup_epochs(setup: str) -> int:
    from shiftlab.trainers.compose import compose

    return int(compose(SETUPS[setup]).trainer.max_epochs)


def run_once(setup: str, k: int, method: str, epochs: int, device: str, root: Path, threads: int = 1
             ) -> dict[str, Any]:
    """One timed command; its row of the table. ``threads``: the child's torch / OpenMP threads (one by
    default, for every method alike: on a shared 2-core machine a second OpenMP thread made runs several
    times slower, and unevenly between methods)."""
    out = root / setup / f"{method}_k{k}"
    accel = "gpu" if device == "cuda" else "cpu"
    if method == "hand":
        args = ["--child-hand", setup, str(k), str(epochs), device]
    else:
        args = ["--child", "-m", f"seed={','.join(map(str, range(k)))}", f"launcher={method}", *SETUPS[setup],
                f"trainer.max_epochs={epochs}", f"trainer.accelerator={accel}", *QUIET]
    env = dict(os.environ, SHIFTLAB_ROOT=str(out), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    load = os.getloadavg()[0]  # a shared machine: other processes' load moves wall times
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "shiftlab.experiments.bench_stacked", *args], env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{setup} {method} K={k} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    row: dict[str, Any] = {"setup": setup, "k": k, "method": method, "epochs": epochs, "wall_s": round(wall, 2),
                           "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
                           "load_1min_before": round(load, 2)}
    if method == "hand":
        seeds = [json.loads(line[len(HAND):]) for line in r.stdout.splitlines() if line.startswith(HAND)]
        n_train, accs, row["jobs"], row["stacked_jobs"] = seeds[0]["n_train"], [s["val_acc"] for s in seeds], len(seeds), 0
    else:
        summaries = [json.loads(p.read_text()) for p in sorted(out.glob("outputs/*/multiruns/*/*/summary.json"))]
        if len(summaries) != k or any(s.get("status") != "completed" for s in summaries):
            raise RuntimeError(f"{setup} {method} K={k}: {len(summaries)} summaries, not {k} completed runs")
        n_train, accs = summaries[0]["data"]["train"], [s["val/acc"] for s in summaries]
        row["jobs"], row["stacked_jobs"] = len(summaries), sum(1 for s in summaries if "stacked" in s)
        if method == "stacked":
            row["fell_back"] = fallbacks(r.stdout)
    row["samples_per_s"] = round(k * epochs * n_train / wall, 1)
    peak = re.search(re.escape(PEAK) + r"(\d+)", r.stdout)
    row["peak_rss_mib"] = round(int(peak.group(1)) / 1024, 1) if peak else None
    cuda = re.search(re.escape(PEAK_CUDA) + r"([\d.]+)", r.stdout)
    if cuda:
        row["peak_cuda_mib"] = float(cuda.group(1))
    row["val_acc_mean"] = round(sum(accs) / len(accs), 4)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """One line per (setup, K): the three methods' wall and CPU time, the stacked speed-up, fallbacks."""
    lines = [f"{'setup':<18} {'K':>3} {'stacked s':>10} {'basic s':>8} {'hand s':>7} {'basic/stacked':>13} "
             f"{'cpu st/ba/ha s':>18} {'samples/s st/ba/ha':>22} {'peak MiB st/ba/ha':>20}  note"]
    for setup, k in dict.fromkeys((r["setup"], r["k"]) for r in rows):
        by = {r["method"]: r for r in rows if r["setup"] == setup and r["k"] == k}

        def col(key: str, fmt: str) -> str:
            return "/".join(format(by[m][key], fmt) if m in by and by[m].get(key) is not None else "-"
                            for m in METHODS)
        ratio = (f"{by['basic']['wall_s'] / by['stacked']['wall_s']:.2f}x" if {"basic", "stacked"} <= by.keys()
                 else "-")
        wall = [f"{by[m]['wall_s']:.1f}" if m in by else "-" for m in METHODS]
        note = ""
        if by.get("stacked", {}).get("fell_back"):
            fb = by["stacked"]["fell_back"]
            note = f"stacked: {len(fb)}/{k} jobs ran alone ({fb[0]['reason']})"
        lines.append(f"{setup:<18} {k:>3} {wall[0]:>10} {wall[1]:>8} {wall[2]:>7} {ratio:>13} "
                     f"{col('cpu_s', '.1f'):>18} {col('samples_per_s', '.0f'):>22} {col('peak_rss_mib', '.0f'):>20}  {note}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Wall time and samples/s against K, one row of panels per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(dict.fromkeys(r["setup"] for r in rows))
    fig, axes = plt.subplots(len(setups), 2, figsize=(10, 3.6 * len(setups)), squeeze=False)
    for (ax_wall, ax_rate), setup in zip(axes, setups):
        for method in METHODS:
            rs = [r for r in rows if r["setup"] == setup and r["method"] == method]
            if not rs:
                continue
            label = {"stacked": "launcher=stacked", "basic": "launcher=basic", "hand": "hand-written loop"}[method]
            ax_wall.plot([r["k"] for r in rs], [r["wall_s"] for r in rs], "o-", label=label)
            ax_rate.plot([r["k"] for r in rs], [r["samples_per_s"] for r in rs], "o-", label=label)
        for ax, ylabel in ((ax_wall, "wall time from the command line [s]"), (ax_rate, "training samples / s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("seeds K")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(setup, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_train(argv[1:])
        return None
    if argv[:1] == ["--child-hand"]:
        setup, k, epochs, device = argv[1:5]
        child_hand(setup, int(k), int(epochs) or None, device)
        return None
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", type=int, nargs="+", default=None, help="seed counts (default 1 2 4 8 16 32)")
    p.add_argument("--setups", nargs="+", choices=sorted(SETUPS), default=None,
                   help="default: default default_norm_none mnist1d_cnn")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--epochs", type=int, default=None, help="default: each setup's own max_epochs")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run for tests: K 1 2, 1 epoch, default_norm_none only (unless given)")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_stacked"))
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of every timed process")
    a = p.parse_args(argv)
    ks = a.ks or ([1, 2] if a.quick else [1, 2, 4, 8, 16, 32])
    setups = a.setups or (["default_norm_none"] if a.quick else ["default", "default_norm_none", "mnist1d_cnn"])
    epochs_arg = a.epochs or (1 if a.quick else None)
    root = a.out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for setup in setups:
        epochs = epochs_arg or setup_epochs(setup)
        for k in ks:
            for method in a.methods:
                rows.append(run_once(setup, k, method, epochs, a.device, root, a.threads))
                print(json.dumps(rows[-1]), flush=True)
    print("\n" + table(rows))
    from shiftlab.experiments.harness import describe_machine

    meta = {"setups": {s: SETUPS[s] for s in setups}, "device": a.device, "machine": describe_machine(),
            "threads": a.threads, "load_avg_end": os.getloadavg()}
    result = {"meta": meta, "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_stacked.json").write_text(json.dumps(result, indent=2))
    m = meta["machine"]
    plot(rows, a.out / "bench_stacked.png", f"{a.device}, {m.get('cpu')}, {m.get('logical_cpus')} CPUs, "
         f"torch {m.get('torch')}, load at end {meta['load_avg_end'][0]:.1f}")
    print(f"wrote {a.out / 'bench_stacked.json'} and {a.out / 'bench_stacked.png'}")
    return result


if __name__ == "__main__":
    main()
