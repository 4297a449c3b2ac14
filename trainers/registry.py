"""Registries of swappable parts (timm style): name -> builder, preset arguments, capabilities.

Why: a config chooses a part by ``_target_`` (the class or function that builds it); the registry
is what says which builders are known for a role (norm, optimizer, scheduler), what the framework
passes them (``supplied``), what each declares it can do (``caps``), and which names the contract
tests and the bad-input messages list. Names are registry keys only; configs never pass them.
"""
from __future__ import annotations

import inspect
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Mapping, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered part: ``builder(*supplied, **{**defaults, **options})`` builds it."""

    name: str
    builder: Callable[..., T]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    caps: Mapping[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """The ``_target_`` a config writes for this entry: the shortest imported module path
        that exports the builder (``torch.optim.SGD``, not ``torch.optim.sgd.SGD``)."""
        module, name = self.builder.__module__, self.builder.__qualname__
        parts = module.split(".")
        for i in range(1, len(parts)):
            head = ".".join(parts[:i])
            if getattr(sys.modules.get(head), name, None) is self.builder:
                return f"{head}.{name}"
        return f"{module}.{name}"

    def preset_matches(self, options: Mapping[str, Any]) -> bool:
        """Whether ``options`` (a config node's keys) agree with this entry's preset arguments,
        an absent key counting as the builder's own default."""
        try:
            params = inspect.signature(self.builder).parameters
        except (TypeError, ValueError):
            params = {}
        for key, want in self.defaults.items():
            got = options[key] if key in options else getattr(params.get(key), "default", inspect.Parameter.empty)
            if got != want:
                return False
        return True

    def create(self, *args: Any, **kwargs: Any) -> T:
        return self.builder(*args, **{**self.defaults, **kwargs})


class Registry(Generic[T]):
    """Builders of one role. ``supplied``: arguments the framework passes (not config keys);
    ``legacy_target``: the old ``factory + name`` target still accepted from saved configs."""

    def __init__(self, kind: str, supplied: tuple[str, ...] = (), key: str | None = None,
                 legacy_target: str | None = None) -> None:
        self.kind = kind
        self.key = key or kind
        self.supplied = supplied
        self.legacy_target = legacy_target
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, builder: Callable[..., T] | None = None, *,
                 defaults: Mapping[str, Any] | None = None, **caps: Any) -> Callable[..., Any]:
        """``@REG.register("name", cap=...)`` on a builder, or ``REG.register("name", torch.optim.SGD)``."""
        def add(fn: Callable[..., T]) -> Callable[..., T]:
            entry = Entry(name, fn, dict(defaults or {}), dict(caps))
            old = self._entries.get(name)
            if old is not None and (old.builder is not fn or old.defaults != entry.defaults):
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return fn

        return add(builder) if builder is not None else add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def targets(self) -> list[str]:
        """The distinct ``_target_`` values a config may name for this role."""
        return sorted({e.target for e in self._entries.values()})

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"{self.key}={name} is not allowed; allowed: known {self.kind} names: {', '.join(self.names())}"
            ) from None

    def get(self, name: str) -> Callable[..., T]:
        return self.entry(name).builder

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.entry(name).create(*args, **kwargs)

    def find(self, builder: Any, options: Mapping[str, Any] | None = None) -> Entry[T] | None:
        """The entry built by ``builder`` (several may share one, e.g. torch.optim.SGD: the one
        whose preset arguments ``options`` repeats, else the first by name)."""
        hits = [e for e in self.entries() if e.builder is builder]
        exact = [e for e in hits if e.preset_matches(options or {})]
        return (exact or hits or [None])[0]

    def __contains__(self, name: str) -> bool:
        return name in self._entries


_warned: set[str] = set()


def warn_legacy(target: str, name: Any, new_target: str | None) -> None:
    """One FutureWarning per process and legacy target: the ``factory + name`` config form."""
    if target in _warned:
        return
    _warned.add(target)
    instead = f"_target_: {new_target} (with _partial_: true)" if new_target else "the builder's own _target_"
    warnings.warn(f"_target_: {target} with name: {name} is deprecated; write {instead} without name:",
                  FutureWarning, stacklevel=4)
