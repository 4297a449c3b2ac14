"""Optimizer and learning-rate scheduler registries.

Names mean exactly what they say: ``sgd`` has no momentum, ``momentum`` is heavy-ball,
``nesterov`` is Nesterov momentum; nothing is switched on behind the user's back.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from shiftlab.trainers.registry import Registry

OPTIMIZERS: Registry[Optimizer] = Registry("optimizer", key="optimizer.name")
SCHEDULERS: Registry[LRScheduler] = Registry("scheduler", key="scheduler.name")


@OPTIMIZERS.register("sgd")
def _sgd(params, lr: float, weight_decay: float = 0.0) -> Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=weight_decay)


@OPTIMIZERS.register("momentum")
def _momentum(params, lr: float, momentum: float = 0.9, dampening: float = 0.0,
              weight_decay: float = 0.0) -> Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening,
                           weight_decay=weight_decay, nesterov=False)


@OPTIMIZERS.register("nesterov")
def _nesterov(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)


@OPTIMIZERS.register("adam")
def _adam(params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01) -> Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register("lbfgs")
def _lbfgs(params, lr: float = 1.0, max_iter: int = 20, history_size: int = 100,
           line_search_fn: str | None = "strong_wolfe", weight_decay: float = 0.0) -> Optimizer:
    if weight_decay:
        raise ValueError("optimizer.weight_decay is not supported by lbfgs; allowed: 0")
    return torch.optim.LBFGS(params, lr=lr, max_iter=max_iter, history_size=history_size,
                             line_search_fn=line_search_fn)


def create_optimizer(params: Iterable, name: str, **kwargs) -> Optimizer:
    """Build optimizer ``name`` over ``params`` (Hydra calls this with ``_partial_: true``)."""
    return OPTIMIZERS.create(name, list(params), **kwargs)


def _warmup(epoch: int, warmup_epochs: int) -> float:
    return min(1.0, (epoch + 1) / warmup_epochs) if warmup_epochs > 0 else 1.0


@SCHEDULERS.register("constant")
def _constant(optimizer: Optimizer, max_epochs: int, warmup_epochs: int = 0) -> LRScheduler:
    return LambdaLR(optimizer, lambda e: _warmup(e, warmup_epochs))


@SCHEDULERS.register("cosine")
def _cosine(optimizer: Optimizer, max_epochs: int, warmup_epochs: int = 0, min_factor: float = 0.0) -> LRScheduler:
    span = max(1, max_epochs - warmup_epochs)

    def factor(e: int) -> float:
        if e < warmup_epochs:
            return _warmup(e, warmup_epochs)
        t = min(1.0, (e - warmup_epochs) / span)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return LambdaLR(optimizer, factor)


@SCHEDULERS.register("step")
def _step(optimizer: Optimizer, max_epochs: int, step_size: int = 30, gamma: float = 0.1,
          warmup_epochs: int = 0) -> LRScheduler:
    return LambdaLR(optimizer, lambda e: _warmup(e, warmup_epochs) * gamma ** (e // step_size))


def create_scheduler(optimizer: Optimizer, max_epochs: int, name: str, **kwargs) -> LRScheduler:
    """Build an epoch-wise scheduler ``name`` (Hydra calls this with ``_partial_: true``)."""
    return SCHEDULERS.create(name, optimizer, max_epochs, **kwargs)
