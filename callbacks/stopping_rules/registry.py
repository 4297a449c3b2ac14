"""The stopping-rule registry (timm style: ``make_rule(name, **kwargs)``, an unknown name fails
with the known names) and :func:`replay` over a recorded curve.

Why a registry: a user's own rule registers from outside the package (a module listed under
``imports:`` or a ``shiftlab.plugins`` entry point, see :mod:`shiftlab.trainers.extensions`) with
``@register_rule("name")`` and is then chosen by name in a config like a built-in one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

from shiftlab.callbacks.stopping_rules.base import StoppingRule
from shiftlab.trainers.registry import Registry

RULES: Registry[StoppingRule] = Registry("stopping rule", key="rule")
R = TypeVar("R", bound=Callable[..., StoppingRule])


def register_rule(name: str) -> Callable[[R], R]:
    """Class decorator: make a :class:`StoppingRule` subclass available as ``make_rule(name)``
    and as ``rule: <name>`` of the early-stopping callback."""
    return RULES.register(name)


def make_rule(name: str, **kwargs: Any) -> StoppingRule:
    """Build the rule registered as ``name`` (built in: ``curvature`` | ``evidence`` | ``quadratic`` |
    ``se_slope`` | ``forecast`` | ``learned`` | ``patience`` | ``gl`` | ``pq`` | ``up``)."""
    try:
        cls = RULES.get(name)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    return cls(**kwargs)


@dataclass
class Decision:
    """Outcome of a replay. ``stop_epoch``: 0-based index of the epoch after which training
    stops (the last index when the rule never fires); ``best_epoch``: the epoch restored."""

    stop_epoch: int
    best_epoch: int
    stopped: bool
    reason: str | None
    trace: list[dict[str, float]] = field(default_factory=list)


def replay(rule: StoppingRule | str, val_loss: Sequence[float],
           train_loss: Sequence[float] | None = None, trace: bool = False,
           val_se: Sequence[float | None] | None = None, **kwargs: Any) -> Decision:
    """Run ``rule`` (an object, reset first, or a name for :func:`make_rule`) over a recorded
    curve, epoch by epoch, exactly as a callback would see it."""
    if isinstance(rule, str):
        rule = make_rule(rule, **kwargs)
    elif kwargs:
        raise ValueError("keyword arguments are only accepted with a rule name")
    if len(val_loss) == 0:
        raise ValueError("val_loss is empty; replay needs at least one epoch")
    if train_loss is not None and len(train_loss) != len(val_loss):
        raise ValueError(f"train_loss has {len(train_loss)} epochs, val_loss {len(val_loss)}")
    if val_se is not None and len(val_se) != len(val_loss):
        raise ValueError(f"val_se has {len(val_se)} epochs, val_loss {len(val_loss)}")
    rule.reset()
    rows: list[dict[str, float]] = []
    for i, v in enumerate(val_loss):
        stop = rule.update(v, None if train_loss is None else train_loss[i],
                           None if val_se is None else val_se[i])
        if trace:
            rows.append(rule.diagnostics())
        if stop:
            return Decision(i, rule.best_epoch, True, rule.reason, rows)
    return Decision(len(val_loss) - 1, rule.best_epoch, False, None, rows)
