"""The gradient-tests callback's further quantities: TIC, gradient histograms, distance, update size.

Why a module beside :mod:`shiftlab.callbacks.gradient_tests`: these quantities keep state across
probes (the initial parameters, the parameters before the update being measured, the histograms
for the run's figure) that must go into the checkpoint for an exact resume; the callback holds one
:class:`GradientExtras` and delegates to it. The math is in :mod:`.tic`, :mod:`.gradient_histograms`
and :mod:`.trajectory_stats`; the union over DDP ranks in :mod:`.rank_union`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from shiftlab.callbacks import gradient_histograms as gh
from shiftlab.callbacks import tic
from shiftlab.callbacks import trajectory_stats as ts
from shiftlab.callbacks.probe_utils import eval_mode
from shiftlab.callbacks.rank_union import all_sum

__all__ = ["GradientExtras", "EXTRA_QUANTITIES"]

EXTRA_QUANTITIES = ("tic_diag", "tic_trace", "grad_hist_1d", "grad_hist_2d", "distance", "update_size")
_KEY = "callbacks.gradient_tests"


def _bad(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{_KEY}.{key}={value} is not allowed; allowed: {allowed}")


def _pair(value: Any, key: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise _bad(key, value, "[low, high] with low < high") from None
    if not lo < hi:
        raise _bad(key, value, "[low, high] with low < high")
    return lo, hi


def _bins(value: Any, key: str, n: int) -> tuple[int, ...]:
    vals = [value] if n == 1 else list(value) if isinstance(value, Sequence) else []
    if len(vals) != n or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in vals):
        raise _bad(key, value, "an integer >= 1" if n == 1 else f"{n} integers >= 1")
    return tuple(vals)


class GradientExtras:
    """Settings and cross-probe state of the further quantities.

    Args:
        quantities: the callback's quantity list (those of :data:`EXTRA_QUANTITIES` are measured).
        hessian_diagonal: TIC's Hessian diagonal: ``layers`` (the exact Gauss-Newton diagonal from
            layer factors, where it is the Hessian's: cross-entropy, ReLU-type chains of Linear / Conv /
            eval-mode BatchNorm), ``exact`` (one Hessian-vector product per parameter), ``hutchinson``
            (``hessian_samples`` Rademacher probes), ``auto`` (``layers`` where it applies, else exact up
            to ``max_exact_params`` trainable parameters, else Hutchinson). The path taken is in the
            summary (``tic_hessian_diagonal``).
        hist_bins / hist_range: 1d histogram (Cockpit: 100 bins over [-2, 2]).
        hist2d_bins / hist2d_range: 2d histogram, gradient axis first (Cockpit: (40, 50) bins over
            [-1, 1] x [-2, 2]).
        seed: Hutchinson probes at step ``t`` are drawn from ``seed + t`` (same on every rank and
            after a resume).
    """

    def __init__(self, quantities: Sequence[str], hessian_diagonal: str = "auto",
                 hessian_samples: int = 20, max_exact_params: int = 1024, hist_bins: int = 100,
                 hist_range: Sequence[float] = gh.DEFAULT_RANGE_1D,
                 hist2d_bins: Sequence[int] = gh.DEFAULT_BINS_2D,
                 hist2d_range: Sequence[Sequence[float]] = gh.DEFAULT_RANGE_2D, seed: int = 0) -> None:
        if hessian_diagonal not in tic.METHODS:
            raise _bad("hessian_diagonal", hessian_diagonal, ", ".join(tic.METHODS))
        if not isinstance(hessian_samples, int) or isinstance(hessian_samples, bool) or hessian_samples < 2:
            raise _bad("hessian_samples", hessian_samples, "an integer >= 2")
        if not isinstance(max_exact_params, int) or max_exact_params < 0:
            raise _bad("max_exact_params", max_exact_params, "an integer >= 0")
        self.wanted = [q for q in quantities if q in EXTRA_QUANTITIES]
        self.hessian_method, self.hessian_samples = hessian_diagonal, hessian_samples
        self.max_exact_params, self.seed = max_exact_params, int(seed)
        self.hist_bins = _bins(hist_bins, "hist_bins", 1)[0]
        self.hist_range = _pair(hist_range, "hist_range")
        self.hist2d_bins = _bins(hist2d_bins, "hist2d_bins", 2)
        if not isinstance(hist2d_range, Sequence) or len(hist2d_range) != 2:
            raise _bad("hist2d_range", hist2d_range, "[[low, high], [low, high]]")
        self.hist2d_range = (_pair(hist2d_range[0], "hist2d_range"), _pair(hist2d_range[1], "hist2d_range"))
        self.init: dict[str, Tensor] | None = None
        self.init_step: int | None = None
        self.update_start: dict[str, Any] | None = None
        self.hist_steps: list[int] = []
        self.hists_1d: list[Tensor] = []
        self.hist_2d: tuple[int, Tensor] | None = None
        self.hessian_used: str | None = None

    # ------------------------------------------------------------------------------ measuring
    def before_step(self, model: nn.Module, step: int) -> dict[str, Any] | None:
        """At the start of every training step: take the initial parameters (first step seen) and
        return ``{"step", "values", "seconds"}`` when the update size of an earlier probe is due."""
        if "distance" in self.wanted and self.init is None:
            self.init, self.init_step = ts.parameter_copy(model), step
        start = self.update_start
        if start is None or step <= start["step"]:
            return None
        self.update_start = None
        if step != start["step"] + 1:  # no single update between the two points
            return None
        t = time.perf_counter()
        sizes = ts.update_size(model, start["params"])
        return {"step": start["step"], "values": _prefixed("update_size", sizes),
                "seconds": time.perf_counter() - t}

    def measure(self, model: nn.Module, x: Tensor, y: Tensor, loss: Any, G: Tensor, moments: Any,
                step: int, distributed: bool, cost: dict[str, float]) -> dict[str, float]:
        """The wanted quantities of one probe (``moments``: of the union when ``distributed``);
        seconds go into ``cost``."""
        values: dict[str, float] = {}
        if "tic_diag" in self.wanted or "tic_trace" in self.wanted:
            t = time.perf_counter()
            gen = torch.Generator().manual_seed(self.seed + step)
            with eval_mode(model):
                hd = tic.hessian_diagonal(model, x, y, loss, self.hessian_method, self.max_exact_params,
                                          self.hessian_samples, gen)
            diag, samples = hd.diag.double(), hd.trace_samples
            if distributed:  # the union's mean loss: example-weighted mean of the ranks' Hessians
                diag = all_sum(diag * x.shape[0]) / moments.n
                samples = None if samples is None else all_sum(samples * x.shape[0]) / moments.n
            self.hessian_used = hd.method
            cost["hessian_diagonal"] = time.perf_counter() - t
            t = time.perf_counter()
            c = moments.coord_sq_mean.to(diag.device)
            if "tic_diag" in self.wanted:
                values["tic_diag"] = tic.tic_diag(c, diag)
            if "tic_trace" in self.wanted:
                values["tic_trace"] = tic.tic_trace(c, diag)
                values["tic_trace_se"] = tic.tic_trace_se(values["tic_trace"], samples)
            cost["tic"] = time.perf_counter() - t
        if "grad_hist_1d" in self.wanted:
            t = time.perf_counter()
            h = gh.histogram_1d(G, self.hist_bins, self.hist_range)
            if distributed:
                h = all_sum(h.to(G.device)).cpu()
            self.hist_steps.append(step)
            self.hists_1d.append(h)
            cost["grad_hist_1d"] = time.perf_counter() - t
        if "grad_hist_2d" in self.wanted:
            t = time.perf_counter()
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
            h2 = gh.histogram_2d(G, flat, self.hist2d_bins, self.hist2d_range)
            if distributed:
                h2 = all_sum(h2.to(G.device)).cpu()
            self.hist_2d = (step, h2)
            cost["grad_hist_2d"] = time.perf_counter() - t
        if "distance" in self.wanted and self.init is not None:
            t = time.perf_counter()
            values.update(_prefixed("distance", ts.distance_from_init(model, self.init)))
            cost["distance"] = time.perf_counter() - t
        if "update_size" in self.wanted:
            t = time.perf_counter()
            self.update_start = {"step": step, "params": ts.parameter_copy(model)}
            cost["update_size_copy"] = time.perf_counter() - t
        return values

    # ------------------------------------------------------------------------------ output
    def save_plot(self, out_dir: Path) -> Path | None:
        """``<out_dir>/plots/gradient_histograms.png`` when a histogram was measured."""
        if not self.hists_1d and self.hist_2d is None:
            return None
        step2d, h2 = self.hist_2d if self.hist_2d is not None else (None, None)
        return gh.plot_gradient_histograms(self.hist_steps, self.hists_1d, self.hist_range, h2, step2d,
                                           self.hist2d_range, Path(out_dir) / "plots" / "gradient_histograms.png")

    def summary_items(self, prefix: str) -> dict[str, Any]:
        items: dict[str, Any] = {}
        if self.hessian_used:
            items[f"{prefix}tic_hessian_diagonal"] = self.hessian_used
        if self.init_step is not None:
            items[f"{prefix}distance_from_step"] = self.init_step
        return items

    def state_dict(self) -> dict[str, Any]:
        return {"init": self.init, "init_step": self.init_step, "update_start": self.update_start,
                "hist_steps": list(self.hist_steps), "hists_1d": [h.clone() for h in self.hists_1d],
                "hist_2d": self.hist_2d, "hessian_used": self.hessian_used}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.init, self.init_step = state.get("init"), state.get("init_step")
        self.update_start = state.get("update_start")
        self.hist_steps = list(state.get("hist_steps", []))
        self.hists_1d = list(state.get("hists_1d", []))
        self.hist_2d, self.hessian_used = state.get("hist_2d"), state.get("hessian_used")


def _prefixed(name: str, per_layer: dict[str, float]) -> dict[str, float]:
    """``{name: total, name/<param>: value}``."""
    return {name: per_layer["total"], **{f"{name}/{k}": v for k, v in per_layer.items() if k != "total"}}
