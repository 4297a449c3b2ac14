"""Benchmark: training time with the covariate-shift probes at their default periods vs off.

``python -m shiftlab.experiments.probe_overhead [--repeats 2] [--epochs 10]``

For each reproduction config (santurkar2018: mnist1d CNN, ioffe2015: digits sigmoid MLP) it
trains with (1) no probe callbacks, (2) the probes present but switched off (``every_n_steps=0``)
and (3) the probes at their default periods (read from ``configs/callbacks/<probe>.yaml``: drift
every 100 steps, gradient ICS and landscape every 200), alternating, and prints the fit wall time (min over
repeats) and the ratio on/absent. Target: ratio <= 1.10. The probes' PNGs, drawn once at the end
of training (matplotlib import + rendering, a few seconds regardless of run length), are timed
separately ("on+plots") since they do not scale with training time.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from shiftlab.trainers.compose import CONFIG_DIR
from shiftlab.experiments.harness import machine, run, setup_threads

PROBES = ("activation_drift", "gradient_ics", "landscape")


def default_periods() -> dict[str, int]:
    """``every_n_steps`` of each probe as configs/callbacks/<probe>.yaml sets it."""
    from omegaconf import OmegaConf

    return {k: int(OmegaConf.load(f"{CONFIG_DIR}/callbacks/{k}.yaml")[k].every_n_steps) for k in PROBES}


DEFAULT_PERIODS = default_periods()
CONFIGS = {"santurkar2018": ["norm=batchnorm"], "ioffe2015": ["norm=batchnorm"]}


def variants(exp: str) -> dict[str, list[str]]:
    on = ["callbacks=covariate_shift"] + [f"callbacks.{k}.every_n_steps={v}" for k, v in DEFAULT_PERIODS.items()]
    if exp == "ioffe2015":  # keep the experiment's own drift layer / unit choice
        on += ["callbacks.activation_drift.layers=[net.8]", "callbacks.activation_drift.unit=0"]
    off = ["callbacks=covariate_shift"] + [f"callbacks.{k}.every_n_steps=0" for k in DEFAULT_PERIODS]
    no_plots = [f"callbacks.{k}.plot=false" for k in DEFAULT_PERIODS]
    return {"absent": ["callbacks=default"], "off": off, "on": on + no_plots, "on+plots": on}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    report = {"machine": machine(), "epochs": args.epochs, "repeats": args.repeats, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for exp in args.configs:
            times: dict[str, list[float]] = {k: [] for k in variants(exp)}
            probe_s: dict[str, float] = {}
            steps = 0
            for r in range(args.repeats):
                for name, ov in variants(exp).items():
                    out = Path(tmp) / f"{exp}_{name}_{r}"
                    s = run([f"experiment={exp}", *CONFIGS[exp], *ov, f"trainer.max_epochs={args.epochs}",
                             "test=false"], out)
                    times[name].append(float(s["wall_time_s"]))
                    steps = int(s.get("global_step", 0))
                    if name.startswith("on"):
                        probe_s = {k: s.get(f"probe_cost/{k}_s", 0.0) for k in DEFAULT_PERIODS}
            best = {k: min(v) for k, v in times.items()}  # fastest repeat: the least disturbed by load
            entry = {"steps": steps, "fit_seconds_min": best, "all_seconds": times,
                     "ratio_on_vs_absent": best["on"] / best["absent"],
                     "ratio_off_vs_absent": best["off"] / best["absent"],
                     "end_of_run_plot_seconds": best["on+plots"] - best["on"], "probe_seconds_last_on_run": probe_s,
                     "probe_share": sum(probe_s.values()) / best["absent"]}
            report["configs"][exp] = entry
            print(f"\n== {exp} (periods {DEFAULT_PERIODS}): {steps} steps, fit wall time (min of {args.repeats}) "
                  f"absent {best['absent']:.1f}s, off {best['off']:.1f}s, on {best['on']:.1f}s, "
                  f"on + end-of-run plots {best['on+plots']:.1f}s")
            print(f"   ratio on/absent = {entry['ratio_on_vs_absent']:.3f} (target <= 1.10); "
                  f"off/absent = {entry['ratio_off_vs_absent']:.3f}; "
                  f"probe time inside the on run: " + ", ".join(f"{k} {v:.2f}s" for k, v in probe_s.items()),
                  flush=True)
            print(f"   probe time / fit time without probes = {entry['probe_share']:.3f} "
                  "(timed inside the callbacks; steadier than the wall-time ratio on a shared machine)", flush=True)
    print(f"\nmachine: {report['machine']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
