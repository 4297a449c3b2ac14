"""Gradient tests every few training steps (``callbacks=gradient_tests``), within a cost budget.

Why a callback of its own: these statistics describe the very mini-batch gradient a training step
is about to use (the norm / inner-product / orthogonality tests of adaptive-batch methods, the
gradient SNR, the evidence-based stopping criterion, B_simple, Cockpit's alpha), so they are
measured in ``on_train_batch_start`` on that batch, at the parameters the step starts from. The
math is in :mod:`shiftlab.callbacks.gradient_stats`: one pass gives the moments of the per-example
gradients (from layer factors when every parameter belongs to a Linear / Conv / eval-mode BatchNorm layer,
else ``torch.func``; ``layer_path`` logs 1 or 0), every statistic is a reduction of them.

Cost budget (``max_overhead``): the wall time of the probes and of the training steps (from the
end of a ``on_train_batch_start`` to ``on_train_batch_end``) are both measured; a due probe is
skipped while ``probe seconds > max_overhead * training-step seconds``, so on average the probes
cost at most that fraction of training. Each quantity's own seconds are logged under
``<prefix>cost/<name>`` (``per_example_gradients`` is shared by all), the running ratio under
``<prefix>overhead``.

The model is probed in eval mode (BatchNorm with running statistics, no dropout): per-example
gradients are not defined for a BatchNorm layer in train mode, whose output couples the examples.

Further quantities (opt-in through ``quantities``, :mod:`shiftlab.callbacks.gradient_extras`):
TIC (``tic_diag``, ``tic_trace`` with ``tic_trace_se``), gradient histograms (``grad_hist_1d``,
``grad_hist_2d``; saved as ``plots/gradient_histograms.png``, which the run logs as an image),
``distance`` from the initial parameters and ``update_size`` of the probed step (per parameter
tensor under ``distance/<name>``, ``update_size/<name>``, and in total).

DDP: every statistic is the one of the union of the ranks' batches (the batch the DDP step uses;
each rank probes its first ``max_examples``), reduced by :mod:`shiftlab.callbacks.rank_union`, so
every rank logs, stores and decides on the same values.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from shiftlab.callbacks import gradient_stats as gs
from shiftlab.callbacks.gradient_extras import EXTRA_QUANTITIES, GradientExtras
from shiftlab.callbacks.rank_union import all_cat, is_distributed, union_moments
from shiftlab.callbacks.stopping_rules import EvidenceRule
from shiftlab.callbacks.probe_utils import eval_mode, probe_model
from shiftlab.callbacks.reporting import Reporter

__all__ = ["GradientTests", "QUANTITIES", "DEFAULT_QUANTITIES"]

DEFAULT_QUANTITIES = (*gs.STATISTICS, "alpha")
QUANTITIES = (*DEFAULT_QUANTITIES, *EXTRA_QUANTITIES)
# the quantities that read the per-example gradients G themselves (the others, TIC included, need only their moments)
NEEDS_GRADIENTS = ("grad_hist_1d", "grad_hist_2d")
NEEDS_MOMENTS = (*gs.STATISTICS, "tic_diag", "tic_trace", *NEEDS_GRADIENTS)  # a per-example pass


class GradientTests(L.Callback, Reporter):
    """Log the gradient tests of the training batch every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: probe period in optimizer steps (0: off).
        quantities: any of ``b_simple``, ``norm_test``, ``inner_product_test``,
            ``orthogonality_test``, ``gsnr``, ``eb_criterion``, ``alpha`` (the default set; alpha
            also needs the next step's batch: its end point is measured at the following step),
            and ``tic_diag``, ``tic_trace``, ``grad_hist_1d``, ``grad_hist_2d``, ``distance``,
            ``update_size`` (measured at the following step, like alpha).
        max_overhead: probe seconds allowed per training-step second (``None``: no limit).
        stop_rule: ``evidence`` to stop training with :class:`EvidenceRule` on ``eb_criterion``
            (then always computed); ``None``: measure only.
        stop_rule_kwargs: arguments of the rule (``threshold``, ``smoothing``, ``patience``,
            ``warmup``).
        chunk_size: ``vmap`` chunk for the per-example gradients (``None``: whole batch at once).
        max_examples: probe at most the first this many examples of the batch (the full-batch
            regime would otherwise form ``N x P`` per-example gradients for the whole data set);
            the statistics then describe a batch of that size. ``None``: the whole batch.
        plot: save ``plots/gradient_histograms.png`` at the end of training (rank 0, with loggers).
        hessian_diagonal, hessian_samples, max_exact_params, hist_bins, hist_range, hist2d_bins,
            hist2d_range, seed: settings of the further quantities, see
            :class:`~shiftlab.callbacks.gradient_extras.GradientExtras`.
    """

    def __init__(self, every_n_steps: int = 10, quantities: Sequence[str] = DEFAULT_QUANTITIES,
                 max_overhead: float | None = 1.0, stop_rule: str | None = None,
                 stop_rule_kwargs: dict[str, Any] | None = None, chunk_size: int | None = None,
                 max_examples: int | None = 512, log_prefix: str = "grad_tests/", plot: bool = True,
                 hessian_diagonal: str = "auto", hessian_samples: int = 20, max_exact_params: int = 1024,
                 hist_bins: int = 100, hist_range: Sequence[float] = (-2.0, 2.0),
                 hist2d_bins: Sequence[int] = (40, 50),
                 hist2d_range: Sequence[Sequence[float]] = ((-1.0, 1.0), (-2.0, 2.0)),
                 seed: int = 0) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 0:
            raise ValueError(f"callbacks.gradient_tests.every_n_steps={every_n_steps} is not allowed; "
                             "allowed: an integer >= 0 (0: off)")
        self.every_n_steps = every_n_steps
        bad = [q for q in quantities if q not in QUANTITIES]
        if bad or not quantities:
            raise ValueError(f"callbacks.gradient_tests.quantities={bad or list(quantities)} is not "
                             f"allowed; allowed: {', '.join(QUANTITIES)}")
        if max_overhead is not None and not float(max_overhead) > 0:
            raise ValueError(f"callbacks.gradient_tests.max_overhead={max_overhead} is not allowed; "
                             "allowed: a number > 0 or null")
        if stop_rule not in (None, "evidence"):
            raise ValueError(f"callbacks.gradient_tests.stop_rule={stop_rule} is not allowed; "
                             "allowed: evidence, null")
        if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 2):
            raise ValueError(f"callbacks.gradient_tests.max_examples={max_examples} is not allowed; "
                             "allowed: an integer >= 2 or null")
        self.max_examples = max_examples
        self.quantities = list(dict.fromkeys(quantities))
        if stop_rule and "eb_criterion" not in self.quantities:
            self.quantities.append("eb_criterion")
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        self.extras = GradientExtras(self.quantities, hessian_diagonal, hessian_samples, max_exact_params,
                                     hist_bins, hist_range, hist2d_bins, hist2d_range, seed)
        self.plot = bool(plot)
        self._distributed = False
        self.rule = EvidenceRule(**(stop_rule_kwargs or {})) if stop_rule else None
        self.chunk_size, self.log_prefix = chunk_size, log_prefix
        self.history: list[dict[str, float]] = []
        self.costs: dict[str, float] = {}  # total seconds per quantity
        self.probe_seconds = self.train_seconds = 0.0
        self.skipped = 0
        self.stop_reason: str | None = None
        self._t0: float | None = None
        self._alpha_start: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------ measuring
    def measure(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                loss: Any = F.cross_entropy, step: int = 0, distributed: bool = False
                ) -> tuple[dict[str, float], dict[str, float], Any]:
        """(values, seconds per quantity, (losses, G)) of the statistics on one batch (with
        ``distributed``: on the union of the ranks' batches; ``losses``, ``G`` stay this rank's)."""
        cost: dict[str, float] = {}
        if not any(q in NEEDS_MOMENTS for q in self.quantities):  # distance, update size, alpha: no pass
            return self.extras.measure(model, x, y, loss, None, None, step, distributed, cost), cost, (None, None)
        t = time.perf_counter()
        # G itself only where a quantity needs it (histograms) or the ranks merge their examples
        needs_g = distributed or any(q in NEEDS_GRADIENTS for q in self.quantities)
        with eval_mode(model):  # layer factors where every parameter allows, else vmap (batch_moments)
            bm = gs.batch_moments(model, x, y, loss, self.chunk_size, gradients=needs_g)
        cost["per_example_gradients"] = time.perf_counter() - t
        losses, G = bm.losses, bm.gradients
        moments = bm.moments
        if distributed:
            t = time.perf_counter()
            moments = union_moments(G)
            cost["moments"] = time.perf_counter() - t
        values: dict[str, float] = {"layer_path": float(bm.path == "layers")}
        for q in self.quantities:
            if q in gs.STATISTICS:
                t = time.perf_counter()
                values[q] = gs.STATISTICS[q](moments)
                cost[q] = time.perf_counter() - t
        values.update(self.extras.measure(model, x, y, loss, G, moments, step, distributed, cost))
        return values, cost, (losses, G)

    @property
    def cost_s(self) -> float:
        """Seconds spent probing (read by the run's :class:`~shiftlab.callbacks.probe_budget.ProbeBudget`)."""
        return self.probe_seconds

    def _over_budget(self, trainer: L.Trainer | None = None) -> bool:
        from shiftlab.callbacks.probe_budget import budget_of

        budget = budget_of(trainer) if trainer is not None else None
        last = self.history[-1] if self.history else None
        if budget is not None and budget.max_overhead is not None and last is not None:
            cost = sum(v for k, v in last.items() if k.startswith("cost/"))
            if not budget.allows(cost):
                return True
        return (self.max_overhead is not None and self.train_seconds > 0
                and self.probe_seconds > self.max_overhead * self.train_seconds)

    # ------------------------------------------------------------------------------ hooks
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        t_hook = time.perf_counter()
        step = int(trainer.global_step)
        model = probe_model(pl_module)
        loss = getattr(pl_module, "loss_fn", None) or F.cross_entropy
        x, y = batch[0][: self.max_examples], batch[1][: self.max_examples]
        self._distributed = is_distributed(trainer)
        start = self._alpha_start
        if start is not None and step > start["step"]:
            self._alpha_start = None
            if step == start["step"] + 1:  # the end point of the previous probe's step
                t = time.perf_counter()
                a = self._alpha(model, start, x, y, loss, self._distributed)
                self._record(trainer, start["step"], {"alpha": a}, "alpha", time.perf_counter() - t)
        update = self.extras.before_step(model, step)
        if update is not None:
            self._record(trainer, update["step"], update["values"], "update_size", update["seconds"])
        if self.every_n_steps and step % self.every_n_steps == 0 and (
                not self.history or self.history[-1]["step"] != step):
            run = not self._over_budget(trainer)
            if trainer.world_size > 1:  # one decision for every rank
                run = trainer.strategy.broadcast(run, src=0)
            if run:
                self._probe(trainer, model, x, y, loss, step)
            else:
                self.skipped += 1
        self.probe_seconds += time.perf_counter() - t_hook
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._t0 is not None:
            self.train_seconds += time.perf_counter() - self._t0
            self._t0 = None

    def _probe(self, trainer: L.Trainer, model: torch.nn.Module, x: torch.Tensor,
               y: torch.Tensor, loss: Any, step: int) -> None:
        values, cost, _ = self.measure(model, x, y, loss, step, self._distributed)
        if "alpha" in self.quantities:
            self._alpha_start = {"step": step, "at": gs.snapshot(model), "x": x, "y": y}
        for k, v in cost.items():
            self.costs[k] = self.costs.get(k, 0.0) + v
        row = {"step": step, **values, **{f"cost/{k}": v for k, v in cost.items()}}
        self.history.append(row)
        self._log(trainer, step, row)
        if self.rule is not None:
            stop = self.rule.update(values["eb_criterion"])
            if trainer.world_size > 1:
                stop = trainer.strategy.broadcast(stop, src=0)
            if stop and self.stop_reason is None:
                self.stop_reason = f"gradient tests stopped at step {step}: {self.rule.reason}"
                trainer.should_stop = True

    @staticmethod
    def _alpha(model: torch.nn.Module, start: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
               loss: Any, distributed: bool = False) -> float:
        """Alpha of the step just taken: losses and gradients projected on it, at its start (the
        stored batch and point) and at its end (this batch), by forward-mode products; with
        ``distributed``, over the union of the ranks' batches (the step is the same everywhere)."""
        end = gs.snapshot(model)
        d = {n: end["params"][n] - v for n, v in start["at"]["params"].items()}
        t = float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))
        if t == 0.0:
            return -1.0
        unit = {n: v / t for n, v in d.items()}
        with eval_mode(model):
            l0, p0 = gs.per_example_directional(model, start["x"], start["y"], unit, loss, at=start["at"])
            l1, p1 = gs.per_example_directional(model, x, y, unit, loss, at=end)
        if distributed:
            l0, p0, l1, p1 = (all_cat(v) for v in (l0, p0, l1, p1))
        return gs.alpha_from_projections(t, l0, p0, l1, p1)

    def _record(self, trainer: L.Trainer, step: int, values: dict[str, float], name: str,
                seconds: float) -> None:
        """File values measured a step late (alpha, update size) under the probe's step."""
        self.costs[name] = self.costs.get(name, 0.0) + seconds
        late = {**values, f"cost/{name}": seconds}
        for row in reversed(self.history):
            if row["step"] == step:
                row.update(late)
                break
        self._log(trainer, step, late)

    def _log(self, trainer: L.Trainer, step: int, row: dict[str, float]) -> None:
        ratio = self.overhead
        scalars = {f"{self.log_prefix}{k}": float(v) for k, v in row.items() if k != "step"}
        scalars[f"{self.log_prefix}overhead"] = ratio
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)

    @property
    def overhead(self) -> float:
        """Probe seconds per training-step second so far (NaN before any training step)."""
        return self.probe_seconds / self.train_seconds if self.train_seconds > 0 else float("nan")

    # ------------------------------------------------------------------------------ reporting
    def summary_items(self) -> dict[str, Any]:
        if not self.history:
            return {}
        last = {f"{self.log_prefix}{k}": v for k, v in self.history[-1].items()  # totals, not per layer
                if not k.startswith(("cost/", "distance/", "update_size/")) and k != "step"}
        return {**last, **self.extras.summary_items(self.log_prefix),
                f"{self.log_prefix}probes": len(self.history),
                f"{self.log_prefix}skipped": self.skipped,
                f"{self.log_prefix}overhead": round(self.overhead, 4),
                f"{self.log_prefix}seconds": {k: round(v, 4) for k, v in self.costs.items()}}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The histograms' PNG in the run directory (rank 0, a run with loggers writes files)."""
        if not (self.plot and trainer.is_global_zero and trainer.loggers):
            return
        try:
            self.extras.save_plot(Path(getattr(trainer, "default_root_dir", None) or os.getcwd()))
        except Exception as e:  # noqa: BLE001 - a plot must never fail a run
            rank_zero_warn(f"gradient_tests: histogram plot failed: {e}")

    def state_dict(self) -> dict[str, Any]:
        """Everything but a pending alpha start point (a resume loses at most that one alpha);
        the initial and pending update-size parameters are kept, so those resume exactly."""
        return {"history": [dict(r) for r in self.history], "costs": dict(self.costs),
                "probe_seconds": self.probe_seconds, "train_seconds": self.train_seconds,
                "skipped": self.skipped, "stop_reason": self.stop_reason,
                "rule": None if self.rule is None else self.rule.state_dict(),
                "extras": self.extras.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self.costs = dict(state_dict.get("costs", {}))
        self.probe_seconds = float(state_dict.get("probe_seconds", 0.0))
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))
        self.skipped = int(state_dict.get("skipped", 0))
        self.stop_reason = state_dict.get("stop_reason")
        if self.rule is not None and state_dict.get("rule") is not None:
            self.rule.load_state_dict(state_dict["rule"])
        self.extras.load_state_dict(state_dict.get("extras", {}))
