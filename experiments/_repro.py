"""Helpers shared by the paper reproductions: run a composed config, read its outputs, write a report.

Why: every reproduction is "a few training runs of the spine with different overrides, then
figures and a claim-vs-measured table"; keeping the plumbing here keeps each script about the
paper.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
QUIET = ["print_config=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "logger=csv"]


def compose(overrides: Sequence[str], out_dir: Path):
    from shiftlab.trainers.compose import compose as _compose

    return _compose(QUIET + list(overrides) + [f"paths.output_dir={out_dir}"])


def run(overrides: Sequence[str], out_dir: Path, reuse: bool = False) -> dict[str, Any]:
    """One training run of the spine into ``out_dir``; returns summary.json's dict.

    ``reuse``: keep an existing completed run (re-plotting without re-training)."""
    summary_path = out_dir / "summary.json"
    if reuse and summary_path.exists():
        return json.loads(summary_path.read_text())
    from shiftlab.trainers.train import train

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose(overrides, out_dir)
    t0 = time.perf_counter()
    summary = train(cfg)
    summary["_wall_s"] = time.perf_counter() - t0
    print(f"[{out_dir.name}] {time.perf_counter() - t0:.1f}s  val/acc={summary.get('val/acc')}  "
          f"test/acc={summary.get('test/acc')}", flush=True)
    return summary


def epoch_series(out_dir: Path, key: str) -> tuple[list[int], list[float]]:
    """(step, value) of an epoch-level metric from the run's metrics.csv."""
    steps, vals = [], []
    with open(out_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get(key) not in (None, ""):
                steps.append(int(row["step"]))
                vals.append(float(row[key]))
    return steps, vals


def probe_history(out_dir: Path, probe: str) -> list[dict[str, Any]]:
    path = out_dir / "probes" / f"{probe}.json"
    return json.loads(path.read_text())["history"] if path.exists() else []


def series(history: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(h["step"], h[key]) for h in history if key in h]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def median(vals: Sequence[float]) -> float:
    vals = [v for v in vals if v == v]
    return statistics.median(vals) if vals else float("nan")


def machine() -> str:
    try:
        import torch

        threads = torch.get_num_threads()
    except Exception:  # pragma: no cover
        threads = "?"
    return f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch threads {threads}"


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def write_report(out: Path, title: str, command: str, rows: list[tuple[str, str, str, str]],
                 notes: Sequence[str], figures: Sequence[str], wall_s: float, extra: Sequence[str] = ()) -> Path:
    """README-style markdown: claim vs measured vs held, figures, notes, how it was run."""
    lines = [f"# {title}", "", f"Command: `{command}`  ", f"Machine: {machine()}  ",
             f"Wall time: {wall_s:.0f} s", "", "| claim (paper) | measured here | held? |", "|---|---|---|"]
    lines += [f"| {c} | {m} | {h} |" for c, m, h, _ in rows]
    lines += [""]
    for c, _, _, detail in rows:
        if detail:
            lines += [f"- *{c}*: {detail}"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if extra:
        lines += [""] + list(extra)
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    path = out / "SUMMARY.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path


def base_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=Path("outputs") / default_out, help="output directory")
    p.add_argument("--quick", action="store_true", help="a few epochs only (smoke test of the pipeline)")
    p.add_argument("--reuse", action="store_true", help="re-plot existing runs in --out instead of training")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: these models are tiny; more threads mostly add contention)")
    return p


def setup_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))
