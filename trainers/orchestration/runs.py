"""Collect the run directories below a sweep or multirun directory into rows and a data frame.

Reads ``trial.json`` (written by ``shiftlab-sweep``: params, state, reason) and/or
``summary.json`` + ``.hydra/`` (written by every run, so plain Hydra ``--multirun`` directories
work too). :func:`runs_frame` turns the rows into the pandas table the report sorts, aggregates
and writes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import yaml

if TYPE_CHECKING:
    import pandas as pd

STATES = ("complete", "pruned", "failed", "running")
NOT_PARAMS = ("hydra.", "paths.", "print_config", "trainer.enable_")  # overrides that are not experiment knobs
SKIP_DIRS = {"report", "ray", ".hydra", "checkpoints", "plots", "wandb", "tensorboard"}
SEED_KEYS = ("seed",)  # parameters that repeat a run rather than change it


class ReportError(ValueError):
    """Nothing to report; the message says what was expected."""


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
    """``key=value`` overrides of a Hydra run (``.hydra/overrides.yaml``), read with Hydra's own
    override grammar (quoting, lists, dicts as on the command line); deletions (``~key``) skipped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    parser = OverridesParser.create()
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        try:
            override = parser.parse_override(str(item))
        except Exception:  # noqa: BLE001 - Hydra raises its own OverrideParseException; not a knob then
            continue
        if override.is_delete() or override.is_sweep_override():
            continue
        out[override.get_key_element().lstrip("+~")] = override.value()
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
def param_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for k in row["params"]:
            if k not in names:
                names.append(k)
    return names



def runs_frame(rows: Sequence[Mapping[str, Any]], metric: str) -> pd.DataFrame:
    """One row per run: ``run``, ``state``, the metric, every parameter, ``reason``, then every
    other scalar of the summaries, in the order they first appear.

    The columns hold Python objects (dtype object) with None where a run lacks a value, so an
    integer column with a gap stays integers and an empty cell stays empty in the CSV."""
    import pandas as pd

    params = param_names(rows)
    extra: list[str] = []
    for row in rows:
        extra += [k for k in row["summary"] if k not in extra and k not in ("status", "stop_reason", metric)]
    records = [{"run": row["run"], "state": row["state"], metric: metric_of(row, metric),
                **{p: row["params"].get(p) for p in params}, "reason": row["reason"] or None,
                **{k: row["summary"].get(k) for k in extra}} for row in rows]
    columns = ["run", "state", metric, *params, "reason", *extra]
    # a parameter named like a summary key (or "reason") keeps one column: the parameter's
    columns = list(dict.fromkeys(columns))
    return pd.DataFrame(records, columns=columns, dtype=object)
