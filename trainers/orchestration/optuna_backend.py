"""``backend=local``: Optuna's ``study.optimize`` in this process.

The study lives in ``sweep.storage`` (SQLite by default), so running the same command again adds
trials to it. With an RDB storage every trial sends Optuna heartbeats; a trial whose process died
is failed by Optuna once its heartbeat is older than ``grace_period_s``, recorded as such in its
``trial.json`` and run again (at most ``max_retry`` times). A trial stopped by SIGINT / SIGTERM
ends the sweep and is enqueued to run first on the next invocation.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

from omegaconf import DictConfig

from shiftlab.trainers.orchestration.records import (finish, on_stale_trial, study_trials, sync_trial_records,
                                                     trial_dir)
from shiftlab.trainers.orchestration.settings import SweepError, SweepSettings
from shiftlab.trainers.orchestration.space import build_pruner, build_sampler, parse_search_space, suggest
from shiftlab.trainers.orchestration.trial import SweepInterrupted, TrialFailed, run_trial

log = logging.getLogger("shiftlab.sweep")


def run_local(settings: SweepSettings, overrides: Sequence[str],
              train_fn: Callable[[DictConfig], dict] | None = None) -> dict[str, Any]:
    """Optuna ``study.optimize`` in this process; returns the sweep record.

    With an RDB storage every trial sends Optuna heartbeats; before each new trial Optuna fails
    trials whose heartbeat stopped more than ``grace_period_s`` ago (their process died) and
    :func:`.records.on_stale_trial` records that and enqueues them again.
    """
    import optuna

    from shiftlab.callbacks.optuna_pruning import OptunaReporter

    space = parse_search_space(settings.params)
    study = create_study(settings)
    for point in settings.enqueue:
        study.enqueue_trial(dict(point), skip_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        params = {name: suggest(trial, name, dist) for name, dist in space.items()}
        run_dir = trial_dir(settings, trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        meta = {"number": trial.number, "backend": "local", "study": settings.study_name}
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        retry_of = frozen.system_attrs.get("failed_trial")  # set by the stale-trial retry callback
        if retry_of is not None:
            meta["retry_of"] = retry_of
        record = run_trial(overrides, params, run_dir, OptunaReporter(trial), settings.metric,
                           meta=meta, train_fn=train_fn)
        trial.set_user_attr("reason", record["reason"])
        if record.get("interrupted"):
            # A signal (Ctrl-C, a scheduler's SIGTERM) stops the whole sweep; the interrupted
            # parameters run first when the study is started again.
            study.enqueue_trial(params, user_attrs={"requeued_from": trial.number})
            raise SweepInterrupted(record["interrupted"], trial.number)
        if record["state"] == "pruned":
            raise optuna.TrialPruned(record["reason"])
        if record["state"] == "failed":
            raise TrialFailed(record["reason"])
        return float(record["value"])

    start = time.perf_counter()
    study.optimize(objective, n_trials=settings.n_trials, timeout=settings.timeout_s, catch=(TrialFailed,))
    sync_trial_records(settings, study)
    return finish(settings, study_trials(study), time.perf_counter() - start)


def _storage(settings: SweepSettings) -> Any:
    """``settings.storage`` as an Optuna storage; RDB URLs get heartbeats and stale-trial retries."""
    import warnings

    import optuna

    if settings.storage is None:
        return None
    if settings.heartbeat_interval_s is None:
        return optuna.storages.RDBStorage(settings.storage)
    import inspect

    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    if retry_cls is None:  # optuna < 4.9
        retry_cls = optuna.storages.RetryFailedTrialCallback
    key = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
           in inspect.signature(optuna.storages.RDBStorage).parameters else "failed_trial_callback")
    with warnings.catch_warnings():  # heartbeats and retries are "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = retry_cls(max_retry=settings.max_retry)

        def on_stale(study: Any, trial: Any) -> None:
            on_stale_trial(settings, study, trial)
            retry(study, trial)

        return optuna.storages.RDBStorage(settings.storage, heartbeat_interval=settings.heartbeat_interval_s,
                                          grace_period=settings.grace_period_s, **{key: on_stale})


def existing_trials(settings: SweepSettings) -> int:
    """How many trials the stored study already holds (0 for a new or in-memory study)."""
    import optuna

    if settings.storage is None:
        return 0
    try:
        summaries = optuna.study.get_all_study_summaries(settings.storage, include_best_trial=False)
    except Exception:  # noqa: BLE001 - no database yet
        return 0
    return next((s.n_trials for s in summaries if s.study_name == settings.study_name), 0)


def create_study(settings: SweepSettings):
    import optuna

    settings.dir.mkdir(parents=True, exist_ok=True)
    if settings.storage is None and (settings.dir / "trials").exists() and any((settings.dir / "trials").iterdir()):
        raise SweepError(f"sweep.dir={settings.dir} already holds trials of an in-memory study; allowed: a new "
                         "sweep.dir, or sweep.storage=sqlite:///... to resume a study")
    storage = _storage(settings)
    n_existing = existing_trials(settings)
    if n_existing:
        log.info("resuming study %s: %d trials already stored; the sampler's seed is derived from seed=%s and "
                 "that count", settings.study_name, n_existing, settings.sampler_args.get("seed", settings.seed))
    return optuna.create_study(study_name=settings.study_name, storage=storage,
                               sampler=build_sampler(settings, n_existing), pruner=build_pruner(settings),
                               direction=settings.direction, load_if_exists=True)


