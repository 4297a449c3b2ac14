"""Sharpness probe for the batch-regime experiment (full-batch vs mini-batch on noisy labels).

Why: Keskar et al. (2017) claim large-batch / full-batch training ends in sharper minima. This
callback measures the curvature of the training loss on a fixed training subset with the shared
math in :mod:`callbacks.hessian` (the curvature early-stopping monitor uses the same functions):
the top Hessian eigenvalue (power iteration), the Hessian trace (Hutchinson) and, optionally,
Keskar's epsilon-sharpness.

Logged keys: ``sharpness/top_eig``, ``sharpness/trace`` and, with ``epsilon_sharpness=True``,
``sharpness/eps``. The last values go to ``summary.json`` (``summary_items``).
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from callbacks.hessian import epsilon_sharpness, hutchinson_trace, top_hessian_eigenvalue
from callbacks.probe_utils import (
    check_positive_int,
    eval_mode,
    fixed_subset,
    is_probe_epoch,
    probe_model,
    train_split,
    trainable_params,
)

__all__ = ["SharpnessProbe", "sharpness_on_subset"]


def sharpness_on_subset(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    power_iters: int = 20,
    tol: float = 1e-3,
    trace_samples: int = 10,
    eps_sharpness: float | None = None,
    eps_steps: int = 10,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Curvature numbers of the mean cross-entropy of ``model`` on ``(x, y)`` (eval mode)."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    params = trainable_params(model)
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    out: dict[str, float] = {}
    with eval_mode(model):
        if power_iters > 0:
            out["top_eig"] = top_hessian_eigenvalue(loss_fn, params, power_iters, tol, generator)
        if trace_samples > 0:
            out["trace"] = hutchinson_trace(loss_fn, params, trace_samples, generator)
        if eps_sharpness is not None:
            out["eps"] = epsilon_sharpness(
                loss_fn, params, eps=eps_sharpness, steps=eps_steps, generator=generator
            )
    return out


class SharpnessProbe(Callback):
    """Log Hessian sharpness of the training loss on a fixed training subset every few epochs.

    Args:
        every_n_epochs: probe after every ``every_n_epochs``-th training epoch and after the last
            epoch (so the end of training is always measured).
        subset_size: number of training samples in the fixed probe subset (same on every rank).
        labels: ``"given"`` (the noisy labels trained on) or ``"true"``.
        power_iters: Hessian-vector products for the top eigenvalue (0 disables it).
        tol: relative tolerance that stops the power iteration early.
        trace_samples: Rademacher probes for the Hutchinson trace (0 disables it).
        epsilon_sharpness: also compute Keskar's epsilon-sharpness (``eps``, ``eps_steps``).
        eps: box size of the epsilon-sharpness (Keskar used 1e-3 and 5e-4).
        eps_steps: ascent steps of the epsilon-sharpness maximisation.
        seed: seed of the subset and of the random probe vectors.

    Cost per probe: one forward+backward plus ``power_iters + trace_samples`` double-backward
    passes on ``subset_size`` samples; ``self.seconds`` accumulates the time spent.
    """

    def __init__(
        self,
        every_n_epochs: int = 10,
        subset_size: int = 512,
        labels: str = "given",
        power_iters: int = 20,
        tol: float = 1e-3,
        trace_samples: int = 10,
        epsilon_sharpness: bool = False,
        eps: float = 1e-3,
        eps_steps: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        self.subset_size = check_positive_int("subset_size", subset_size)
        if labels not in ("given", "true"):
            raise ValueError(f"labels={labels!r} is unknown; allowed: given, true")
        self.labels = labels
        self.power_iters = check_positive_int("power_iters", power_iters, allow_zero=True)
        self.tol = float(tol)
        self.trace_samples = check_positive_int("trace_samples", trace_samples, allow_zero=True)
        self.epsilon_sharpness = bool(epsilon_sharpness)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps = float(eps)
        self.eps_steps = check_positive_int("eps_steps", eps_steps, allow_zero=True)
        self.seed = seed
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0
        self.stop_reason: str | None = None

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not is_probe_epoch(trainer, self.every_n_epochs):
            return
        t0 = time.perf_counter()
        split = train_split(trainer)
        idx = fixed_subset(len(split.x), self.subset_size, self.seed)
        y = split.y if self.labels == "given" else split.y_true
        gen = torch.Generator().manual_seed(self.seed + trainer.current_epoch)
        values = sharpness_on_subset(
            probe_model(pl_module), split.x[idx], y[idx],
            power_iters=self.power_iters, tol=self.tol, trace_samples=self.trace_samples,
            eps_sharpness=self.eps if self.epsilon_sharpness else None,
            eps_steps=self.eps_steps, generator=gen,
        )
        self.history.append({"epoch": float(trainer.current_epoch), **values})
        for key, value in values.items():
            pl_module.log(f"sharpness/{key}", value, on_step=False, on_epoch=True)
        self.seconds += time.perf_counter() - t0

    def summary_items(self) -> dict[str, float]:
        if not self.history:
            return {}
        out = {f"sharpness/{k}": v for k, v in self.history[-1].items() if k != "epoch"}
        out["sharpness/probe_seconds"] = round(self.seconds, 3)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.seconds = float(state_dict.get("seconds", 0.0))
