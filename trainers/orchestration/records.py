"""Trial records: ``trials/<id>/trial.json`` per trial and ``sweep.json`` per sweep.

Why they exist next to the study database: the report and people read run directories, and a
killed process can leave a ``trial.json`` the study contradicts; :func:`sync_trial_records`
makes the records agree with ``study.db`` (which wins) on every invocation. Optuna's own table
of trials (``study.trials_dataframe()``) is what :func:`study_trials` reads.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from shiftlab.trainers.orchestration.ray_settings import SWEEP_KEYS as RAY_KEYS
from shiftlab.trainers.orchestration.settings import SweepSettings

log = logging.getLogger("shiftlab.sweep")


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Written atomically: a kill mid-write leaves the previous record, never half of one."""
    from shiftlab.trainers.checkpoint_io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def read_record(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def trial_dir(settings: SweepSettings, number: int) -> Path:
    return settings.dir / "trials" / f"{number:04d}"


def stale_reason(settings: SweepSettings) -> str:
    grace = settings.grace_period_s or 2 * (settings.heartbeat_interval_s or 0)
    return f"stale: the process running it stopped (no Optuna heartbeat for over {grace} s); marked failed"


def on_stale_trial(settings: SweepSettings, study: Any, trial: Any) -> None:
    """A trial left RUNNING by a dead process was just failed: say so in its ``trial.json``."""
    path = trial_dir(settings, trial.number) / "trial.json"
    record = read_record(path)
    retries = len(trial.system_attrs.get("retry_history", [])) + 1
    will_retry = settings.max_retry is None or retries <= settings.max_retry
    reason = stale_reason(settings) + ("; run again as a new trial" if will_retry else
                                        f"; not retried (sweep.max_retry={settings.max_retry} reached)")
    record.update(number=trial.number, params=dict(trial.params), state="failed", value=None, reason=reason)
    record.setdefault("run_dir", str(path.parent))
    write_json(path, record)
    log.warning("trial %d was left RUNNING by a process that died: %s", trial.number, reason)


def sync_trial_records(settings: SweepSettings, study: Any) -> int:
    """Make every started trial's ``trial.json`` agree with the study's state (study.db wins).

    Why: ``trial.json`` is written by the trial itself; a process killed between its last write
    and Optuna's ``tell`` (or before the trial wrote anything) leaves a record the study
    contradicts, and the report is built from these records. Returns how many were rewritten.
    """
    from optuna.trial import TrialState

    retried = {t.system_attrs.get("failed_trial"): t.number for t in study.get_trials(deepcopy=False)
               if t.system_attrs.get("failed_trial") is not None}
    changed = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue  # enqueued, never started: not a run yet
        state = {"fail": "failed"}.get(t.state.name.lower(), t.state.name.lower())
        path = trial_dir(settings, t.number) / "trial.json"
        record = read_record(path)
        note = f"retried as trial {retried[t.number]}" if t.number in retried else None
        if state == "running" and record.get("state") is not None:
            continue  # maybe alive in another process; its own records are the newest
        if record.get("state") == state and (note is None or note in str(record.get("reason"))):
            continue
        if state == "failed":
            reason = record.get("reason") if record.get("state") == "failed" else stale_reason(settings)
        else:
            reason = t.user_attrs.get("reason") or record.get("reason")
        if note is not None and note not in str(reason):
            reason = f"{reason}; {note}"
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        value = t.value if state == "complete" else last if state == "pruned" else None
        record.update(number=t.number, params=dict(t.params), state=state, reason=reason, value=value,
                      metric=settings.metric)
        record.setdefault("run_dir", str(path.parent))
        write_json(path, record)
        changed += 1
    return changed



def study_trials(study: Any) -> list[dict[str, Any]]:
    """Optuna's view of every trial (also the ones of earlier runs of a resumed study), from the
    study's own data frame: one record per trial, parameters a trial did not draw left out.

    A parameter column with a gap (a trial still waiting) is float in the frame; each value is
    passed through its Optuna distribution to get its own type back (64, not 64.0)."""
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs"))
    if frame.empty:
        return []
    dists: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        dists.update(t.distributions)
    frame = frame.astype(object).where(frame.notna(), None)  # Python ints / floats, None for missing

    def typed(name: str, value: Any) -> Any:
        dist = dists[name]
        return dist.to_external_repr(dist.to_internal_repr(value))

    params = [c for c in frame.columns if c.startswith("params_")]
    rows = []
    for row in frame.to_dict("records"):
        state = str(row["state"]).lower()
        rows.append({"number": row["number"], "state": {"fail": "failed"}.get(state, state), "value": row["value"],
                     "params": {c[len("params_"):]: typed(c[len("params_"):], row[c]) for c in params
                                if row[c] is not None},
                     "run_dir": row.get("user_attrs_run_dir"), "reason": row.get("user_attrs_reason")})
    return rows


def best_trial(trials: Sequence[Mapping[str, Any]], direction: str) -> Mapping[str, Any] | None:
    done = [t for t in trials if t.get("state") == "complete" and t.get("value") is not None]
    if not done:
        return None
    pick = max if direction == "maximize" else min
    return pick(done, key=lambda t: float(t["value"]))


def finish(settings: SweepSettings, trials: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Write and return ``sweep.json``: settings, counts per state, the best trial."""
    shown = asdict(settings)
    shown["ray"] = {k: shown["ray"][k] for k in RAY_KEYS}  # the keys a sweep uses
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    best = best_trial(trials, settings.direction)
    record = {
        "study_name": settings.study_name, "metric": settings.metric, "direction": settings.direction,
        "backend": settings.backend, "sampler": settings.sampler, "pruner": settings.pruner,
        "storage": settings.storage, "n_trials_requested": settings.n_trials, "counts": counts,
        "wall_time_s": round(wall_s, 3), "best": dict(best) if best else None,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in shown.items()},
    }
    write_json(settings.dir / "sweep.json", record)
    return record

