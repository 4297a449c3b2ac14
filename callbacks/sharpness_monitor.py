"""Sharpness monitor: top Hessian eigenvalue and Hessian trace on a fixed batch every k epochs.

Why a fixed batch: sharpness measured on a different batch each time mixes curvature changes
with sampling noise; a fixed subset of the training set makes the series comparable across
epochs. The math lives in :mod:`shiftlab.callbacks.hessian` (shared with the batch-regime experiment).

Usable as a stopping signal: ``max_top_eigenvalue`` stops once the top eigenvalue exceeds a bound
(e.g. ``2 / lr``, the edge of stability for gradient descent), and ``stop_rule`` runs any stopping
rule of :mod:`shiftlab.callbacks.early_stopping` on the eigenvalue series (e.g. ``up`` with ``mode=min``
stops once sharpness has kept rising over successive strips).
"""
from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn import functional as F

from shiftlab.callbacks.early_stopping import StoppingRule, make_rule
from shiftlab.callbacks.hessian import hutchinson_trace, top_hessian_eigenvalue
from shiftlab.callbacks.reporting import Reporter

__all__ = ["SharpnessMonitor"]


class SharpnessMonitor(Callback, Reporter):
    """Log ``sharpness/top_eigenvalue`` and ``sharpness/trace`` every ``every_n_epochs`` epochs.

    Args:
        every_n_epochs: measure after epochs ``k-1, 2k-1, ...`` (and never during sanity checks).
        num_samples: size of the fixed batch (the first samples of ``datamodule.train_set``, or
            the first training batch when the data module has no ``train_set``).
        power_iters / tol: power iteration budget and relative tolerance for the eigenvalue.
        trace_samples: Rademacher probes for Hutchinson's trace (0 disables the trace).
        seed: seeds the probe vectors, so a measurement is a function of the weights alone.
        max_top_eigenvalue: stop training once the top eigenvalue exceeds this (None: never).
        stop_rule / stop_rule_kwargs: a rule name for :func:`make_rule` applied to the
            eigenvalue series (one value per measurement), e.g. ``patience``.
    """

    def __init__(self, every_n_epochs: int = 5, num_samples: int = 512, power_iters: int = 20,
                 tol: float = 1e-3, trace_samples: int = 10, seed: int = 0,
                 max_top_eigenvalue: float | None = None, stop_rule: str | None = None,
                 stop_rule_kwargs: dict[str, Any] | None = None,
                 log_prefix: str = "sharpness") -> None:
        super().__init__()
        if every_n_epochs < 1 or num_samples < 1 or power_iters < 1 or trace_samples < 0:
            raise ValueError("every_n_epochs, num_samples, power_iters must be >= 1 and "
                             f"trace_samples >= 0 (got {every_n_epochs}, {num_samples}, "
                             f"{power_iters}, {trace_samples})")
        self.every_n_epochs, self.num_samples = int(every_n_epochs), int(num_samples)
        self.power_iters, self.tol, self.trace_samples = int(power_iters), float(tol), int(trace_samples)
        self.seed, self.max_top_eigenvalue, self.log_prefix = int(seed), max_top_eigenvalue, log_prefix
        self.rule: StoppingRule | None = (make_rule(stop_rule, **(stop_rule_kwargs or {}))
                                          if stop_rule else None)
        self.stop_rule = stop_rule
        self.history: dict[str, list[float]] = {"epoch": [], "top_eigenvalue": [], "trace": []}
        self.stop_reason: str | None = None
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---------------------------------------------------------------- the fixed batch
    def _fixed_batch(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor]:
        dm = trainer.datamodule
        split = getattr(dm, "train_set", None) if dm is not None else None
        if split is not None and hasattr(split, "x"):
            return split.x[: self.num_samples], split.y[: self.num_samples]
        x, y = next(iter(trainer.train_dataloader))
        return x[: self.num_samples], y[: self.num_samples]

    def measure(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[float, float]:
        """(top eigenvalue, Hutchinson trace) of the mean cross-entropy on ``(x, y)``; the model
        is evaluated in eval mode (dropout / batch-norm statistics fixed) and restored."""
        was_training = model.training
        model.eval()
        try:
            params = [p for p in model.parameters() if p.requires_grad]

            def loss_fn() -> torch.Tensor:
                return F.cross_entropy(model(x), y)

            g = torch.Generator().manual_seed(self.seed)
            top = top_hessian_eigenvalue(loss_fn, params, iters=self.power_iters, tol=self.tol,
                                         generator=g)
            tr = (hutchinson_trace(loss_fn, params, samples=self.trace_samples, generator=g)
                  if self.trace_samples else math.nan)
        finally:
            model.train(was_training)
        return top, tr

    # ---------------------------------------------------------------- hooks
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        if self._batch is None:
            self._batch = self._fixed_batch(trainer)
        x, y = (t.to(pl_module.device) for t in self._batch)
        model = getattr(pl_module, "model", pl_module)
        with torch.enable_grad():
            top, tr = self.measure(model, x, y)
        top, tr = trainer.strategy.broadcast((top, tr), src=0)  # one answer for every rank
        self.history["epoch"].append(trainer.current_epoch)
        self.history["top_eigenvalue"].append(top)
        self.history["trace"].append(tr)
        pl_module.log(f"{self.log_prefix}/top_eigenvalue", top, on_step=False, on_epoch=True)
        if math.isfinite(tr):
            pl_module.log(f"{self.log_prefix}/trace", tr, on_step=False, on_epoch=True)
        reason = None
        if self.max_top_eigenvalue is not None and top > self.max_top_eigenvalue:
            reason = f"top Hessian eigenvalue {top:.4g} > max_top_eigenvalue={self.max_top_eigenvalue:g}"
        elif self.rule is not None and self.rule.update(top):
            reason = f"{self.stop_rule} rule on the top Hessian eigenvalue: {self.rule.reason}"
        if reason and self.stop_reason is None:
            self.stop_reason = f"sharpness monitor stopped after epoch {trainer.current_epoch}: {reason}"
            trainer.should_stop = True

    # ---------------------------------------------------------------- reporting and resume
    def summary_items(self) -> dict[str, Any]:
        if not self.history["epoch"]:
            return {}
        return {"sharpness": {"epochs": list(self.history["epoch"]),
                              "top_eigenvalue": list(self.history["top_eigenvalue"]),
                              "trace": list(self.history["trace"]),
                              "final_top_eigenvalue": self.history["top_eigenvalue"][-1]}}

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()},
                "rule": None if self.rule is None else self.rule.state_dict(),
                "stop_reason": self.stop_reason}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state_dict["history"].items()}
        if self.rule is not None and state_dict.get("rule") is not None:
            self.rule.load_state_dict(state_dict["rule"])
        self.stop_reason = state_dict.get("stop_reason")
