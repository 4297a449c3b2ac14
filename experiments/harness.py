"""The one experiment harness: compose, launch, collect, aggregate, plot, describe the machine.

Why: every driver in experiments/ is "a few runs of the spine with different overrides, then a
table and figures"; the plumbing lives here once, so each driver is about its study and every
study reads runs, averages seeds and names the machine the same way. Configs are composed only
through :mod:`shiftlab.trainers.compose`; seeds are always reported as mean with spread (pandas),
never as a "best" seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd

# Overrides every harness run gets: no widgets or config tree in logs, CSV metrics to read back.
QUIET = ["print_config=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
QUIET_MULTIRUN = QUIET + ["callbacks.rich_progress_bar=null", "callbacks.model_summary=null"]


# ------------------------------------------------------------------------------------------------
# compose and launch
# ------------------------------------------------------------------------------------------------
def compose(overrides: Sequence[str], out_dir: Path | None = None, quiet: bool = True):
    """The config ``shiftlab-train <overrides>`` would build (quiet, writing into ``out_dir``)."""
    from shiftlab.trainers.compose import compose as _compose

    tail = [f"paths.output_dir={out_dir}"] if out_dir is not None else []
    return _compose((QUIET if quiet else []) + list(overrides) + tail)


def run(overrides: Sequence[str], out_dir: Path, reuse: bool = False, csv_logger: bool = True) -> dict[str, Any]:
    """One in-process training run of the spine into ``out_dir``; returns summary.json's dict.

    ``reuse``: keep an existing completed run (re-plotting without re-training)."""
    summary_path = out_dir / "summary.json"
    if reuse and summary_path.exists():
        return json.loads(summary_path.read_text())
    from shiftlab.trainers.train import train

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose((["logger=csv"] if csv_logger else []) + list(overrides), out_dir)
    t0 = time.perf_counter()
    summary = train(cfg)
    summary["_wall_s"] = time.perf_counter() - t0
    print(f"[{out_dir.name}] {summary['_wall_s']:.1f}s  val/acc={summary.get('val/acc')}  "
          f"test/acc={summary.get('test/acc')}", flush=True)
    return summary


def build(cfg, seed: int | None = None):
    """(datamodule set up for fit, module) of a composed config, seeded (``seed`` or ``cfg.seed``): the
    spine's parts for drivers that time or inspect training outside ``train()``."""
    import lightning as L

    from shiftlab.trainers.build import build_datamodule, build_module

    L.seed_everything(cfg.seed if seed is None else seed, verbose=False)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    return dm, build_module(cfg, dm)


def fit_bare(module, dm, epochs: int, callbacks: Sequence[Any] = (), accelerator: str = "cpu") -> None:
    """Training only (no validation, logger, checkpoints or widgets), so timings are of training."""
    import lightning as L

    trainer = L.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=list(callbacks))
    trainer.fit(module, datamodule=dm)


def epoch_timer():
    """A Lightning callback whose ``times`` holds each training epoch's wall time (its hooks included when
    appended after the other callbacks)."""
    import lightning as L

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.times.append(time.perf_counter() - self._t0)

    return EpochTimer()


def launch_env() -> dict[str, str]:
    """Environment of a subprocess run: one thread per run (tiny models thrash with more), wandb
    offline, the current directory importable (a checkout run without install)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.setdefault("WANDB_MODE", "offline")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH", "")]))
    return env


def multirun_command(overrides: Sequence[str], sweep_dir: Path, quiet: bool = True) -> list[str]:
    """``shiftlab-train -m <overrides>`` into ``sweep_dir/<job number>``."""
    return [sys.executable, "-m", "shiftlab.trainers.train", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}",
            "hydra.sweep.subdir=${hydra.job.num}", *(QUIET_MULTIRUN if quiet else [])]


def multirun(overrides: Sequence[str], sweep_dir: Path, log: Path | None = None, niceness: int = 0,
             quiet: bool = True, dry_run: bool = False) -> int:
    """A Hydra multirun in a subprocess; returns its exit code. Output goes to ``log`` if given."""
    cmd = multirun_command(overrides, sweep_dir, quiet)
    if dry_run:
        print(" ".join(cmd))
        return 0
    sweep_dir.mkdir(parents=True, exist_ok=True)
    preexec = (lambda: os.nice(niceness)) if niceness else None
    if log is None:
        print("running:", " ".join(cmd), flush=True)
        return subprocess.call(cmd, env=launch_env(), preexec_fn=preexec)
    with open(log, "w") as f:
        return subprocess.call(cmd, env=launch_env(), stdout=f, stderr=subprocess.STDOUT, preexec_fn=preexec)


# ------------------------------------------------------------------------------------------------
# reading finished runs
# ------------------------------------------------------------------------------------------------
def to_float(v: Any) -> float:
    """``float(v)``, NaN for anything that is not a number (None, '', a list)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def read_overrides(run_dir: Path) -> dict[str, str]:
    """The run's command-line overrides (``.hydra/overrides.yaml``) as ``{key: value}``."""
    import yaml

    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.exists() else []
    return dict(o.lstrip("+~").split("=", 1) for o in items or [] if "=" in o)


def read_config(run_dir: Path, keys: Iterable[str]) -> dict[str, Any]:
    """Values of dotted ``keys`` in the run's resolved config (``.hydra/config.yaml``); None if absent."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(path) if path.exists() else OmegaConf.create({})
    return {k: OmegaConf.select(cfg, k, default=None) for k in keys}


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """``metrics.csv`` of a run (Lightning's CSV logger), empty if the run wrote none."""
    path = Path(run_dir) / "metrics.csv"
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["epoch", "step"])


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Epoch-level curves of a run as ``{key: [(epoch, value), ...]}`` (last value per epoch)."""
    df = read_metrics(run_dir).dropna(subset=["epoch"])
    curves = {}
    for key in (c for c in df.columns if c not in ("epoch", "step")):
        s = df[["epoch", key]].dropna().groupby("epoch")[key].last()
        if len(s):
            curves[key] = [(int(e), float(v)) for e, v in s.items()]
    return curves


def epoch_series(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    """(step, value) of an epoch-level metric from the run's metrics.csv."""
    df = read_metrics(run_dir)
    if key not in df:
        return [], []
    df = df[["step", key]].dropna()
    return [int(s) for s in df["step"]], [float(v) for v in df[key]]


def probe_history(run_dir: Path, probe: str) -> list[dict[str, Any]]:
    """The ``history`` list a probe callback wrote to ``probes/<probe>.json`` (empty if none)."""
    path = Path(run_dir) / "probes" / f"{probe}.json"
    return json.loads(path.read_text())["history"] if path.exists() else []


def series(history: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(h["step"], h[key]) for h in history if key in h]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def collect_runs(root: Path, config_keys: Sequence[str] = (), meta: Callable[[Path], dict | None] | None = None,
                 curves: bool = False) -> pd.DataFrame:
    """One row per run folder under ``root`` (any depth) holding a ``summary.json``.

    Columns: ``dir``, the summary's scalar entries (``status``, ``test/acc``, ...), ``summary`` (the whole
    dict, for nested entries), each override of ``.hydra/overrides.yaml`` (numbers as floats), each of
    ``config_keys`` read from the resolved config, ``meta(run_dir)``'s entries (a run whose ``meta`` is
    None is skipped), and with ``curves`` a ``curves`` column (:func:`read_curves`)."""
    rows = []
    for summary_path in sorted(Path(root).rglob("summary.json")):
        run_dir = summary_path.parent
        extra = meta(run_dir) if meta else {}
        if extra is None:
            continue
        summary = json.loads(summary_path.read_text())
        row: dict[str, Any] = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
        row.update({k: (to_float(v) if not math.isnan(to_float(v)) else v) for k, v in read_overrides(run_dir).items()})
        row.update(read_config(run_dir, config_keys) if config_keys else {})
        row.update(extra, dir=str(run_dir), summary=summary)
        if curves:
            row["curves"] = read_curves(run_dir)
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------
# aggregation over seeds
# ------------------------------------------------------------------------------------------------
def _finite(values: Any) -> pd.Series:
    s = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").astype(float)
    return s.where(s.abs() != math.inf)


def mean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    """(mean, sample std, n) of the finite numbers in ``values``; std 0 for one value, NaN mean for none."""
    s = _finite(list(values)).dropna()
    n = len(s)
    if n == 0:
        return math.nan, math.nan, 0
    return float(s.mean()), float(s.std(ddof=1)) if n > 1 else 0.0, n


def median(values: Iterable[Any]) -> float:
    """Median of the numbers in ``values``, NaN left out (NaN for none): robust to one outlying probe."""
    s = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").astype(float).dropna()
    return float(s.median()) if len(s) else math.nan


def aggregate(df: pd.DataFrame, by: str | Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Mean, sample std and count of each of ``values`` per group of ``by`` (non-finite entries ignored).

    Columns ``<value>_mean``, ``<value>_std`` (0 for a single run, so plots draw no bar), ``<value>_n``;
    one row per group, sorted by ``by``."""
    by = [by] if isinstance(by, str) else list(by)
    work = df[by].copy()
    for v in values:
        work[v] = _finite(df[v]).values if v in df else math.nan
    g = work.groupby(by, sort=True, dropna=False)[list(values)].agg(["mean", "std", "count"])
    g.columns = [f"{v}_{'n' if stat == 'count' else stat}" for v, stat in g.columns]
    for v in values:
        g.loc[g[f"{v}_n"] == 1, f"{v}_std"] = 0.0
    return g.reset_index()


def fmt_mean_std(values: Iterable[Any], scale: float = 1.0, digits: int = 1) -> str:
    """``"m ± sd"`` over seeds (just ``"m"`` for one seed, ``"n/a"`` for none)."""
    m, sd, n = mean_std(values)
    if n == 0:
        return "n/a"
    return f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}" if n > 1 else f"{m * scale:.{digits}f}"


def mean_curve(curves: Iterable[Sequence[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """Per-epoch mean and std over several runs' ``[(epoch, value)]`` curves (1-based epochs)."""
    frame = pd.DataFrame([(e, v) for c in curves for e, v in c], columns=["epoch", "value"])
    if frame.empty:
        return [], [], []
    agg = aggregate(frame, "epoch", ["value"]).dropna(subset=["value_mean"])
    return [int(e) + 1 for e in agg["epoch"]], list(agg["value_mean"]), list(agg["value_std"])


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------
def plt():
    """matplotlib.pyplot on the file-only Agg backend (drivers run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def marker_for(n_points: int) -> str | None:
    """A marker when a line has few points (a line alone is invisible with one point)."""
    return "o" if n_points <= 30 else None


def plot_mean_spread(ax, x: Sequence[float], mean: Sequence[float], std: Sequence[float], label: str,
                     color: str | None = None, scale: float = 1.0, style: str = "errorbar", **kw) -> None:
    """Seeds as mean with spread: error bars (``style="errorbar"``) or a ±std band (``"band"``)."""
    m = [scale * v for v in mean]
    s = [scale * (v if v == v else 0.0) for v in std]
    if style == "band":
        ax.plot(x, m, color=color, label=label, marker=kw.pop("marker", marker_for(len(x))), **kw)
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color, alpha=0.2)
    else:
        ax.errorbar(x, m, yerr=s, marker=kw.pop("marker", "o"), capsize=3, label=label, color=color, **kw)


def epoch_axis(ax, label: str = "epoch") -> None:
    """Integer ticks on an epoch axis (no "1.25 epochs")."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)


def savefig(fig, path: Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG (tight layout), atomically (trainers.plots.save_png), and close it."""
    from shiftlab.trainers.plots import save_png

    fig.tight_layout()
    save_png(fig, Path(path), dpi=dpi)
    return Path(path)


# ------------------------------------------------------------------------------------------------
# the machine, reports, command line
# ------------------------------------------------------------------------------------------------
def describe_machine() -> dict[str, Any]:
    """Where figures were measured: host, CPU model, logical CPUs, torch and Python versions,
    torch threads, the accelerator (or "cpu") and the 1-minute load average (a shared machine)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"host": platform.node() or "host", "cpu": cpu, "logical_cpus": os.cpu_count(),
            "machine": platform.machine(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def machine() -> str:
    """:func:`describe_machine` as one line."""
    d = describe_machine()
    return (f"{d['host']}: {d['cpu']}, {d['logical_cpus']} logical CPUs ({d['machine']}), torch {d['torch']} "
            f"({d['torch_threads']} thread(s), {d['accelerator']}), Python {d['python']}, "
            f"load average {d['load_avg_1min']}")


def write_report(out: Path, title: str, command: str, rows: list[tuple[str, str, str, str]],
                 notes: Sequence[str], figures: Sequence[str], wall_s: float, extra: Sequence[str] = ()) -> Path:
    """README-style ``SUMMARY.md``: claim vs measured vs held, figures, notes, how it was run."""
    lines = [f"# {title}", "", f"Command: `{command}`  ", f"Machine: {machine()}  ",
             f"Wall time: {wall_s:.0f} s", "", "| claim (paper) | measured here | held? |", "|---|---|---|"]
    lines += [f"| {c} | {m} | {h} |" for c, m, h, _ in rows]
    lines += [""] + [f"- *{c}*: {detail}" for c, _, _, detail in rows if detail]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += [""] + list(extra) if extra else []
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    path = out / "SUMMARY.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path


def output_dir(name: str, quick: bool, out: Path | None = None) -> Path:
    """``out`` if given, else ``outputs/<name>``; ``--quick`` runs go to ``outputs/<name>/quick`` so they
    never overwrite (or get mixed into) the full run's folders."""
    if out is not None:
        return out
    return Path("outputs") / name / "quick" if quick else Path("outputs") / name


def base_parser(description: str) -> argparse.ArgumentParser:
    """--out / --quick / --reuse / --threads, shared by the reproduction drivers."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default outputs/<experiment>, or outputs/<experiment>/quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a few epochs only (smoke test of the pipeline)")
    p.add_argument("--reuse", action="store_true", help="re-plot existing runs in --out instead of training")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: these models are tiny; more threads mostly add contention)")
    return p


def setup_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))
