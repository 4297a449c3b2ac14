"""Speed benchmark of the batch-regime study; prints figures, asserts nothing.

1. Training throughput (samples/s) of ``batching=full`` vs ``batching=mini`` at the same chunk size
   (full batch accumulates the gradient over chunks of ``chunk_size`` samples and steps once per
   epoch; mini-batch steps after each batch of the same size). Target: full >= 0.9x mini.
2. Overhead of the sharpness probe (``shiftlab.callbacks.sharpness.SharpnessMonitor``) at its
   default settings from ``configs/callbacks/batch_noise.yaml``, as a fraction of training time,
   in both regimes; also without its overhead budget (``max_overhead=null``). Target: <= 10%.

Epoch times exclude validation (``limit_val_batches=0``), logging and checkpointing; the first
epoch is warm-up. Configurations are interleaved and repeated, and medians are reported, because a
shared machine's load changes over a run.

    python -m shiftlab.experiments.batch_regime_bench [--epochs 100] [--chunk 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

from shiftlab.experiments import harness


def _cfg(overrides: list[str]):
    return harness.compose(overrides, Path("/tmp/shiftlab_bench"))


def time_run(regime: list[str], epochs: int, probe: dict[str, Any] | None, device: str) -> dict[str, float]:
    """Train once; return seconds per epoch (median after warm-up) and probe seconds."""
    from hydra.utils import instantiate

    cfg = _cfg(["experiment=batch_noise", *regime, f"trainer.max_epochs={epochs}"])
    dm, module = harness.build(cfg, seed=0)
    callbacks = []
    probe_cb = None
    if probe is not None:
        node = dict(cfg.callbacks.sharpness)
        node.update(probe)
        probe_cb = instantiate(node)
        callbacks.append(probe_cb)
    timer = harness.epoch_timer()
    harness.fit_bare(module, dm, epochs, [*callbacks, timer], accelerator=device)
    times = timer.times[1:] or timer.times
    return {"epoch_s": statistics.median(times), "total_s": sum(timer.times), "n_train": len(dm.train_set),
            "probe_s": probe_cb.seconds if probe_cb else 0.0, "probes": len(probe_cb.history) if probe_cb else 0,
            "skipped": probe_cb.skipped if probe_cb else 0}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m shiftlab.experiments.batch_regime_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=100, help="the batch_noise experiment default")
    ap.add_argument("--chunk", type=int, default=512, help="full-batch chunk size = mini-batch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import warnings

    import torch

    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    full = ["batching=full", f"batching.chunk_size={args.chunk}", "optimizer.lr=1.0"]
    mini = ["batching=mini", f"batching.batch_size={args.chunk}", "optimizer.lr=0.3"]
    configs = {
        "full": (full, None), "mini": (mini, None),
        "full+probe": (full, {}), "mini+probe": (mini, {}),
        "full+probe(no budget)": (full, {"max_overhead": None}),
        "mini+probe(no budget)": (mini, {"max_overhead": None}),
    }
    results: dict[str, list[dict[str, float]]] = {k: [] for k in configs}
    for _ in range(args.repeats):
        for name, (regime, probe) in configs.items():
            results[name].append(time_run(regime, args.epochs, probe, args.device))

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    n = results["full"][0]["n_train"]
    print(f"machine: {harness.machine()}; device {args.device} (load average taken at the end)")
    print(f"experiment=batch_noise (mnist1d MLP 40-256-128-10), {n} training samples, "
          f"chunk = batch = {args.chunk}, {args.epochs} epochs x {args.repeats} repeats (medians)")
    sps = {k: n / med(k, "epoch_s") for k in ("full", "mini")}
    print(f"throughput  batching=full: {sps['full']:9.0f} samples/s   batching=mini: {sps['mini']:9.0f} samples/s"
          f"   full/mini = {sps['full'] / sps['mini']:.2f}x  (target >= 0.9x)")
    default_every = configs_default_every()
    for reg in ("full", "mini"):
        base = med(reg, "total_s")
        for variant in ("+probe", "+probe(no budget)"):
            name = reg + variant
            total = med(name, "total_s")
            probe_s = med(name, "probe_s")
            print(f"sharpness probe {name:22s}: every {default_every} epochs, {med(name, 'probes'):.0f} probes "
                  f"({med(name, 'skipped'):.0f} skipped), probe time / training time = "
                  f"{probe_s / max(total - probe_s, 1e-9):6.1%}, slowdown vs no probe = {total / base - 1:+6.1%}"
                  "  (target <= 10%)")


def configs_default_every() -> int:
    from omegaconf import OmegaConf

    from shiftlab.trainers.compose import CONFIG_DIR

    return int(OmegaConf.load(CONFIG_DIR / "callbacks" / "batch_noise.yaml").sharpness.every_n_epochs)


if __name__ == "__main__":
    main()
