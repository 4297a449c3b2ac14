"""``shiftlab-report <sweep dir>``: one table and one plot per swept parameter for a whole sweep.

Reads every run directory below the sweep directory (:mod:`.runs`) into a pandas table and writes
``<sweep dir>/report/``: ``runs.csv`` (every scalar of every summary), ``report.md`` (the table
people read, best run named first) and ``plots/<metric>_vs_<param>.png``. Failed and pruned runs
are listed with their reason; pruned runs are plotted at their last reported value, failed ones
are not plotted.

Runs that repeat a configuration with another ``seed`` are not ranked against each other: the
report gives the mean, sample standard deviation and count over seeds per configuration, and
names a best *configuration* (by mean), never a best seed.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from shiftlab.trainers.orchestration.report_plots import plot_param, safe_name
from shiftlab.trainers.orchestration.runs import (SEED_KEYS, STATES, ReportError, _read_json, collect, param_names,
                                                  runs_frame, sweep_meta)

if TYPE_CHECKING:
    import pandas as pd

SPREAD = ("mean", "std", "n", "min", "max")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def order(frame: pd.DataFrame, metric: str, direction: str) -> pd.DataFrame:
    """Complete runs first (best metric first), then pruned, failed, running; ties by run name."""
    sign = -1.0 if direction == "maximize" else 1.0
    keys = frame.assign(_state=frame["state"].map(lambda s: STATES.index(s) if s in STATES else 9),
                        _value=frame[metric].map(lambda v: math.inf if v is None else sign * v))
    return frame.loc[keys.sort_values(["_state", "_value", "run"], kind="stable").index].reset_index(drop=True)


def _finished(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    return frame[(frame["state"] == "complete") & frame[metric].notna()]


def best_run(frame: pd.DataFrame, metric: str, direction: str) -> pd.Series | None:
    """The complete run with the best metric (the first one in table order on a tie)."""
    done = _finished(frame, metric)
    if done.empty:
        return None
    values = done[metric].astype(float)
    return done.loc[values.idxmax() if direction == "maximize" else values.idxmin()]


def varied(frame: pd.DataFrame, params: Sequence[str]) -> list[str]:
    """The parameters that take more than one value across the runs that set them."""
    return [p for p in params if len({repr(v) for v in frame[p] if v is not None}) > 1]


def seed_spread(frame: pd.DataFrame, metric: str, params: Sequence[str],
                direction: str) -> tuple[list[str], pd.DataFrame] | None:
    """When runs repeat seeds: (the other varied parameters, one row per configuration with the
    metric's mean, sample std, n, min and max over its complete runs, best mean first); else None."""
    moving = varied(frame, params)
    if not any(p in SEED_KEYS for p in moving):
        return None
    knobs = [p for p in moving if p not in SEED_KEYS]
    done = _finished(frame, metric).assign(_v=lambda f: f[metric].astype(float))
    if knobs:
        table = done.groupby(knobs, dropna=False, sort=False)["_v"].agg(["mean", "std", "count", "min", "max"])
        table = table.rename(columns={"count": "n"}).reset_index()
        table = table.sort_values("mean", ascending=direction == "minimize", kind="stable").reset_index(drop=True)
    else:
        import pandas as pd

        v = done["_v"]
        table = pd.DataFrame([{"mean": v.mean(), "std": v.std(), "n": len(v), "min": v.min(), "max": v.max()}])
    return knobs, table.astype(object).where(table.notna(), None)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Every run, every scalar; empty cells where a run lacks a value (``nan`` where it logged one)."""
    import pandas as pd

    def cell(v: Any) -> Any:
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    # column by column as objects: DataFrame.map would infer dtypes again and turn 5 into 5.0
    shown = pd.DataFrame({c: pd.Series([cell(v) for v in frame[c]], dtype=object) for c in frame.columns})
    shown.to_csv(path, index=False, na_rep="", lineterminator="\r\n")


def _table(frame: pd.DataFrame, columns: Sequence[str], first: Sequence[str] | None = None) -> list[str]:
    """``frame[columns]`` as a markdown table (``first`` replaces the first column's cells)."""
    cells = frame[list(columns)].map(_fmt)
    if first is not None:
        cells[columns[0]] = list(first)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False, name=None)]


def _spread_text(row: Mapping[str, Any], metric: str) -> str:
    std = "n/a" if row["std"] is None else _fmt(row["std"])
    return (f"{metric} = {_fmt(row['mean'])} ± {std} (mean ± sample std over n={row['n']} seeds; "
            f"min {_fmt(row['min'])}, max {_fmt(row['max'])})")


def markdown(frame: pd.DataFrame, metric: str, direction: str, source: str, plots: Sequence[Path], out: Path,
             title: str, best: pd.Series | None, spread: tuple[list[str], pd.DataFrame] | None) -> str:
    """``report.md`` (written into ``out``): the headline (best run, or mean ± std over seeds), the
    counts, the spread per configuration when seeds repeat, every run, and links to the plots."""
    params = param_names_of(frame)
    counts = frame["state"].value_counts()
    lines = [f"# Sweep report: {title}", ""]
    if spread is not None:
        knobs, table = spread
        seeds = ", ".join(sorted({_fmt(v) for k in SEED_KEYS if k in frame for v in frame[k] if v is not None}))
        if table.empty or table["n"].iloc[0] in (0, None):
            lines.append("**Across seeds: no run completed with a finite metric.**")
        elif not knobs:
            lines.append(f"**Across seeds: {_spread_text(table.iloc[0], metric)}.** The runs differ only in "
                         f"their seed ({seeds}): no run is best.")
        else:
            top = table.iloc[0]
            shown = ", ".join(f"{k}={_fmt(top[k])}" for k in knobs)
            lines.append(f"**Best configuration: {shown}** -- {_spread_text(top, metric)}. Seeds: {seeds}.")
    elif best is not None:
        shown = ", ".join(f"{k}={_fmt(best[k])}" for k in params if best[k] is not None)
        lines.append(f"**Best run: `{best['run']}`** -- {metric} = {_fmt(best[metric])} ({shown})")
    else:
        lines.append("**Best run: none** -- no run completed with a finite metric.")
    lines += ["", f"{len(frame)} runs: " + ", ".join(f"{counts[s]} {s}" for s in STATES if s in counts) +
              f". Metric `{metric}`, {direction} (from {source}).", ""]
    if spread is not None and spread[0] and not spread[1].empty:
        lines += ["## Across seeds", ""] + _table(spread[1], [*spread[0], *SPREAD]) + ["", "## Runs", ""]
    extra = [k for k in ("epochs_run", "wall_time_s") if k in frame.columns]
    marked = [f"`{r}`" + (" (best)" if best is not None and spread is None and r == best["run"] else "")
              for r in frame["run"]]
    lines += _table(frame, ["run", "state", metric, *params, *extra, "reason"], first=marked)
    if plots:
        lines += ["", "## Metric against each swept parameter", ""]
        lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots]  # next to report.md
    return "\n".join(lines) + "\n"


def param_names_of(frame: pd.DataFrame) -> list[str]:
    """The parameter columns of a :func:`.runs.runs_frame` table (between the metric and ``reason``)."""
    columns = list(frame.columns)
    return columns[3:columns.index("reason")]


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
    frame = order(runs_frame(rows, metric), metric, direction)
    params = param_names(rows)
    out = Path(out_dir) if out_dir else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    spread = seed_spread(frame, metric, params, direction)
    best = best_run(frame, metric, direction) if spread is None else None
    specs = (meta.get("settings") or {}).get("params") or {}
    plots = []
    for p in varied(frame, params):
        if p in SEED_KEYS:
            continue  # a seed is a repetition, not a knob: its spread is in the table
        one_knob = spread is not None and spread[0] == [p]
        plots.append(plot_param(frame, metric, p, best, out / "plots" / f"{safe_name(metric)}_vs_{safe_name(p)}.png",
                                log_hint=_searched_on_log_scale(specs.get(p)),
                                spread=spread[1] if one_knob else None))
    write_csv(frame, out / "runs.csv")
    md = markdown(frame, metric, direction, source, plots, out, root.name, best, spread)
    (out / "report.md").write_text(md)
    across = None if spread is None else spread[1].to_dict("records")
    return {"csv": out / "runs.csv", "markdown": out / "report.md", "plots": plots,
            "best": best["run"] if best is not None else None, "metric": metric, "direction": direction,
            "rows": len(rows), "across_seeds": across}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shiftlab-report", description="One table (CSV + markdown) and one plot per "
                                     "swept parameter for all runs below a sweep directory; the best run named "
                                     "(runs that differ in their seed: mean ± std over seeds instead).")
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
    if result["across_seeds"] is not None and not result["across_seeds"]:
        best = "none (runs repeat seeds; no configuration completed)"
    elif result["across_seeds"] is not None:
        top = result["across_seeds"][0]
        best = (f"none (runs repeat seeds; {result['metric']} mean {_fmt(top['mean'])} ± {_fmt(top['std']) or 'n/a'}"
                f" over n={top['n']} for the best configuration)")
    else:
        best = result["best"] or "none (no completed run)"
    print(f"{result['rows']} runs, {result['metric']} ({result['direction']}); best: {best}")
    print(f"wrote {result['markdown']}, {result['csv']}, {len(result['plots'])} plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
