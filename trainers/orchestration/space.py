"""The search space and the Optuna objects built from the settings: sampler, pruner, distributions.

``sweep.params`` is read in two spellings (mappings, or hydra-optuna-sweeper's ``choice()`` /
``range()`` / ``interval()`` strings, parsed with Hydra's own override grammar) into Optuna
distributions; trials draw from them through Optuna's public ``suggest_*`` API.
"""
from __future__ import annotations

from typing import Any, Mapping

from shiftlab.trainers.orchestration.settings import (PARAM_TYPES, PRUNERS, SAMPLERS, SweepError, SweepSettings,
                                                      class_path)


def import_path(path: str) -> Any:
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

    cls = import_path(class_path(settings.sampler, SAMPLERS, "sweep.sampler"))
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
    cls = import_path(class_path(settings.pruner, PRUNERS, "sweep.pruner"))
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

