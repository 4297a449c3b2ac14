"""The sweep's settings: the resolved ``sweep:`` node checked once, with what the train config adds.

Every bad value becomes a :class:`SweepError` naming the key and the allowed values (the CLI
prints it as one line, exit 2). The ``sweep.ray`` node is checked by :mod:`.ray_settings`, the
same code the Ray DDP launcher uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from shiftlab.trainers.compose import CONFIG_DIR
from shiftlab.trainers.orchestration.ray_settings import SWEEP_KEYS as RAY_KEYS
from shiftlab.trainers.orchestration.ray_settings import RaySettings, RaySettingsError, parse_ray_settings

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
    ray: RaySettings = field(default_factory=RaySettings)
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
            raise missing_search()
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
        class_path(s.get("sampler", "tpe"), SAMPLERS, "sweep.sampler")
        class_path(s.get("pruner", "median"), PRUNERS, "sweep.pruner")
        if backend == "ray" and s.get("pruner", "median") not in RAY_SCHEDULERS:
            raise SweepError(f"sweep.pruner={s.get('pruner')!r} has no Ray Tune scheduler; allowed with "
                             f"backend=ray: {', '.join(RAY_SCHEDULERS)}")
        heartbeat = _optional_int(s, "heartbeat_interval_s", 10, low=1)
        grace = _optional_int(s, "grace_period_s", 30, low=1)
        if heartbeat is not None and grace is not None and grace <= heartbeat:
            raise SweepError(f"sweep.grace_period_s={grace} is not allowed; allowed: an integer > "
                             f"sweep.heartbeat_interval_s={heartbeat} (a live trial must not look dead)")
        max_retry = _optional_int(s, "max_retry", 2, low=0)
        try:
            ray_settings = parse_ray_settings(s.get("ray"), RAY_KEYS, "sweep.ray")
        except RaySettingsError as e:
            raise SweepError(str(e)) from None
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
            ray=ray_settings,
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


def missing_search() -> SweepError:
    """The error for a sweep without ``hparams_search`` (the CLI and :meth:`SweepSettings.from_cfg`)."""
    return SweepError(f"hparams_search=<name> is required (it defines sweep.params); available: "
                      f"{', '.join(available_searches()) or 'none'}")


def available_searches(config_dir: Path = CONFIG_DIR) -> list[str]:
    """The options of the ``hparams_search`` group (configs/hparams_search/*.yaml)."""
    return sorted(p.stem for p in (config_dir / "hparams_search").glob("*.yaml"))


def describe_search(name: str, config_dir: Path = CONFIG_DIR) -> str:
    """One line for ``--help``: the search's metric, trial count and swept keys, and the first
    sentence of the comment at the top of its file (the file says what it searches)."""
    import yaml

    path = config_dir / "hparams_search" / f"{name}.yaml"
    text = path.read_text()
    node = yaml.safe_load(text) or {}
    sweep = node.get("sweep") or {}
    head = []  # the comment block at the top, less the @package line and command lines
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        words = line.lstrip("# ").strip()
        if words and not words.startswith(("@package", "shiftlab-")):
            head.append(words)
    note = " ".join(head).split(". ")[0].rstrip(".")
    metric = f"{node.get('optimized_metric', '?')} ({node.get('optimized_metric_mode', 'max')})"
    params = ", ".join(map(str, sweep.get("params") or {})) or "none"
    return f"{name}: {metric}, {sweep.get('n_trials', '?')} trials over {params}" + (f" -- {note}" if note else "")


def class_path(name: str, table: Mapping[str, str], key: str) -> str:
    if not isinstance(name, str) or not name:
        raise SweepError(f"{key}={name!r} is not allowed; allowed: {', '.join(table)} or an import path")
    if name in table:
        return table[name]
    if "." in name:
        return name
    raise SweepError(f"{key}={name!r} is unknown; allowed: {', '.join(table)} or an import path")


