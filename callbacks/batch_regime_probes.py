"""Sharpness probe for the batch-regime experiment (full-batch vs mini-batch on noisy labels).

Why: Keskar et al. (2017) claim large-batch / full-batch training ends in sharper minima. This
callback measures the curvature of the training loss on a fixed training subset with the shared
math in :mod:`shiftlab.callbacks.hessian` (the curvature early-stopping monitor uses the same functions):
the top Hessian eigenvalue (power iteration), the Hessian trace (Hutchinson) and, optionally,
Keskar's epsilon-sharpness.

Logged keys (prefix ``log_prefix``, default ``sharpness``, the same names as
:class:`shiftlab.callbacks.sharpness_monitor.SharpnessMonitor`, so use one of the two per run):
``sharpness/top_eigenvalue``, ``sharpness/trace`` and, with ``epsilon_sharpness=True``,
``sharpness/eps_sharpness``. The last values go to ``summary.json`` (``summary_items``).

Overhead control: besides ``every_n_epochs``, ``max_overhead`` skips a scheduled probe when the
time spent probing, plus this probe and the final one (each estimated by the last probe's cost),
would exceed that fraction of the training time so far; cheap full-batch epochs would otherwise be
dominated by the probe. The first scheduled probe always runs (it measures the cost) and the last
epoch is always probed, so the end-of-training sharpness is always there; on runs too short to
afford those two probes the overhead is above ``max_overhead``. The skip decision is taken on rank 0 and broadcast, so all DDP ranks
probe at the same epochs.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from shiftlab.callbacks.hessian import _HVP, _hutchinson, _power_iteration, epsilon_sharpness
from shiftlab.callbacks.reporting import Reporter
from shiftlab.callbacks.probe_utils import (
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
        if power_iters > 0 or trace_samples > 0:
            hvp = _HVP(loss_fn, params)  # one gradient graph shared by both estimates
            if power_iters > 0:
                out["top_eigenvalue"] = _power_iteration(hvp, power_iters, tol, generator)
            if trace_samples > 0:
                out["trace"] = _hutchinson(hvp, trace_samples, generator)
            del hvp
        if eps_sharpness is not None:
            out["eps_sharpness"] = epsilon_sharpness(
                loss_fn, params, eps=eps_sharpness, steps=eps_steps, generator=generator
            )
    return out


class SharpnessProbe(Callback, Reporter):
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
        max_overhead: skip scheduled probes that would push probe time above this fraction of
            the training time so far (``None``: never skip); see the module docstring.
        log_prefix: prefix of the logged keys.

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
        max_overhead: float | None = 0.1,
        log_prefix: str = "sharpness",
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
        if max_overhead is not None and not max_overhead > 0:
            raise ValueError(f"max_overhead must be null or > 0, got {max_overhead!r}")
        self.max_overhead = max_overhead
        self.log_prefix = log_prefix
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0
        self.skipped = 0
        self._fit_start: float | None = None
        self._last_cost: float | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._fit_start = time.perf_counter() - self.seconds

    def _over_budget(self, trainer: Any) -> bool:
        if self.max_overhead is None or self._fit_start is None:
            return False
        train_seconds = time.perf_counter() - self._fit_start - self.seconds
        # Predictive: this probe and the (always taken) final one must both fit in the budget.
        # The first scheduled probe runs regardless and provides the cost estimate.
        cost = self._last_cost
        over = cost is not None and self.seconds + 2 * cost > self.max_overhead * max(train_seconds, 0.0)
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None and getattr(trainer, "world_size", 1) > 1:
            over = bool(strategy.broadcast(over, src=0))
        return over

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not is_probe_epoch(trainer, self.every_n_epochs):
            return
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if not (last or trainer.should_stop) and self._over_budget(trainer):
            self.skipped += 1
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
            pl_module.log(f"{self.log_prefix}/{key}", value, on_step=False, on_epoch=True)
        self._last_cost = time.perf_counter() - t0
        self.seconds += self._last_cost

    def summary_items(self) -> dict[str, float]:
        if not self.history:
            return {}
        p = self.log_prefix
        out = {f"{p}/{k}": v for k, v in self.history[-1].items() if k != "epoch"}
        out[f"{p}/probe_seconds"] = round(self.seconds, 3)
        out[f"{p}/probes_skipped"] = self.skipped
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "seconds": self.seconds,
                "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.seconds = float(state_dict.get("seconds", 0.0))
        self.skipped = int(state_dict.get("skipped", 0))
