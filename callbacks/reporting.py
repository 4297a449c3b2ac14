"""The one declared way a callback hands results to the run.

A run reads three things from its callbacks when it ends: why it stopped (``stop_reason``), entries for
``summary.json`` (``summary_items()``) and a line for the learning-curve plot (``plot_note``). Callbacks that
report subclass :class:`Reporter` (or satisfy :class:`RunReporter`); the run reads them only through
:func:`stop_reason`, :func:`summary_items` and :func:`plot_notes`, never by ``getattr`` on arbitrary objects,
so a misspelt attribute cannot silently drop out of the summary.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Protocol, runtime_checkable


@runtime_checkable
class RunReporter(Protocol):
    """What the run reads from a reporting callback."""

    stop_reason: str | None
    """Set when this callback ended training (``trainer.should_stop``); ``None`` otherwise."""
    plot_note: str | None
    """One short line printed under the learning curves, or ``None``."""

    def summary_items(self) -> Mapping[str, Any]:
        """Flat ``{key: JSON-serialisable value}`` merged into ``summary.json``."""
        ...


class Reporter:
    """Base class giving the :class:`RunReporter` defaults: no stop reason, no note, no items."""

    stop_reason: str | None = None
    plot_note: str | None = None

    def summary_items(self) -> Mapping[str, Any]:
        return {}


def reporters(callbacks: Iterable[object]) -> list[RunReporter]:
    """The callbacks that report to the run, in trainer order."""
    return [cb for cb in callbacks if isinstance(cb, RunReporter)]


def stop_reason(callbacks: Iterable[object]) -> str | None:
    """The first stop reason a reporter set, or ``None``."""
    return next((str(r.stop_reason) for r in reporters(callbacks) if r.stop_reason), None)


def plot_notes(callbacks: Iterable[object]) -> list[str]:
    """Every reporter's plot note, in trainer order."""
    return [str(r.plot_note) for r in reporters(callbacks) if r.plot_note]


def summary_items(callbacks: Iterable[object]) -> dict[str, Any]:
    """All reporters' summary items merged in trainer order (a later key wins)."""
    items: dict[str, Any] = {}
    for r in reporters(callbacks):
        items.update(r.summary_items())
    return items
