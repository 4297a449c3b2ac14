"""One trial, the same for both backends: compose its config, train, write ``trial.json``.

A trial's config is the one ``shiftlab-train <overrides> <params>`` would compose (Hydra's
compose API), with the run directory set and the pruning callback added; the run is the
unchanged :func:`shiftlab.trainers.train.train`. A failing run is recorded, never raised, so one
bad trial does not end the sweep.
"""
from __future__ import annotations

import logging
import math
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from shiftlab.trainers.compose import CONFIG_DIR, compose
from shiftlab.trainers.orchestration.records import write_json
from shiftlab.trainers.orchestration.settings import PRUNING_CALLBACK, SWEEP_KEYS, SweepError

log = logging.getLogger("shiftlab.sweep")


class TrialFailed(RuntimeError):
    """Raised in the Optuna objective so the study records the trial as FAIL and goes on."""


class SweepInterrupted(Exception):
    """A trial was stopped by SIGINT / SIGTERM: the sweep ends (exit 130 / 143) and resumes later."""

    def __init__(self, status: str, number: int) -> None:
        self.status, self.number = status, number
        super().__init__(f"trial {number} {status}; the sweep stops here and re-runs its parameters first "
                         "when started again")


def route_overrides(args: Sequence[str]) -> list[str]:
    """Command-line overrides with the sweep's short keys (``backend=ray``) moved under ``sweep.``."""
    routed = []
    for arg in args:
        prefix = ""
        body = arg
        for p in ("++", "+", "~"):
            if body.startswith(p):
                prefix, body = p, body[len(p):]
                break
        key = body.split("=", 1)[0]
        if key.split(".", 1)[0] in SWEEP_KEYS and key.split(".", 1)[0] != "params":
            body = "sweep." + body
        routed.append(prefix + body)
    return routed


def format_override(key: str, value: Any) -> str:
    """``key=value`` in Hydra's override grammar (strings quoted when they need it)."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    else:
        text = str(value)
        if not text.replace("_", "").replace("-", "").replace(".", "").replace("/", "").isalnum():
            text = "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{key}={text}"


def compose_config(overrides: Sequence[str], config_dir: Path = CONFIG_DIR) -> DictConfig:
    """The train config exactly as ``shiftlab-train <overrides>`` would compose it."""
    return compose(overrides, config_dir=config_dir, job_name="sweep")


def trial_config(overrides: Sequence[str], params: Mapping[str, Any], run_dir: Path, metric: str) -> DictConfig:
    """Compose one trial: base overrides + its parameters; run dir and pruning callback set."""
    clashes = sorted({o.lstrip("+~").split("=", 1)[0] for o in overrides} & set(params))
    if clashes:
        raise SweepError(f"{clashes[0]} is both overridden on the command line and swept; allowed: one of them")
    cfg = compose_config(list(overrides) + [format_override(k, v) for k, v in params.items()])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        if cfg.get("callbacks") is None:
            cfg.callbacks = {}
        cfg.callbacks.optuna_pruning = {"_target_": PRUNING_CALLBACK, "monitor": metric}
    return cfg


def _write_run_config(cfg: DictConfig, overrides: Sequence[str], run_dir: Path) -> None:
    """What Hydra's run mode would leave in ``.hydra/`` (the compose API writes nothing)."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(ListConfig(list(overrides))))


def run_trial(overrides: Sequence[str], params: Mapping[str, Any], run_dir: Path, reporter: Any,
              metric: str, meta: Mapping[str, Any] | None = None,
              train_fn: Callable[[DictConfig], dict] | None = None) -> dict[str, Any]:
    """Compose, train and record one trial; never raises for a failing run.

    Returns the trial record also written to ``<run_dir>/trial.json``: ``state`` is ``complete``,
    ``pruned`` or ``failed``, ``reason`` says why it ended, ``value`` is the metric.
    """
    from shiftlab.callbacks.optuna_pruning import active_reporter

    record: dict[str, Any] = {**(meta or {}), "params": dict(params), "metric": metric, "state": "running",
                              "value": None, "reason": None, "run_dir": str(run_dir)}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "trial.json", record)
    start = time.perf_counter()
    try:
        param_overrides = [format_override(k, v) for k, v in params.items()]
        cfg = trial_config(overrides, params, run_dir, metric)
        _write_run_config(cfg, list(overrides) + param_overrides, run_dir)
        if train_fn is None:
            from shiftlab.trainers.train import train as train_fn
        with active_reporter(reporter):
            summary = train_fn(cfg)
        value = _metric(summary, metric)
        status = summary.get("status", "completed")
        if reporter.pruned:
            last = reporter.history[-1][1] if reporter.history else value
            record.update(state="pruned", value=last, reason=reporter.reason or summary.get("stop_reason"))
        elif status in ("interrupted", "preempted"):
            record.update(state="failed", value=value, interrupted=status,
                          reason=f"{status}: {summary.get('stop_reason')}; queued again for the next invocation")
        elif status != "completed":
            record.update(state="failed", value=value, reason=f"{status}: {summary.get('stop_reason')}")
        elif value is None or not math.isfinite(value):
            record.update(state="failed", value=None,
                          reason=f"{metric} is {value!r} in summary.json (optimized_metric must be a finite number)")
        else:
            record.update(state="complete", value=value, reason=summary.get("stop_reason"))
    except Exception as e:  # noqa: BLE001 - a failed trial must not end the sweep
        record.update(state="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        (run_dir / "error.log").write_text(traceback.format_exc())
        log.error("trial %s failed: %s", record.get("number", record.get("trial_id")), record["reason"])
    record["duration_s"] = round(time.perf_counter() - start, 3)
    record["epochs_reported"] = len(reporter.history)
    write_json(run_dir / "trial.json", record)
    return record


def _metric(summary: Mapping[str, Any], name: str) -> float | None:
    value = summary.get(name)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None

