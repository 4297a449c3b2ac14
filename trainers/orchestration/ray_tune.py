"""``backend=ray``: Ray Tune runs the trials on a Ray cluster (``sweep.ray.address``).

Tune's ``OptunaSearch`` suggests the parameters (the same sampler and storage as the local
backend) and the Tune scheduler matching the configured pruner stops bad trials; every trial is
the same :func:`.trial.run_trial` as locally, on a Ray worker. ``sweep.dir`` must be on storage
every node sees.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from shiftlab.trainers.orchestration.optuna_backend import existing_trials
from shiftlab.trainers.orchestration.ray_settings import ray_session
from shiftlab.trainers.orchestration.records import finish, write_json
from shiftlab.trainers.orchestration.settings import SweepError, SweepSettings
from shiftlab.trainers.orchestration.space import build_sampler, parse_search_space
from shiftlab.trainers.orchestration.trial import TrialFailed, run_trial


def _ray_scheduler(settings: SweepSettings, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    args, mode = settings.pruner_args, "max" if settings.direction == "maximize" else "min"
    common = {"metric": "objective", "mode": mode, "time_attr": "training_iteration"}
    if settings.pruner == "median":
        return MedianStoppingRule(grace_period=max(1, int(args.get("n_warmup_steps", 0)) + 1),
                                  min_samples_required=max(1, int(args.get("n_startup_trials", 3))), **common)
    if settings.pruner == "successive_halving":
        return ASHAScheduler(max_t=max_t, grace_period=int(args.get("min_resource", 1) or 1),
                             reduction_factor=float(args.get("reduction_factor", 4)), **common)
    if settings.pruner == "hyperband":
        return HyperBandScheduler(max_t=max_t, reduction_factor=float(args.get("reduction_factor", 3)), **common)
    return FIFOScheduler()


def _ray_trial(config: dict, overrides: list[str], sweep_dir: str, metric: str, scheduler_name: str) -> None:
    """Tune function trainable: one trial on a Ray worker."""
    from ray import tune

    from shiftlab.callbacks.optuna_pruning import RayTuneReporter

    trial_id = tune.get_context().get_trial_id()
    reporter = RayTuneReporter(key="objective", scheduler_name=scheduler_name)
    record = run_trial(overrides, config, Path(sweep_dir) / "trials" / trial_id, reporter, metric,
                       meta={"trial_id": trial_id, "backend": "ray"})
    if record["state"] == "failed":
        raise TrialFailed(record["reason"])
    if record["state"] == "complete":
        tune.report({"objective": record["value"], "epoch": len(reporter.history)})


def run_ray(settings: SweepSettings, overrides: Sequence[str], max_epochs: int) -> dict[str, Any]:
    """Ray Tune with ``OptunaSearch`` on the cluster at ``sweep.ray.address``."""
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    space = parse_search_space(settings.params)
    for i, point in enumerate(settings.enqueue):
        missing = sorted(set(space) - set(point))
        if missing:
            raise SweepError(f"sweep.enqueue[{i}] lacks {missing[0]}; allowed with backend=ray: points that set "
                             f"every swept parameter ({', '.join(space)})")
    settings.dir.mkdir(parents=True, exist_ok=True)
    mode = "max" if settings.direction == "maximize" else "min"
    storage = optuna.storages.RDBStorage(settings.storage) if settings.storage else None
    searcher = OptunaSearch(space=space, metric="objective", mode=mode,
                            sampler=build_sampler(settings, existing_trials(settings)),
                            study_name=settings.study_name, storage=storage,
                            points_to_evaluate=[dict(p) for p in settings.enqueue] or None)
    search_alg = ConcurrencyLimiter(searcher, max_concurrent=settings.ray.max_concurrent)
    scheduler = _ray_scheduler(settings, max_t=max(1, max_epochs))
    trainable = tune.with_parameters(_ray_trial, overrides=list(overrides), sweep_dir=str(settings.dir),
                                     metric=settings.metric, scheduler_name=type(scheduler).__name__)
    resources = {"cpu": settings.ray.cpus_per_trial, "gpu": settings.ray.gpus_per_trial}

    with ray_session(settings.ray, log_to_driver=True):
        start = time.perf_counter()  # the sweep's time, not Ray's start-up
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=settings.n_trials,
                                        time_budget_s=settings.timeout_s, reuse_actors=False),
            run_config=tune.RunConfig(name=settings.study_name, storage_path=str(settings.dir / "ray"), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        grid = tuner.fit()
        trials = ray_records(grid, settings, type(scheduler).__name__)
    return finish(settings, trials, time.perf_counter() - start)


def ray_records(grid: Any, settings: SweepSettings, scheduler_name: str) -> list[dict[str, Any]]:
    """One record per Tune trial; fills in ``trial.json`` for trials Tune stopped mid-run."""
    rows = []
    trials_dir = settings.dir / "trials"
    known = [p.name for p in trials_dir.iterdir()] if trials_dir.exists() else []
    for result in grid:
        metrics = result.metrics or {}
        # a trial that failed before its first report has no metrics: find its id in Tune's path
        trial_id = metrics.get("trial_id") or next((k for k in known if k in str(result.path)), Path(result.path).name)
        run_dir = settings.dir / "trials" / str(trial_id)
        path = run_dir / "trial.json"
        record = json.loads(path.read_text()) if path.exists() else {"trial_id": trial_id, "params": result.config}
        if result.error is not None and record.get("state") in (None, "running"):
            record.update(state="failed", reason=f"{type(result.error).__name__}: {str(result.error).splitlines()[0]}")
        elif record.get("state") in (None, "running"):
            epochs = int(metrics.get("training_iteration", 0) or 0)
            record.update(state="pruned", value=metrics.get("objective"),
                          reason=f"stopped by {scheduler_name} after epoch {max(0, epochs - 1)} "
                                 f"({settings.metric}={metrics.get('objective')})")
        record.setdefault("run_dir", str(run_dir))
        record["backend"] = "ray"
        write_json(path, record)
        rows.append(record)
    return rows

