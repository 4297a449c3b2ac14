"""Ray settings, parsed and checked in one place for both Ray entry points.

Why one place: the Ray Tune sweep backend (``sweep.ray.*`` in configs/sweep/default.yaml) and the
Ray Train launcher (``ray.*`` on the command line of :mod:`.ray_ddp`) both join a cluster at
``address`` and ask it for resources; they used to parse and default these keys separately (the
sweep accepted any key without a check). Each entry point names the keys it uses; the values,
their defaults and their checks live here, and :func:`ray_session` is the one way to connect.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Any, Iterator, Mapping, Sequence


class RaySettingsError(ValueError):
    """A bad ``ray.*`` value; the message names the key and the allowed values."""


@dataclass(frozen=True)
class RaySettings:
    """Where the Ray cluster is and what one trial (sweep) or one worker (DDP) asks it for."""

    address: str | None = None      # null: start a local Ray; auto or host:port to join a cluster
    max_concurrent: int = 2         # sweep: trials running at once
    cpus_per_trial: float = 1.0     # sweep: resources of one trial
    gpus_per_trial: float = 0.0
    num_workers: int = 2            # DDP: Ray Train workers of the one run
    use_gpu: bool = False           # DDP: one GPU per worker
    cpus_per_worker: float = 1.0


SWEEP_KEYS = ("address", "max_concurrent", "cpus_per_trial", "gpus_per_trial")
DDP_KEYS = ("address", "num_workers", "use_gpu", "cpus_per_worker")
_COUNTS = ("max_concurrent", "num_workers")          # integers >= 1
_AMOUNTS = ("cpus_per_trial", "gpus_per_trial", "cpus_per_worker")  # numbers >= 0 (Ray allows fractions)


def _check(where: str, key: str, value: Any) -> Any:
    """``value`` of ``key`` as the type the field holds, or RaySettingsError."""
    def bad(allowed: str) -> RaySettingsError:
        return RaySettingsError(f"{where}.{key}={value!r} is not allowed; allowed: {allowed}")

    if key == "address":
        if value is not None and (not isinstance(value, str) or not value):
            raise bad("null (a local Ray), auto, or host:port")
        return value
    if key == "use_gpu":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad("an integer >= 1" if key in _COUNTS else "a number >= 0")
    if key in _COUNTS:
        if not isinstance(value, int) or value < 1:
            raise bad("an integer >= 1")
        return value
    if value < 0:
        raise bad("a number >= 0")
    return float(value)


def parse_ray_settings(values: Mapping[str, Any] | None, keys: Sequence[str], where: str = "ray") -> RaySettings:
    """``values`` (a ``ray`` mapping) checked against the ``keys`` this entry point uses.

    ``where`` prefixes the key in messages (``sweep.ray`` or ``ray``)."""
    known = {f.name for f in fields(RaySettings)}
    assert set(keys) <= known, keys
    checked = {}
    for key, value in (values or {}).items():
        if key not in keys:
            allowed = ", ".join(f"{where}.{k}" for k in keys)
            raise RaySettingsError(f"{where}.{key}={value!r} is not allowed; allowed: {allowed}")
        checked[key] = _check(where, key, value)
    return RaySettings(**checked)


def split_ray_args(args: Sequence[str], keys: Sequence[str] = DDP_KEYS) -> tuple[list[str], RaySettings]:
    """Command-line ``ray.<key>=<value>`` arguments (values read as YAML, like Hydra's) parsed into
    RaySettings; every other argument is returned as a Hydra override."""
    import yaml

    overrides, values = [], {}
    for arg in args:
        if arg.startswith("ray."):
            key, _, text = arg[4:].partition("=")
            try:
                values[key] = yaml.safe_load(text)
            except yaml.YAMLError:
                values[key] = text
        else:
            overrides.append(arg)
    return overrides, parse_ray_settings(values, keys, "ray")


@contextlib.contextmanager
def ray_session(settings: RaySettings, **init_args: Any) -> Iterator[None]:
    """Connected to the cluster at ``settings.address`` (or a local Ray) for the block.

    A Ray already initialised by the caller is used as it is and left running; one started here
    is shut down afterwards. The dashboard is off for a local Ray (nothing would look at it)."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=settings.address, include_dashboard=False if settings.address is None else None,
                 **init_args)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()
