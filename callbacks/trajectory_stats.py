"""Where the parameters went: distance from their initial values and the size of one update.

Why: Cockpit's ``Distance`` and ``UpdateSize`` tell apart a run that moves far from its
initialization (feature learning) from one that stays close (lazy regime), and show the effective
step length whatever the optimizer's scaling. Both are L2 norms of parameter differences, per
parameter tensor (Cockpit's "layer-wise") and for all of them together (the norm of the
concatenated difference, ``sqrt(sum of the per-tensor squares)``).

* distance at step ``t``: ``||theta_t - theta_0||`` (``theta_0``: the parameters the run started from);
* update size at step ``t``: ``||theta_{t+1} - theta_t||``, measured at step ``t + 1`` and filed
  under ``t`` (as Cockpit does).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

__all__ = ["parameter_copy", "layer_distances", "distance_from_init", "update_size"]


def parameter_copy(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the trainable parameters by name (CPU, so they fit in a checkpoint)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def layer_distances(now: Mapping[str, Tensor], ref: Mapping[str, Tensor]) -> dict[str, float]:
    """``{name: ||now[name] - ref[name]||_2}`` for the names of ``ref``, plus ``total``: the
    norm of all the differences together (float64 sums)."""
    missing = [n for n in ref if n not in now]
    if missing:
        raise ValueError(f"parameters {missing} are missing from the current model")
    out = {n: float(torch.linalg.vector_norm(now[n].detach().double().cpu() - r.double().cpu()))
           for n, r in ref.items()}
    out["total"] = math.sqrt(sum(v * v for v in out.values()))
    return out


def distance_from_init(model: nn.Module, init: Mapping[str, Tensor]) -> dict[str, float]:
    """Per-tensor and total L2 distance of the model's parameters from ``init``."""
    return layer_distances(dict(model.named_parameters()), init)


def update_size(model: nn.Module, before: Mapping[str, Tensor]) -> dict[str, float]:
    """Per-tensor and total L2 norm of ``theta_now - before`` (one update when ``before`` is the
    previous step's parameters)."""
    return layer_distances(dict(model.named_parameters()), before)
