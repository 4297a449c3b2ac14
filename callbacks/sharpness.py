"""``callbacks=sharpness``: curvature of the training loss on a fixed training subset, every few epochs.

The one sharpness callback (before, two classes logged the same ``sharpness/*`` keys with different
definitions). What it measures, on the mean cross-entropy of the network in eval mode, with the plain
functions of :mod:`shiftlab.callbacks.hessian`: the top Hessian eigenvalue (power iteration on
Hessian-vector products), the Hessian trace (exact from layer factors for ReLU nets, else Hutchinson) and, optionally, Keskar et al.'s (2017)
epsilon-sharpness. Why a fixed subset: curvature measured on a different batch each time mixes its
change with sampling noise, so the series would not be comparable across epochs.

The definition is spelt out by options (``configs/callbacks/sharpness.yaml``):

* ``subset``: ``first`` (the first ``subset_size`` training samples) or ``random`` (a random draw of
  ``subset_size`` seeded by ``seed``); either way the same samples at every probe and on every rank;
* ``seed_policy``: seed of the random probe vectors (power-iteration start, Rademacher vectors,
  epsilon-sharpness start): ``fixed`` (``seed`` at every probe: a measurement is a function of the
  weights alone) or ``per_epoch`` (``seed + epoch``: estimator noise is not frozen into the series);
* frequency, cost budget, resume: :class:`~shiftlab.callbacks.probe.Probe` (``every_n_epochs`` plus
  the last epoch; ``max_overhead``; ``probe_cost/sharpness_s``);
* stop rule: ``max_top_eigenvalue`` (e.g. ``2 / lr``, the edge of stability of gradient descent)
  and/or ``stop_rule`` (any rule of :mod:`shiftlab.callbacks.early_stopping` on the eigenvalue
  series, e.g. ``up``), which stop training and report why through ``stop_reason``.

Summary (flat): ``sharpness/top_eigenvalue``, ``sharpness/trace``, ``sharpness/eps_sharpness`` (the
last probe), ``probe_cost/sharpness_s``, ``probe_cost/sharpness_skipped``; the whole series is in
``<run>/probes/sharpness.json``. Rank 0's numbers are broadcast, so all DDP ranks agree.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from shiftlab.callbacks.stopping_rules import StoppingRule, make_rule
from shiftlab.callbacks.hessian import epsilon_sharpness, hutchinson_trace, top_hessian_eigenvalue
from shiftlab.callbacks.curvature_estimates import hutchinson_trace_se, lanczos_eigenvalues, probe_mode
from shiftlab.callbacks.per_example_layers import NotApplicable, fast_path_reason, ggn_is_hessian_trace, ggn_trace
from shiftlab.callbacks.probe import Probe
from shiftlab.callbacks.probe_utils import (
    check_positive_int,
    probe_indices,
    probe_model,
    rank0_value,
    train_split_or_batch,
    trainable_params,
)

__all__ = ["SEED_POLICIES", "SharpnessMonitor", "sharpness_on_subset"]

SEED_POLICIES = ("fixed", "per_epoch")
METHODS = ("lanczos", "power")
TRACE_METHODS = ("auto", "ggn", "hutchinson")
LEGACY_STATE_KEYS = ("SharpnessProbe",)  # the batch-regime class this one replaced


def sharpness_on_subset(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, power_iters: int = 20,
                        tol: float = 1e-3, trace_samples: int = 10, eps_sharpness: float | None = None,
                        eps_steps: int = 10, generator: torch.Generator | None = None, method: str = "power",
                        model_mode: str = "eval", max_hvps: int = 300,
                        trace_target_rel_error: float | None = None,
                        trace_method: str = "hutchinson") -> dict[str, float]:
    """Curvature numbers of the mean cross-entropy of ``model`` on ``(x, y)``.

    ``method``: ``lanczos`` (scipy's ARPACK on Hessian-vector products: value, residual, products spent,
    converged flag) or ``power`` (power iteration, ``power_iters`` at most; no convergence evidence).
    ``model_mode``: ``eval`` (the model itself, eval mode, restored) or ``train`` (a copy in train mode:
    BatchNorm uses batch statistics as the training steps do; running statistics do not move).
    ``trace_target_rel_error``: Hutchinson probes are added until the trace's standard error is below this
    fraction of it (at most ``trace_samples``); None: exactly ``trace_samples`` probes, no standard error.
    ``power_iters`` / ``trace_samples`` 0 leave out the eigenvalue / trace; ``eps_sharpness`` None leaves
    out the epsilon-sharpness. One ``generator`` feeds the estimates in that order.
    ``trace_method``: ``ggn`` (exact Gauss-Newton trace by layer factors,
    :func:`~shiftlab.callbacks.per_example_layers.ggn_trace`; the Hessian's trace for ReLU nets, logged
    ``trace_exact`` 1, else the GGN's, ``trace_exact`` 0), ``hutchinson`` (as above) or ``auto`` (``ggn``
    where it equals the Hessian trace for this model in this mode, else ``hutchinson``); the method used
    is recorded as ``trace_method``."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed; allowed: {', '.join(METHODS)}")
    if trace_method not in TRACE_METHODS:
        raise ValueError(f"trace_method={trace_method!r} is not allowed; allowed: {', '.join(TRACE_METHODS)}")
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    out: dict[str, float] = {}
    with probe_mode(model, model_mode) as net, torch.enable_grad():
        params = trainable_params(net)
        loss_fn = lambda: F.cross_entropy(net(x), y)  # noqa: E731
        t = time.perf_counter()
        if power_iters > 0 and method == "lanczos":
            r = lanczos_eigenvalues(loss_fn, params, k=1, tol=tol, max_hvps=max_hvps, generator=generator)
            out.update(top_eigenvalue=r.values[0], top_eigenvalue_residual=r.residuals[0],
                       top_eigenvalue_hvps=float(r.hvps), top_eigenvalue_converged=float(r.converged))
        elif power_iters > 0:
            out["top_eigenvalue"] = top_hessian_eigenvalue(loss_fn, params, iters=power_iters, tol=tol,
                                                           generator=generator)
        if power_iters > 0:
            out["seconds_top_eigenvalue"] = time.perf_counter() - t
        t = time.perf_counter()
        g = None
        if trace_samples > 0 and (
                trace_method == "ggn" or (trace_method == "auto" and ggn_is_hessian_trace(net, x) is None)):
            why = fast_path_reason(net)
            if why is None:
                try:
                    g = ggn_trace(net, x, y)
                except NotApplicable as e:  # found in the forward pass (a layer called twice, in-place ops)
                    why = str(e)
            if g is None and trace_method == "ggn":
                raise ValueError(f"trace_method=ggn is not allowed for this model ({why}); allowed: auto, hutchinson")
        if trace_samples > 0:
            out["trace_method"] = "hutchinson" if g is None else "ggn"
        if g is not None:
            out.update(trace=g.trace, trace_exact=float(g.equals_hessian_trace))
        elif trace_samples >= 2 and trace_target_rel_error:
            tr = hutchinson_trace_se(loss_fn, params, target_rel_error=trace_target_rel_error,
                                     min_samples=min(20, trace_samples), max_samples=trace_samples,
                                     generator=generator)
            out.update(trace=tr.trace, trace_se=tr.se, trace_samples=float(tr.samples))
        elif trace_samples > 0:
            out["trace"] = hutchinson_trace(loss_fn, params, samples=trace_samples, generator=generator)
        if trace_samples > 0:
            out["seconds_trace"] = time.perf_counter() - t
        if eps_sharpness is not None:
            t = time.perf_counter()
            out["eps_sharpness"] = epsilon_sharpness(loss_fn, params, eps=eps_sharpness, steps=eps_steps,
                                                     generator=generator)
            out["seconds_eps_sharpness"] = time.perf_counter() - t
    return out


class SharpnessMonitor(Probe):
    """Log ``sharpness/top_eigenvalue``, ``sharpness/trace`` (and ``eps_sharpness``) every few epochs.

    Args:
        every_n_epochs: probe after every ``every_n_epochs``-th epoch and after the last one.
        subset: ``first`` or ``random`` (see the module docstring); ``subset_size`` samples.
        labels: ``given`` (the possibly noisy labels trained on) or ``true`` (``train_set.y_true``).
        seed / seed_policy: seed of the random subset and of the probe vectors; ``fixed`` or
            ``per_epoch`` (probe vectors only: the subset never changes).
        method: ``lanczos`` (default: value, residual, products and a converged flag are logged) or
            ``power`` (the estimator before; kept to reproduce earlier figures).
        model_mode: ``eval`` or ``train`` (BatchNorm with batch statistics, on a copy).
        power_iters / tol: eigenvalue on (0: no eigenvalue; for ``power`` the iteration budget) and the
            relative tolerance; max_hvps: Lanczos' budget of Hessian-vector products.
        trace_samples: Rademacher vectors for the Hutchinson trace (0: no trace); with
            ``trace_target_rel_error`` the most probes, added until the standard error is that small.
        trace_method: ``auto`` (the exact trace by layer factors where it equals the Hessian's: ReLU
            nets of Linear / Conv / eval-mode BatchNorm layers; else Hutchinson), ``ggn`` or ``hutchinson``.
        epsilon_sharpness / eps / eps_steps: Keskar's epsilon-sharpness, box size and ascent steps.
        max_overhead: cost budget, a fraction of training time (None: probe whatever it costs).
        max_top_eigenvalue: stop once the top eigenvalue exceeds this (None: never).
        stop_rule / stop_rule_kwargs: a rule name for :func:`make_rule` on the eigenvalue series.

    Cost per probe: the eigenvalue's Hessian-vector products (double-backward passes) on ``subset_size``
    samples, then the trace: one forward and one C-column batched backward pass when exact (``ggn``), else
    up to ``trace_samples`` Hessian-vector products (and ``eps_steps`` forward+backward passes).
    """

    name = "sharpness"

    def __init__(self, every_n_epochs: int = 5, subset: str = "first", subset_size: int = 512,
                 labels: str = "given", seed: int = 0, seed_policy: str = "fixed", power_iters: int = 20,
                 tol: float = 1e-3, trace_samples: int = 10, epsilon_sharpness: bool = False,
                 eps: float = 1e-3, eps_steps: int = 10, max_overhead: float | None = None,
                 method: str = "lanczos", model_mode: str = "eval", max_hvps: int = 300,
                 trace_target_rel_error: float | None = 0.05, trace_method: str = "auto",
                 max_top_eigenvalue: float | None = None, stop_rule: str | None = None,
                 stop_rule_kwargs: dict[str, Any] | None = None, log_prefix: str = "sharpness") -> None:
        super().__init__(every_n_epochs=check_positive_int("every_n_epochs", every_n_epochs),
                         log_prefix=log_prefix, max_overhead=max_overhead)
        probe_indices(1, 1, 0, subset)  # validates the name
        if seed_policy not in SEED_POLICIES:
            raise ValueError(f"seed_policy={seed_policy!r} is unknown; allowed: {', '.join(SEED_POLICIES)}")
        if labels not in ("given", "true"):
            raise ValueError(f"labels={labels!r} is unknown; allowed: given, true")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.subset, self.seed_policy, self.labels, self.seed = subset, seed_policy, labels, int(seed)
        self.subset_size = check_positive_int("subset_size", subset_size)
        self.power_iters = check_positive_int("power_iters", power_iters, allow_zero=True)
        self.trace_samples = check_positive_int("trace_samples", trace_samples, allow_zero=True)
        self.eps_steps = check_positive_int("eps_steps", eps_steps, allow_zero=True)
        self.tol, self.eps, self.epsilon_sharpness = float(tol), float(eps), bool(epsilon_sharpness)
        if (max_top_eigenvalue is not None or stop_rule) and self.power_iters == 0:
            raise ValueError("max_top_eigenvalue / stop_rule need the top eigenvalue: power_iters must be >= 1")
        self.max_top_eigenvalue, self.stop_rule = max_top_eigenvalue, stop_rule
        if method not in METHODS:
            raise ValueError(f"method={method!r} is unknown; allowed: {', '.join(METHODS)}")
        if model_mode not in ("eval", "train"):
            raise ValueError(f"model_mode={model_mode!r} is unknown; allowed: eval, train")
        self.method, self.model_mode = method, model_mode
        if trace_method not in TRACE_METHODS:
            raise ValueError(f"trace_method={trace_method!r} is unknown; allowed: {', '.join(TRACE_METHODS)}")
        self.trace_method = trace_method
        self.max_hvps = check_positive_int("max_hvps", max_hvps)
        self.trace_target_rel_error = None if not trace_target_rel_error else float(trace_target_rel_error)
        self.rule: StoppingRule | None = make_rule(stop_rule, **(stop_rule_kwargs or {})) if stop_rule else None

    def probe_seed(self, epoch: int) -> int:
        """Seed of the probe vectors at ``epoch`` under ``seed_policy``."""
        return self.seed + epoch if self.seed_policy == "per_epoch" else self.seed

    def measure(self, trainer: Any, pl_module: Any, batch: Any = None) -> dict[str, float]:
        split = train_split_or_batch(trainer)
        if self.labels == "true" and getattr(split, "y_true", None) is None:
            raise RuntimeError("callbacks.sharpness.labels=true needs train_set.y_true; none found")
        idx = probe_indices(len(split.x), self.subset_size, self.seed, self.subset)
        y = split.y if self.labels == "given" else split.y_true
        gen = torch.Generator().manual_seed(self.probe_seed(trainer.current_epoch))
        values = sharpness_on_subset(probe_model(pl_module), split.x[idx], y[idx], power_iters=self.power_iters,
                                     tol=self.tol, trace_samples=self.trace_samples,
                                     eps_sharpness=self.eps if self.epsilon_sharpness else None,
                                     eps_steps=self.eps_steps, generator=gen, method=self.method,
                                     model_mode=self.model_mode, max_hvps=self.max_hvps,
                                     trace_target_rel_error=self.trace_target_rel_error,
                                     trace_method=self.trace_method)
        return rank0_value(trainer, values)

    def after_record(self, trainer: Any, values: dict[str, Any]) -> None:
        top = values.get("top_eigenvalue")
        if top is None:
            return
        reason = None
        if self.max_top_eigenvalue is not None and top > self.max_top_eigenvalue:
            reason = f"top Hessian eigenvalue {top:.4g} > max_top_eigenvalue={self.max_top_eigenvalue:g}"
        elif self.rule is not None and self.rule.update(top):
            reason = f"{self.stop_rule} rule on the top Hessian eigenvalue: {self.rule.reason}"
        if reason and self.stop_reason is None:
            self.stop_reason = f"sharpness monitor stopped after epoch {trainer.current_epoch}: {reason}"
            trainer.should_stop = True

    # --- resume (also from the two classes this one replaced) ----------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"rule": None if self.rule is None else self.rule.state_dict(), "stop_reason": self.stop_reason}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.rule is not None and state.get("rule") is not None:
            self.rule.load_state_dict(state["rule"])
        self.stop_reason = state.get("stop_reason")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        hist = state_dict.get("history")
        if isinstance(hist, dict):  # old SharpnessMonitor: {"epoch": [...], "top_eigenvalue": [...], ...}
            rows = [{"step": -1, "epoch": int(e), "top_eigenvalue": t, "trace": r}
                    for e, t, r in zip(hist["epoch"], hist["top_eigenvalue"], hist["trace"])]
            state_dict = {**state_dict, "history": rows}
        else:  # old SharpnessProbe rows lack "step"
            state_dict = {**state_dict, "history": [{"step": -1, **h, "epoch": int(h["epoch"])} if "step" not in h
                                                    else h for h in hist or []]}
        super().load_state_dict(state_dict)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states:
            old = next((states[k] for k in LEGACY_STATE_KEYS if k in states), None)
            if old is not None:
                self.load_state_dict(old)
