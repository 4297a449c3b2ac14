"""Optimizer and learning-rate scheduler registries.

A config names the builder itself, with ``_partial_: true`` because the framework supplies the
parameters (optimizer) or the optimizer and ``max_epochs`` (scheduler) later::

    _target_: torch.optim.SGD      # configs/optimizer/momentum.yaml
    _partial_: true
    lr: 0.05
    momentum: 0.9

Registry names mean exactly what they say: ``sgd`` has no momentum, ``momentum`` is heavy-ball,
``nesterov`` is Nesterov momentum (three entries of ``torch.optim.SGD`` with those presets);
nothing is switched on behind the user's back. Register your own with
``OPTIMIZERS.register("name", MyOptimizer)`` (or as a decorator) in a module listed in ``imports``.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from shiftlab.trainers.registry import Registry

OPTIMIZERS: Registry[Optimizer] = Registry("optimizer", supplied=("params",), key="optimizer",
                                           legacy_target="shiftlab.trainers.optim.create_optimizer")
SCHEDULERS: Registry[LRScheduler] = Registry("scheduler", supplied=("optimizer", "max_epochs"), key="scheduler",
                                             legacy_target="shiftlab.trainers.optim.create_scheduler")
register_optimizer = OPTIMIZERS.register
register_scheduler = SCHEDULERS.register

OPTIMIZERS.register("sgd", torch.optim.SGD, defaults={"momentum": 0.0, "nesterov": False})
OPTIMIZERS.register("momentum", torch.optim.SGD, defaults={"momentum": 0.9, "nesterov": False})
OPTIMIZERS.register("nesterov", torch.optim.SGD, defaults={"momentum": 0.9, "nesterov": True})
OPTIMIZERS.register("adam", torch.optim.Adam)
OPTIMIZERS.register("adamw", torch.optim.AdamW)
OPTIMIZERS.register("lbfgs", torch.optim.LBFGS, defaults={"line_search_fn": "strong_wolfe"})


def _warmup(epoch: int, warmup_epochs: int) -> float:
    return min(1.0, (epoch + 1) / warmup_epochs) if warmup_epochs > 0 else 1.0


@SCHEDULERS.register("constant")
def constant_schedule(optimizer: Optimizer, max_epochs: int, warmup_epochs: int = 0) -> LRScheduler:
    """The base learning rate after an optional linear warm-up (epoch-wise)."""
    return LambdaLR(optimizer, lambda e: _warmup(e, warmup_epochs))


@SCHEDULERS.register("cosine")
def cosine_schedule(optimizer: Optimizer, max_epochs: int, warmup_epochs: int = 0,
                    min_factor: float = 0.0) -> LRScheduler:
    """Cosine decay to ``min_factor`` times the base rate over ``max_epochs`` (after warm-up)."""
    span = max(1, max_epochs - warmup_epochs)

    def factor(e: int) -> float:
        if e < warmup_epochs:
            return _warmup(e, warmup_epochs)
        t = min(1.0, (e - warmup_epochs) / span)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return LambdaLR(optimizer, factor)


@SCHEDULERS.register("step")
def step_schedule(optimizer: Optimizer, max_epochs: int, step_size: int = 30, gamma: float = 0.1,
                  warmup_epochs: int = 0) -> LRScheduler:
    """Multiply the rate by ``gamma`` every ``step_size`` epochs (after warm-up)."""
    return LambdaLR(optimizer, lambda e: _warmup(e, warmup_epochs) * gamma ** (e // step_size))


# By name, for code (timm's ``create_*``). As config targets (``_target_`` + ``name``) they are the
# old form, still built so saved .hydra/config.yaml files keep working; the config check warns.
def create_optimizer(params: Iterable, name: str, **kwargs: Any) -> Optimizer:
    """Optimizer ``name`` of :data:`OPTIMIZERS` over ``params``, its presets under ``kwargs``."""
    return OPTIMIZERS.create(name, list(params), **kwargs)


def create_scheduler(optimizer: Optimizer, max_epochs: int, name: str, **kwargs: Any) -> LRScheduler:
    """Epoch-wise scheduler ``name`` of :data:`SCHEDULERS`."""
    return SCHEDULERS.create(name, optimizer, max_epochs, **kwargs)
