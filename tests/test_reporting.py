"""The declared reporting protocol: every callback that reports goes through callbacks/reporting.py."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import lightning as L

import shiftlab.callbacks as callbacks_pkg
from shiftlab.callbacks import reporting
from shiftlab.callbacks.reporting import Reporter, RunReporter


def _callback_classes() -> list[type]:
    out = []
    for info in pkgutil.iter_modules(callbacks_pkg.__path__):
        mod = importlib.import_module(f"shiftlab.callbacks.{info.name}")
        out += [c for _, c in inspect.getmembers(mod, inspect.isclass)
                if issubclass(c, L.Callback) and c.__module__ == mod.__name__]
    return out


def test_every_callback_that_reports_declares_the_protocol():
    offenders = []
    for cls in _callback_classes():
        reports = any(name in vars(c) for c in cls.__mro__ if c is not Reporter
                      for name in ("summary_items", "plot_note", "stop_reason"))
        if reports and not issubclass(cls, Reporter):
            offenders.append(cls.__qualname__)
    assert not offenders, f"report without subclassing Reporter: {offenders}"
    assert len(_callback_classes()) > 5


class _Stops(L.Callback, Reporter):
    def __init__(self, reason=None, note=None, items=None):
        self.stop_reason, self.plot_note, self._items = reason, note, items or {}

    def summary_items(self):
        return self._items


def test_collectors_read_only_reporters_in_trainer_order():
    class Sneaky(L.Callback):  # not a reporter: its attribute must not leak into the summary
        stop_reason = "sneaky"

    cbs = [Sneaky(), _Stops(items={"a": 1, "b": 1}), _Stops(reason="first", note="n1", items={"b": 2}),
           _Stops(reason="second", note="n2")]
    assert isinstance(cbs[1], RunReporter) and not isinstance(cbs[0], RunReporter)
    assert reporting.stop_reason(cbs) == "first"
    assert reporting.plot_notes(cbs) == ["n1", "n2"]
    assert reporting.summary_items(cbs) == {"a": 1, "b": 2}
    assert reporting.stop_reason([Sneaky()]) is None
