"""``shiftlab-report <sweep dir>``: one table and one plot per swept parameter for a whole sweep.

Reads every run directory below the sweep directory -- ``trial.json`` (written by
``shiftlab-sweep``: params, state, reason) and/or ``summary.json`` + ``.hydra/`` (written by every
run, so plain Hydra ``--multirun`` directories work too) -- and writes ``<sweep dir>/report/``:
``runs.csv`` (every scalar of every summary), ``report.md`` (the table people read, best run
named first) and ``plots/<metric>_vs_<param>.png``. Failed and pruned runs are listed with their
reason; pruned runs are plotted at their last reported value, failed ones are not plotted.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

STATES = ("complete", "pruned", "failed", "running")
NOT_PARAMS = ("hydra.", "paths.", "print_config", "trainer.enable_")  # overrides that are not experiment knobs
SKIP_DIRS = {"report", "ray", ".hydra", "checkpoints", "plots", "wandb", "tensorboard"}


class ReportError(ValueError):
    """Nothing to report; the message says what was expected."""


# --------------------------------------------------------------------------------------------
# collecting runs
# --------------------------------------------------------------------------------------------
def find_run_dirs(root: Path) -> list[Path]:
    """Directories below ``root`` holding ``trial.json`` or ``summary.json`` (not descending into
    run internals or the report itself)."""
    found: list[Path] = []

    def walk(d: Path) -> None:
        names = {p.name for p in d.iterdir()}
        if d != root and ({"trial.json", "summary.json"} & names):
            found.append(d)
        for p in sorted(d.iterdir()):
            if p.is_dir() and p.name not in SKIP_DIRS and not p.name.startswith("."):
                walk(p)

    walk(root)
    return found


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _overrides(run_dir: Path) -> dict[str, Any]:
    """``key=value`` overrides of a Hydra run (``.hydra/overrides.yaml``), values parsed as yaml."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, sep, value = str(item).lstrip("+~").partition("=")
        if sep:
            try:
                out[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                out[key] = value
    return out


def _config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / ".hydra" / "config.yaml"
    try:
        return yaml.safe_load(path.read_text()) or {} if path.exists() else {}
    except yaml.YAMLError:
        return {}


def _state(trial: Mapping[str, Any] | None, summary: Mapping[str, Any] | None) -> tuple[str, str | None]:
    if trial and trial.get("state"):
        state = {"fail": "failed"}.get(trial["state"], trial["state"])
        return state, trial.get("reason") or (summary or {}).get("stop_reason")
    if summary is None:
        return "failed", "no summary.json"
    if summary.get("sweep/pruned"):
        return "pruned", summary.get("stop_reason")
    status = summary.get("status", "completed")
    if status == "completed":
        return "complete", summary.get("stop_reason")
    return "failed", f"{status}: {summary.get('stop_reason')}"


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def collect(root: Path, swept: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per run: ``run``, ``state``, ``reason``, ``params`` (dict) and ``summary`` (scalars)."""
    rows = []
    for run_dir in find_run_dirs(root):
        trial = _read_json(run_dir / "trial.json")
        summary = _read_json(run_dir / "summary.json")
        state, reason = _state(trial, summary)
        if trial and trial.get("params") is not None:
            params = dict(trial["params"])
        else:
            overrides = _overrides(run_dir)
            params = {k: v for k, v in overrides.items()
                      if (k in swept if swept is not None else not k.startswith(NOT_PARAMS))}
        scalars = {k: v for k, v in (summary or {}).items() if _scalar(v) and not isinstance(v, bool)}
        rows.append({"run": run_dir.relative_to(root).as_posix(), "state": state, "reason": reason,
                     "params": params, "summary": scalars, "trial": trial or {}, "config": _config(run_dir)})
    return rows


def _as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def metric_of(row: Mapping[str, Any], metric: str) -> float | None:
    """The run's metric: ``summary.json`` if the run finished, else the trial's last reported value."""
    value = _as_float(row["summary"].get(metric))
    if value is None and row["trial"]:
        value = _as_float(row["trial"].get("value"))
    return value


def sweep_meta(root: Path, rows: Sequence[Mapping[str, Any]], metric: str | None,
               direction: str | None) -> tuple[str, str, str]:
    """(metric, direction, where they came from): CLI > sweep.json > the runs' configs > a guess."""
    meta = _read_json(root / "sweep.json") or {}
    source = "command line"
    if metric is None:
        metric, source = meta.get("metric"), "sweep.json"
    if metric is None:
        for row in rows:
            if row["config"].get("optimized_metric"):
                metric, source = row["config"]["optimized_metric"], "run config"
                if direction is None and row["config"].get("optimized_metric_mode") in ("min", "max"):
                    direction = {"max": "maximize", "min": "minimize"}[row["config"]["optimized_metric_mode"]]
                break
    if metric is None:
        raise ReportError(f"no metric known for {root}: pass --metric (no sweep.json, no optimized_metric in runs)")
    if direction is None:
        direction = meta.get("direction")
    if direction is None:
        lowered = metric.lower()
        direction = "minimize" if any(w in lowered for w in ("loss", "err", "perplexity")) else "maximize"
        source += f" (direction guessed from the name: {direction})"
    if direction not in ("maximize", "minimize"):
        raise ReportError(f"direction={direction!r} is not allowed; allowed: maximize, minimize")
    return metric, direction, source


# --------------------------------------------------------------------------------------------
# tables and plots
# --------------------------------------------------------------------------------------------
def _param_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for k in row["params"]:
            if k not in names:
                names.append(k)
    return names


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def best_row(rows: Sequence[Mapping[str, Any]], metric: str, direction: str) -> Mapping[str, Any] | None:
    done = [r for r in rows if r["state"] == "complete" and metric_of(r, metric) is not None]
    if not done:
        return None
    pick = max if direction == "maximize" else min
    return pick(done, key=lambda r: metric_of(r, metric))


def _sort_key(metric: str, direction: str):
    sign = -1.0 if direction == "maximize" else 1.0

    def key(row: Mapping[str, Any]) -> tuple:
        value = metric_of(row, metric)
        return (STATES.index(row["state"]) if row["state"] in STATES else 9,
                sign * value if value is not None else math.inf, row["run"])

    return key


def write_csv(rows: Sequence[Mapping[str, Any]], metric: str, path: Path) -> None:
    params = _param_names(rows)
    summary_keys: list[str] = []
    for row in rows:
        for k in row["summary"]:
            if k not in summary_keys and k not in ("status", "stop_reason"):
                summary_keys.append(k)
    header = ["run", "state", metric, *params, "reason", *[k for k in summary_keys if k != metric]]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row["run"], row["state"], metric_of(row, metric),
                             *[row["params"].get(p) for p in params], row["reason"] or "",
                             *[row["summary"].get(k) for k in summary_keys if k != metric]])


def markdown(rows: Sequence[Mapping[str, Any]], metric: str, direction: str, source: str,
             plots: Sequence[Path], root: Path) -> str:
    params = _param_names(rows)
    best = best_row(rows, metric, direction)
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES if any(r["state"] == s for r in rows)}
    lines = [f"# Sweep report: {root.name}", ""]
    if best is not None:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
        lines.append(f"**Best run: `{best['run']}`** -- {metric} = {_fmt(metric_of(best, metric))} ({shown})")
    else:
        lines.append("**Best run: none** -- no run completed with a finite metric.")
    lines += ["", f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()) +
              f". Metric `{metric}`, {direction} (from {source}).", ""]
    extra = [k for k in ("epochs_run", "wall_time_s") if any(k in r["summary"] for r in rows)]
    header = ["run", "state", metric, *params, *extra, "reason"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        mark = " (best)" if best is not None and row["run"] == best["run"] else ""
        cells = [f"`{row['run']}`{mark}", row["state"], _fmt(metric_of(row, metric)),
                 *[_fmt(row["params"].get(p)) for p in params], *[_fmt(row["summary"].get(k)) for k in extra],
                 _fmt(row["reason"])]
        lines.append("| " + " | ".join(cells) + " |")
    if plots:
        lines += ["", "## Metric against each swept parameter", ""]
        lines += [f"![{p.stem}]({p.relative_to(root / 'report').as_posix()})" for p in plots]
    return "\n".join(lines) + "\n"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def plot_param(rows: Sequence[Mapping[str, Any]], metric: str, param: str, best: Mapping[str, Any] | None,
               path: Path, log_hint: bool = False) -> Path:
    """Metric against one parameter: numbers on a log axis (if searched on one, or spanning 10x and
    positive), else categories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=110)
    values = [r["params"].get(param) for r in rows if param in r["params"]]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and values
    categories = sorted({str(v) for v in values}) if not numeric else []
    style = {"complete": ("o", "tab:blue"), "pruned": ("x", "tab:orange"), "running": ("s", "tab:gray")}
    failed = 0
    for state, (marker, color) in style.items():
        xs, ys = [], []
        for r in rows:
            if r["state"] != state or param not in r["params"]:
                continue
            y = metric_of(r, metric)
            if y is None:
                continue
            v = r["params"][param]
            xs.append(float(v) if numeric else categories.index(str(v)))
            ys.append(y)
        if xs:
            ax.scatter(xs, ys, marker=marker, color=color, label=f"{state} ({len(xs)})")
    failed = sum(r["state"] == "failed" for r in rows)
    if best is not None and param in best["params"]:
        v = best["params"][param]
        ax.scatter([float(v) if numeric else categories.index(str(v))], [metric_of(best, metric)], marker="*",
                   s=220, facecolor="none", edgecolor="crimson", linewidth=1.5, label="best")
    if numeric:
        pos = [float(v) for v in values if float(v) > 0]
        if len(pos) == len(values) and len(pos) > 1 and (log_hint or max(pos) / min(pos) >= 10):
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(categories)), categories, rotation=20 if len(categories) > 4 else 0)
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {param}" + (f"  ({failed} failed, not shown)" if failed else ""), fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _searched_on_log_scale(spec: Any) -> bool:
    if isinstance(spec, Mapping):
        return bool(spec.get("log"))
    return isinstance(spec, str) and "log" in spec


def make_report(root: Path | str, metric: str | None = None, direction: str | None = None,
                out_dir: Path | str | None = None) -> dict[str, Any]:
    """Write ``runs.csv``, ``report.md`` and the plots; return their paths and the best run."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise ReportError(f"sweep dir {root} does not exist; allowed: a directory written by shiftlab-sweep "
                          "or a Hydra multirun")
    meta = _read_json(root / "sweep.json") or {}
    swept = list((meta.get("settings") or {}).get("params") or {}) or None
    rows = collect(root, swept)
    if not rows:
        raise ReportError(f"no run directories (with trial.json or summary.json) below {root}")
    metric, direction, source = sweep_meta(root, rows, metric, direction)
    rows.sort(key=_sort_key(metric, direction))
    out = Path(out_dir) if out_dir else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    best = best_row(rows, metric, direction)
    specs = (meta.get("settings") or {}).get("params") or {}
    plots = [plot_param(rows, metric, p, best, out / "plots" / f"{_safe(metric)}_vs_{_safe(p)}.png",
                        log_hint=_searched_on_log_scale(specs.get(p)))
             for p in _param_names(rows) if len({repr(r["params"].get(p)) for r in rows if p in r["params"]}) > 1]
    write_csv(rows, metric, out / "runs.csv")
    md = markdown(rows, metric, direction, source, plots, root if out == root / "report" else out.parent)
    (out / "report.md").write_text(md)
    return {"csv": out / "runs.csv", "markdown": out / "report.md", "plots": plots,
            "best": best["run"] if best else None, "metric": metric, "direction": direction, "rows": len(rows)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shiftlab-report", description="One table (CSV + markdown) and one plot per "
                                     "swept parameter for all runs below a sweep directory; the best run named.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", help="summary.json key to rank by (default: the sweep's optimized_metric)")
    parser.add_argument("--direction", choices=("maximize", "minimize"))
    parser.add_argument("--out", type=Path, help="output directory (default: <sweep dir>/report)")
    args = parser.parse_args(argv)
    try:
        result = make_report(args.sweep_dir, args.metric, args.direction, args.out)
    except ReportError as e:
        print(f"shiftlab-report: error: {e}", file=sys.stderr)
        return 2
    best = result["best"] or "none (no completed run)"
    print(f"{result['rows']} runs, {result['metric']} ({result['direction']}); best: {best}")
    print(f"wrote {result['markdown']}, {result['csv']}, {len(result['plots'])} plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
