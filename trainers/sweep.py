"""``shiftlab-sweep``: hyper-parameter sweeps that drive Optuna directly.

Why not hydra-optuna-sweeper: its last release (1.3.0) pins ``optuna<3`` and its SQLite storage
breaks under SQLAlchemy 2, so it cannot give a maintained Optuna, a resumable study, or a pruner
wired into training. This module is the glue instead: it composes the *same* Hydra config as
``shiftlab-train`` for every trial (Hydra's compose API, overrides = the command line + the
trial's parameters), calls :func:`shiftlab.trainers.train.train`, and lets the
:class:`shiftlab.callbacks.optuna_pruning.OptunaPruning` callback report the monitored metric each epoch.

Backends:

* ``backend=local`` -- ``optuna.Study.optimize`` in this process; the study's pruner stops bad
  trials (the callback stops Lightning cleanly, the objective raises ``optuna.TrialPruned``).
* ``backend=ray`` -- Ray Tune runs the trials on a Ray cluster (``ray.address=auto|host:port``),
  with Tune's ``OptunaSearch`` (same sampler, same storage) suggesting parameters and a Tune
  scheduler matching the configured pruner stopping bad trials.

Layout of ``sweep.dir``: ``study.db`` (SQLite storage), ``sweep.json`` (settings, counts, best
trial), ``trials/<id>/`` (one run directory each: ``.hydra/``, ``metrics.csv``, ``summary.json``,
``trial.json``), ``report/`` (``shiftlab-report``).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from shiftlab.trainers.compose import CONFIG_DIR, compose

log = logging.getLogger("shiftlab.sweep")

BACKENDS = ("local", "ray")
SWEEP_KEYS = ("study_name", "dir", "n_trials", "timeout_s", "direction", "storage", "sampler", "sampler_args",
              "pruner", "pruner_args", "enqueue", "backend", "ray", "report", "params",
              "heartbeat_interval_s", "grace_period_s", "max_retry")
DIRECTIONS = ("maximize", "minimize")
PARAM_TYPES = ("float", "int", "categorical")
SAMPLERS = {
    "tpe": "optuna.samplers.TPESampler",
    "random": "optuna.samplers.RandomSampler",
    "cmaes": "optuna.samplers.CmaEsSampler",
    "qmc": "optuna.samplers.QMCSampler",
    "gp": "optuna.samplers.GPSampler",
    "nsga2": "optuna.samplers.NSGAIISampler",
    "bruteforce": "optuna.samplers.BruteForceSampler",
}
PRUNERS = {
    "median": "optuna.pruners.MedianPruner",
    "percentile": "optuna.pruners.PercentilePruner",
    "successive_halving": "optuna.pruners.SuccessiveHalvingPruner",
    "hyperband": "optuna.pruners.HyperbandPruner",
    "threshold": "optuna.pruners.ThresholdPruner",
    "wilcoxon": "optuna.pruners.WilcoxonPruner",
    "patient": "optuna.pruners.PatientPruner",
    "none": "optuna.pruners.NopPruner",
}
# pruner -> Ray Tune scheduler (Tune's OptunaSearch runs Optuna with a no-op pruner)
RAY_SCHEDULERS = ("none", "median", "successive_halving", "hyperband")
PRUNING_CALLBACK = "shiftlab.callbacks.optuna_pruning.OptunaPruning"


class SweepError(ValueError):
    """Bad sweep input; the message names the key and the allowed values."""


# --------------------------------------------------------------------------------------------
# settings and search space
# --------------------------------------------------------------------------------------------
@dataclass
class SweepSettings:
    """The resolved ``sweep:`` node plus what is derived from the train config."""

    study_name: str
    dir: Path
    n_trials: int
    direction: str
    metric: str
    storage: str | None = None
    timeout_s: float | None = None
    sampler: str = "tpe"
    sampler_args: dict = field(default_factory=dict)
    pruner: str = "median"
    pruner_args: dict = field(default_factory=dict)
    enqueue: list = field(default_factory=list)
    backend: str = "local"
    ray: dict = field(default_factory=dict)
    report: bool = True
    params: dict = field(default_factory=dict)
    seed: int = 0
    heartbeat_interval_s: int | None = 10
    grace_period_s: int | None = 30
    max_retry: int | None = 2

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "SweepSettings":
        node = cfg.get("sweep")
        if node is None or not node.get("params"):
            raise SweepError(f"hparams_search=<name> is required (it defines sweep.params); available: "
                             f"{', '.join(available_searches()) or 'none'}")
        s = OmegaConf.to_container(node, resolve=True)
        unknown = sorted(set(s) - set(SWEEP_KEYS))
        if unknown:
            raise SweepError(f"sweep.{unknown[0]} is not a sweep setting; allowed: {', '.join(SWEEP_KEYS)}")
        metric = cfg.get("optimized_metric")
        if not metric:
            raise SweepError("optimized_metric is empty; set it to a key of summary.json, e.g. val/acc")
        mode = cfg.get("optimized_metric_mode", "max")
        derived = {"max": "maximize", "min": "minimize"}.get(mode)
        direction = s.get("direction") or derived
        if direction not in DIRECTIONS:
            raise SweepError(f"sweep.direction={direction!r} is not allowed; allowed: {', '.join(DIRECTIONS)}")
        if derived and direction != derived:
            raise SweepError(f"sweep.direction={direction!r} contradicts optimized_metric_mode={mode!r}; "
                             f"allowed: {derived} (or leave sweep.direction null)")
        backend = s.get("backend", "local")
        if backend not in BACKENDS:
            raise SweepError(f"sweep.backend={backend!r} is not allowed; allowed: {', '.join(BACKENDS)}")
        n_trials = s.get("n_trials")
        if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
            raise SweepError(f"sweep.n_trials={n_trials!r} is not allowed; allowed: an integer >= 1")
        _class_path(s.get("sampler", "tpe"), SAMPLERS, "sweep.sampler")
        _class_path(s.get("pruner", "median"), PRUNERS, "sweep.pruner")
        if backend == "ray" and s.get("pruner", "median") not in RAY_SCHEDULERS:
            raise SweepError(f"sweep.pruner={s.get('pruner')!r} has no Ray Tune scheduler; allowed with "
                             f"backend=ray: {', '.join(RAY_SCHEDULERS)}")
        heartbeat = _optional_int(s, "heartbeat_interval_s", 10, low=1)
        grace = _optional_int(s, "grace_period_s", 30, low=1)
        if heartbeat is not None and grace is not None and grace <= heartbeat:
            raise SweepError(f"sweep.grace_period_s={grace} is not allowed; allowed: an integer > "
                             f"sweep.heartbeat_interval_s={heartbeat} (a live trial must not look dead)")
        max_retry = _optional_int(s, "max_retry", 2, low=0)
        ray_cfg = {"address": None, "max_concurrent": 2, "cpus_per_trial": 1, "gpus_per_trial": 0}
        ray_cfg.update(s.get("ray") or {})
        return cls(
            study_name=str(s.get("study_name") or cfg.get("task_name") or "sweep"),
            dir=Path(str(s.get("dir") or f"outputs/sweeps/{s.get('study_name')}")).resolve(),
            n_trials=n_trials,
            direction=direction,
            metric=str(metric),
            storage=s.get("storage") or None,
            timeout_s=s.get("timeout_s"),
            sampler=s.get("sampler", "tpe"),
            sampler_args=dict(s.get("sampler_args") or {}),
            pruner=s.get("pruner", "median"),
            pruner_args=dict(s.get("pruner_args") or {}),
            enqueue=list(s.get("enqueue") or []),
            backend=backend,
            ray=ray_cfg,
            report=bool(s.get("report", True)),
            params=dict(s["params"]),
            seed=int(cfg.get("seed", 0) or 0),
            heartbeat_interval_s=heartbeat,
            grace_period_s=grace,
            max_retry=max_retry,
        )


def _optional_int(node: Mapping[str, Any], key: str, default: int | None, low: int) -> int | None:
    """``node[key]`` as an integer >= ``low``, or None (null in the config)."""
    value = node.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SweepError(f"sweep.{key}={value!r} is not allowed; allowed: an integer >= {low} or null")
    return value


def available_searches(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (config_dir / "hparams_search").glob("*.yaml"))


def _class_path(name: str, table: Mapping[str, str], key: str) -> str:
    if not isinstance(name, str) or not name:
        raise SweepError(f"{key}={name!r} is not allowed; allowed: {', '.join(table)} or an import path")
    if name in table:
        return table[name]
    if "." in name:
        return name
    raise SweepError(f"{key}={name!r} is unknown; allowed: {', '.join(table)} or an import path")


def _import(path: str) -> Any:
    import importlib

    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def sampler_seed(seed: int, n_existing: int) -> int:
    """The sampler's seed for an invocation that finds ``n_existing`` trials in the study.

    Why: a sampler seeded identically on every invocation of a resumed study draws the same
    sequence again, so the new trials repeat the first ones' parameters. A fresh study
    (``n_existing == 0``) uses ``seed`` itself; a resumed one a seed derived from (seed, number of
    trials already there) -- still reproducible, different on every resumption.
    """
    if n_existing <= 0:
        return int(seed)
    import numpy as np

    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(n_existing)]).generate_state(1)[0])


def build_sampler(settings: SweepSettings, n_existing: int = 0):
    """The Optuna sampler, seeded with the run seed (or ``sampler_args.seed``) mixed with the number
    of trials the study already holds (:func:`sampler_seed`)."""
    import inspect

    cls = _import(_class_path(settings.sampler, SAMPLERS, "sweep.sampler"))
    args = dict(settings.sampler_args)
    if "seed" in inspect.signature(cls).parameters:
        base = args.get("seed", settings.seed)
        if base is not None:
            args["seed"] = sampler_seed(int(base), n_existing)
    try:
        return cls(**args)
    except TypeError as e:
        raise SweepError(f"sweep.sampler_args={args} do not fit {cls.__name__}: {e}") from None


def build_pruner(settings: SweepSettings):
    cls = _import(_class_path(settings.pruner, PRUNERS, "sweep.pruner"))
    try:
        return cls(**settings.pruner_args)
    except TypeError as e:
        raise SweepError(f"sweep.pruner_args={settings.pruner_args} do not fit {cls.__name__}: {e}") from None


def parse_search_space(params: Mapping[str, Any]) -> dict[str, Any]:
    """``sweep.params`` -> ``{override key: optuna distribution}``.

    Two spellings per key: a mapping ``{type: float|int|categorical, low, high, log, step,
    choices}``, or hydra-optuna-sweeper's strings ``choice(a, b)``, ``range(1, 9, 2)``,
    ``interval(0.0, 1.0)``, ``tag(log, interval(1e-4, 0.1))`` (parsed with Hydra's own override
    grammar).
    """
    return {str(key): _distribution(str(key), spec) for key, spec in params.items()}


def _distribution(key: str, spec: Any):
    import optuna.distributions as od

    where = f"sweep.params.{key}"
    if isinstance(spec, str):
        return _distribution_from_sweep_syntax(key, spec)
    if isinstance(spec, (list, tuple)):
        return od.CategoricalDistribution(list(spec))
    if not isinstance(spec, Mapping):
        raise SweepError(f"{where}={spec!r} is not a search space; allowed: a mapping with type "
                         f"({', '.join(PARAM_TYPES)}), a list of choices, or choice()/range()/interval()")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise SweepError(f"{where}.type={kind!r} is not allowed; allowed: {', '.join(PARAM_TYPES)}")
    try:
        if kind == "categorical":
            choices = spec.get("choices")
            if not choices:
                raise SweepError(f"{where}.choices is empty; allowed: a non-empty list")
            return od.CategoricalDistribution(list(choices))
        low, high = spec.get("low"), spec.get("high")
        if low is None or high is None:
            raise SweepError(f"{where} needs low and high; allowed: numbers with low <= high")
        if kind == "float":
            return od.FloatDistribution(float(low), float(high), log=bool(spec.get("log", False)),
                                        step=None if spec.get("step") is None else float(spec["step"]))
        return od.IntDistribution(int(low), int(high), log=bool(spec.get("log", False)),
                                  step=int(spec.get("step", 1) or 1))
    except ValueError as e:
        if isinstance(e, SweepError):
            raise
        raise SweepError(f"{where}: {e}") from None


def _distribution_from_sweep_syntax(key: str, text: str):
    import optuna.distributions as od
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    where = f"sweep.params.{key}"
    try:
        override = OverridesParser.create().parse_override(f"{key}={text}")
    except Exception as e:  # noqa: BLE001 - hydra raises its own OverrideParseException
        raise SweepError(f"{where}={text!r} does not parse: {str(e).splitlines()[0]}") from None
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return od.CategoricalDistribution([_plain(v) for v in value.list])
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step or 1
        if isinstance(start, int) and isinstance(stop, int) and isinstance(step, int):
            return od.IntDistribution(start, stop - step, step=step)  # range() excludes stop, like Python
        return od.FloatDistribution(float(start), float(stop), step=float(step))
    if isinstance(value, IntervalSweep):
        log = "log" in (value.tags or set())
        if isinstance(value.start, int) and isinstance(value.end, int):
            return od.IntDistribution(value.start, value.end, log=log)
        return od.FloatDistribution(float(value.start), float(value.end), log=log)
    raise SweepError(f"{where}={text!r} is not a search space; allowed: choice(...), range(...), interval(...), "
                     "tag(log, interval(...)) or a mapping with type")


def _plain(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)


def suggest(trial: Any, name: str, dist: Any) -> Any:
    """Ask ``trial`` for ``name`` from ``dist`` through the public suggest API."""
    import optuna.distributions as od

    if isinstance(dist, od.FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, od.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    return trial.suggest_categorical(name, dist.choices)


# --------------------------------------------------------------------------------------------
# composing one trial's config
# --------------------------------------------------------------------------------------------
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


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    from shiftlab.trainers.checkpoint_io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str))


# --------------------------------------------------------------------------------------------
# one trial (shared by both backends)
# --------------------------------------------------------------------------------------------
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
    _write_json(run_dir / "trial.json", record)
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
    _write_json(run_dir / "trial.json", record)
    return record


def _metric(summary: Mapping[str, Any], name: str) -> float | None:
    value = summary.get(name)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
class TrialFailed(RuntimeError):
    """Raised in the Optuna objective so the study records the trial as FAIL and goes on."""


class SweepInterrupted(Exception):
    """A trial was stopped by SIGINT / SIGTERM: the sweep ends (exit 130 / 143) and resumes later."""

    def __init__(self, status: str, number: int) -> None:
        self.status, self.number = status, number
        super().__init__(f"trial {number} {status}; the sweep stops here and re-runs its parameters first "
                         "when started again")


def run_local(settings: SweepSettings, overrides: Sequence[str],
              train_fn: Callable[[DictConfig], dict] | None = None) -> dict[str, Any]:
    """Optuna ``study.optimize`` in this process; returns the sweep record.

    With an RDB storage every trial sends Optuna heartbeats; before each new trial Optuna fails
    trials whose heartbeat stopped more than ``grace_period_s`` ago (their process died) and
    :func:`_on_stale_trial` records that and enqueues them again.
    """
    import optuna

    from shiftlab.callbacks.optuna_pruning import OptunaReporter

    space = parse_search_space(settings.params)
    study = _create_study(settings)
    for point in settings.enqueue:
        study.enqueue_trial(dict(point), skip_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        params = {name: suggest(trial, name, dist) for name, dist in space.items()}
        run_dir = _trial_dir(settings, trial.number)
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
    return _finish(settings, study_trials(study), time.perf_counter() - start)


def _trial_dir(settings: SweepSettings, number: int) -> Path:
    return settings.dir / "trials" / f"{number:04d}"


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
            _on_stale_trial(settings, study, trial)
            retry(study, trial)

        return optuna.storages.RDBStorage(settings.storage, heartbeat_interval=settings.heartbeat_interval_s,
                                          grace_period=settings.grace_period_s, **{key: on_stale})


def _stale_reason(settings: SweepSettings) -> str:
    grace = settings.grace_period_s or 2 * (settings.heartbeat_interval_s or 0)
    return f"stale: the process running it stopped (no Optuna heartbeat for over {grace} s); marked failed"


def _on_stale_trial(settings: SweepSettings, study: Any, trial: Any) -> None:
    """A trial left RUNNING by a dead process was just failed: say so in its ``trial.json``."""
    path = _trial_dir(settings, trial.number) / "trial.json"
    record = _read_record(path)
    retries = len(trial.system_attrs.get("retry_history", [])) + 1
    will_retry = settings.max_retry is None or retries <= settings.max_retry
    reason = _stale_reason(settings) + ("; run again as a new trial" if will_retry else
                                        f"; not retried (sweep.max_retry={settings.max_retry} reached)")
    record.update(number=trial.number, params=dict(trial.params), state="failed", value=None, reason=reason)
    record.setdefault("run_dir", str(path.parent))
    _write_json(path, record)
    log.warning("trial %d was left RUNNING by a process that died: %s", trial.number, reason)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


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
        path = _trial_dir(settings, t.number) / "trial.json"
        record = _read_record(path)
        note = f"retried as trial {retried[t.number]}" if t.number in retried else None
        if state == "running" and record.get("state") is not None:
            continue  # maybe alive in another process; its own records are the newest
        if record.get("state") == state and (note is None or note in str(record.get("reason"))):
            continue
        if state == "failed":
            reason = record.get("reason") if record.get("state") == "failed" else _stale_reason(settings)
        else:
            reason = t.user_attrs.get("reason") or record.get("reason")
        if note is not None and note not in str(reason):
            reason = f"{reason}; {note}"
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        value = t.value if state == "complete" else last if state == "pruned" else None
        record.update(number=t.number, params=dict(t.params), state=state, reason=reason, value=value,
                      metric=settings.metric)
        record.setdefault("run_dir", str(path.parent))
        _write_json(path, record)
        changed += 1
    return changed


def _existing_trials(settings: SweepSettings) -> int:
    """How many trials the stored study already holds (0 for a new or in-memory study)."""
    import optuna

    if settings.storage is None:
        return 0
    try:
        summaries = optuna.study.get_all_study_summaries(settings.storage, include_best_trial=False)
    except Exception:  # noqa: BLE001 - no database yet
        return 0
    return next((s.n_trials for s in summaries if s.study_name == settings.study_name), 0)


def _create_study(settings: SweepSettings):
    import optuna

    settings.dir.mkdir(parents=True, exist_ok=True)
    if settings.storage is None and (settings.dir / "trials").exists() and any((settings.dir / "trials").iterdir()):
        raise SweepError(f"sweep.dir={settings.dir} already holds trials of an in-memory study; allowed: a new "
                         "sweep.dir, or sweep.storage=sqlite:///... to resume a study")
    storage = _storage(settings)
    n_existing = _existing_trials(settings)
    if n_existing:
        log.info("resuming study %s: %d trials already stored; the sampler's seed is derived from seed=%s and "
                 "that count", settings.study_name, n_existing, settings.sampler_args.get("seed", settings.seed))
    return optuna.create_study(study_name=settings.study_name, storage=storage,
                               sampler=build_sampler(settings, n_existing), pruner=build_pruner(settings),
                               direction=settings.direction, load_if_exists=True)


def study_trials(study: Any) -> list[dict[str, Any]]:
    """Optuna's view of every trial (also the ones of earlier runs of a resumed study)."""
    rows = []
    for t in study.trials:
        state = {"fail": "failed"}.get(t.state.name.lower(), t.state.name.lower())
        rows.append({"number": t.number, "state": state, "value": t.value, "params": t.params,
                     "run_dir": t.user_attrs.get("run_dir"), "reason": t.user_attrs.get("reason")})
    return rows


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
    import ray
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
                            sampler=build_sampler(settings, _existing_trials(settings)),
                            study_name=settings.study_name, storage=storage,
                            points_to_evaluate=[dict(p) for p in settings.enqueue] or None)
    search_alg = ConcurrencyLimiter(searcher, max_concurrent=int(settings.ray["max_concurrent"]))
    scheduler = _ray_scheduler(settings, max_t=max(1, max_epochs))
    trainable = tune.with_parameters(_ray_trial, overrides=list(overrides), sweep_dir=str(settings.dir),
                                     metric=settings.metric, scheduler_name=type(scheduler).__name__)
    resources = {"cpu": float(settings.ray["cpus_per_trial"]), "gpu": float(settings.ray["gpus_per_trial"])}

    address = settings.ray.get("address")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, log_to_driver=True, include_dashboard=False if address is None else None)
    start = time.perf_counter()
    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=settings.n_trials,
                                        time_budget_s=settings.timeout_s, reuse_actors=False),
            run_config=tune.RunConfig(name=settings.study_name, storage_path=str(settings.dir / "ray"), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        grid = tuner.fit()
        trials = _ray_records(grid, settings, type(scheduler).__name__)
    finally:
        if started_here:
            ray.shutdown()
    return _finish(settings, trials, time.perf_counter() - start)


def _ray_records(grid: Any, settings: SweepSettings, scheduler_name: str) -> list[dict[str, Any]]:
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
        _write_json(path, record)
        rows.append(record)
    return rows


# --------------------------------------------------------------------------------------------
# bookkeeping and entry point
# --------------------------------------------------------------------------------------------
def best_trial(trials: Sequence[Mapping[str, Any]], direction: str) -> Mapping[str, Any] | None:
    done = [t for t in trials if t.get("state") == "complete" and t.get("value") is not None]
    if not done:
        return None
    pick = max if direction == "maximize" else min
    return pick(done, key=lambda t: float(t["value"]))


def _finish(settings: SweepSettings, trials: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    best = best_trial(trials, settings.direction)
    record = {
        "study_name": settings.study_name, "metric": settings.metric, "direction": settings.direction,
        "backend": settings.backend, "sampler": settings.sampler, "pruner": settings.pruner,
        "storage": settings.storage, "n_trials_requested": settings.n_trials, "counts": counts,
        "wall_time_s": round(wall_s, 3), "best": dict(best) if best else None,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
    }
    _write_json(settings.dir / "sweep.json", record)
    return record


USAGE = """usage: shiftlab-sweep hparams_search=<name> [overrides...] [sweep settings...]

Runs an Optuna study over the train config; every trial is `shiftlab-train <overrides> <params>`.
Sweep settings (also as sweep.<key>=...): n_trials, backend=local|ray, ray.address=auto|host:port,
sampler, pruner, storage=sqlite:///path|null, timeout_s, dir, study_name, direction.
Searches: {searches}"""


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry ``shiftlab-sweep``; returns the exit status (0 ok, 2 bad input, 1 no trial finished)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE.format(searches=", ".join(available_searches())))
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    overrides = route_overrides(args)
    try:
        if not any(a.lstrip("+").startswith("hparams_search=") for a in overrides):
            raise SweepError(f"hparams_search=<name> is required (it defines sweep.params); available: "
                             f"{', '.join(available_searches()) or 'none'}")
        cfg = compose_config(overrides)
        settings = SweepSettings.from_cfg(cfg)
        parse_search_space(settings.params)
        from shiftlab.trainers.config_checks import ConfigError, check_config

        try:
            check_config(cfg)
        except ConfigError as e:
            raise SweepError(str(e)) from None
        if settings.backend == "ray":
            root = Path(str(cfg.paths.root_dir))
            if not root.is_absolute():  # Ray workers do not share this working directory
                overrides = overrides + [format_override("paths.root_dir", str(root.resolve()))]
            result = run_ray(settings, overrides, int(cfg.trainer.get("max_epochs") or 1))
        else:
            result = run_local(settings, overrides)
    except SweepError as e:
        print(f"shiftlab-sweep: error: {e}", file=sys.stderr)
        return 2
    except SweepInterrupted as e:
        from shiftlab.callbacks.run_contract import EXIT_CODES

        print(f"shiftlab-sweep: {e} -> {settings.dir}", file=sys.stderr)
        return EXIT_CODES[e.status]
    except Exception as e:  # hydra composition errors: one line, not a traceback
        from hydra.errors import HydraException

        if isinstance(e, HydraException):
            print(f"shiftlab-sweep: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        raise
    best = result["best"]
    print(f"sweep {settings.study_name}: {result['counts']} in {result['wall_time_s']:.1f} s -> {settings.dir}")
    if best:
        print(f"best: {best.get('run_dir')} {settings.metric}={best['value']:.4g} params={best['params']}")
    if settings.report:
        from shiftlab.trainers.report import make_report

        out = make_report(settings.dir)
        print(f"report: {out['markdown']}")
    return 0 if best else 1


if __name__ == "__main__":
    raise SystemExit(main())
