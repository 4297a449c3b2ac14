"""Ioffe & Szegedy 2015, Fig. 1: a 3x100 sigmoid MLP with and without BatchNorm.

One command: ``python -m shiftlab.experiments.ioffe2015`` (digits; ``--data mnist1d`` for mnist1d).
Writes fig_a_heldout_accuracy.png, fig_bc_sigmoid_input_percentiles.png and SUMMARY.md.

(a) held-out accuracy over training steps; (b, c) the 15/50/85th percentiles of one
last-hidden-layer sigmoid input over training, without and with BN (paper: stable with BN).
"""
from __future__ import annotations

import sys
import time
from typing import Any

from shiftlab.experiments import harness
from shiftlab.experiments.harness import (base_parser, output_dir, epoch_series, plt, probe_history, run, series, setup_threads,
                                write_report)

LAYER = "net.8"  # the norm slot right before the last hidden layer's sigmoids
PCTS = ("p15", "p50", "p85")


def drift_score(hist: list[dict[str, Any]], start_frac: float = 0.0) -> tuple[float, float]:
    """Movement of the 15/50/85th percentiles: mean over them of (max - min over time), divided by
    the median 15-85 spread, from ``start_frac`` of training on. 0 = perfectly stationary.
    Returns (normalized score, absolute mean range)."""
    keys = [f"{LAYER}/out/{p}" for p in PCTS]
    rows = [h for h in hist if all(k in h for k in keys)]
    rows = rows[int(start_frac * len(rows)):]
    if len(rows) < 2:
        return float("nan"), float("nan")
    spans = [max(r[k] for r in rows) - min(r[k] for r in rows) for k in keys]
    spread = sorted(r[keys[2]] - r[keys[0]] for r in rows)[len(rows) // 2]
    span = sum(spans) / len(spans)
    return (span / spread if spread > 0 else float("nan")), span


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--data", choices=("digits", "mnist1d"), default="digits")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    out = output_dir("ioffe2015", args.quick, args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    exp = "ioffe2015" if args.data == "digits" else "ioffe2015_mnist1d"
    dirs, sums = {}, {}
    for norm in ("none", "batchnorm"):
        d = out / f"{exp}_{norm}"
        extra = ["trainer.max_epochs=3"] if args.quick else []
        sums[norm] = run([f"experiment={exp}", f"norm={norm}"] + extra, d, reuse=args.reuse)
        dirs[norm] = d

    pyplot = plt()
    colors = {"none": "C3", "batchnorm": "C0"}
    fig, ax = pyplot.subplots(figsize=(5, 3.5))
    acc: dict[str, tuple[list[int], list[float]]] = {}
    for norm, d in dirs.items():
        acc[norm] = epoch_series(d, "val/acc")
        ax.plot(acc[norm][0], [100 * v for v in acc[norm][1]], color=colors[norm],
                label="with BN" if norm == "batchnorm" else "without BN")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out (val) accuracy (%)")
    ax.set_title("(a) accuracy over training")
    ax.legend()
    harness.savefig(fig, out / "fig_a_heldout_accuracy.png")

    hists = {n: probe_history(d, "activation_drift") for n, d in dirs.items()}
    fig, axes = pyplot.subplots(1, 2, figsize=(9, 3.4), sharey=False)
    for ax, norm, title in zip(axes, ("none", "batchnorm"), ("(b) without BN", "(c) with BN")):
        for pct, style in zip(PCTS, ("--", "-", "--")):
            s, v = series(hists[norm], f"{LAYER}/out/{pct}")
            ax.plot(s, v, style, color=colors[norm], label=pct)
        ax.set_title(f"{title}: one sigmoid's input", fontsize=9)
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    harness.savefig(fig, out / "fig_bc_sigmoid_input_percentiles.png")

    n_steps = {n: sums[n].get("global_step") for n in dirs}
    test = {n: 100 * float(sums[n].get("test/acc", float("nan"))) for n in dirs}
    mid = {n: 100 * acc[n][1][max(0, len(acc[n][1]) // 4 - 1)] for n in dirs}
    drift = {n: drift_score(hists[n]) for n in dirs}
    drift_late = {n: drift_score(hists[n], 0.5) for n in dirs}
    rows = [
        ("(a) BN trains faster and reaches higher accuracy",
         f"held-out acc after 1/4 of training: no BN {mid['none']:.1f}%, BN {mid['batchnorm']:.1f}%; "
         f"final test acc: no BN {test['none']:.1f}%, BN {test['batchnorm']:.1f}%",
         "yes" if mid["batchnorm"] > mid["none"] and test["batchnorm"] >= test["none"] else "no",
         "criterion: BN ahead after a quarter of training and not behind at the end"),
        ("(b, c) the sigmoid input distribution is much more stable with BN",
         f"drift score (mean range of the 15/50/85th percentiles over training / median 15-85 spread): "
         f"no BN {drift['none'][0]:.2f}, BN {drift['batchnorm'][0]:.2f} (absolute mean range {drift['none'][1]:.2f} "
         f"vs {drift['batchnorm'][1]:.2f}); second half only: no BN {drift_late['none'][0]:.2f}, "
         f"BN {drift_late['batchnorm'][0]:.2f}",
         "yes" if drift["batchnorm"][0] < drift["none"][0] else "no",
         "criterion: BN's drift score below no-BN's over the whole run"),
    ]
    notes = [
        f"Data: {'scikit-learn digits (8x8, 1258 train / 180 val / 359 test)' if args.data == 'digits' else 'mnist1d (flat 40-vectors)'} "
        "instead of MNIST (not available offline); 3 x 100 sigmoid units, batch 60, SGD lr 0.5 constant, "
        f"{n_steps['none']} steps (paper: MNIST, 50k steps).",
        "Accuracy over steps is on the held-out validation split at each epoch end; the final number is the test split.",
        f"Percentiles: unit 0 of the norm slot `{LAYER}` (BN output, i.e. the sigmoid's input; nn.Identity without BN) "
        "on a fixed batch of 256 validation samples, in eval mode (running statistics), every 10 steps.",
        "Single seed per configuration.",
    ]
    if args.quick:
        notes.insert(0, "QUICK run (--quick): a pipeline smoke test, not a reproduction.")
    cmd = "python -m shiftlab.experiments.ioffe2015 " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(out, "Ioffe & Szegedy 2015 -- Fig. 1 (MLP with and without BatchNorm)", cmd.strip(), rows, notes,
                 ["fig_a_heldout_accuracy.png", "fig_bc_sigmoid_input_percentiles.png"], time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
