"""The one scaffold every measurement probe stands on: schedule, cost, history, output, resume.

Why one base: a probe is "run this plain function on the model now and then"; what differs between
probes is the function (``covariate_shift.py``, ``gradient_noise.NoiseScale``, ``memorization``,
``hessian``), not when it runs, how its cost is counted, where its values go or how it resumes. A
subclass sets ``name`` and implements :meth:`Probe.measure`; this class does the rest:

* **schedule**: ``every_n_steps`` (at the start of a training batch, on the weights *before* that
  optimizer step, once per step; 0 switches it off at no cost) or ``every_n_epochs`` (at the end of
  a training epoch, plus the last epoch and any epoch after which training stops, so the end of
  training is always measured);
* **cost**: every probe is timed; the running total is logged as ``probe_cost/<name>_s`` and put in
  ``summary.json``. With ``max_overhead`` a scheduled epoch probe is skipped while probing (this
  probe and the final one, each at the last probe's cost) would exceed that fraction of training
  time so far (the first and the final probe always run; the decision is rank 0's, broadcast);
  skipped probes are counted in ``probe_cost/<name>_skipped``;
* **values**: epoch probes log with ``pl_module.log`` (epoch-level metrics, seen by other
  callbacks); step probes go straight to every logger at ``trainer.global_step`` (Lightning's
  ``log_every_n_steps`` would drop most of them). The last values join ``summary.json``
  (:meth:`summary_items`, through :class:`Reporter`); the whole history goes to
  ``<run>/probes/<name>.json`` at the end of training (rank 0, when the trainer has a logger), with a
  plot when :meth:`make_plot` draws one;
* **resume**: :meth:`state_dict` holds the history, the cost and the skip count (subclasses add
  their own via :meth:`extra_state`), so a resumed run continues the same series.
"""
from __future__ import annotations

import abc

import json
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from shiftlab.callbacks.probe_utils import check_positive_int, is_probe_epoch, rank0_value
from shiftlab.callbacks.reporting import Reporter

__all__ = ["Probe"]


class Probe(L.Callback, Reporter, metaclass=abc.ABCMeta):
    """Base class of the measurement probes (see the module docstring).

    Args:
        every_n_steps: probe period in optimizer steps (0: no step schedule).
        every_n_epochs: probe period in epochs (0: no epoch schedule).
        log_prefix: prefix of the logged keys (default: the probe's ``name``), without a slash.
        max_overhead: cost budget of epoch probes as a fraction of training time (None: none).
        plot: draw ``<run>/plots/<name>.png`` at the end of training (when the probe has a plot).
    """

    name: ClassVar[str] = "probe"

    def __init__(self, every_n_steps: int = 0, every_n_epochs: int = 0, log_prefix: str | None = None,
                 max_overhead: float | None = None, plot: bool = True) -> None:
        super().__init__()
        self.every_n_steps = check_positive_int(f"callbacks.{self.name}.every_n_steps", every_n_steps,
                                                allow_zero=True)
        self.every_n_epochs = check_positive_int(f"callbacks.{self.name}.every_n_epochs", every_n_epochs,
                                                 allow_zero=True)
        if max_overhead is not None and not max_overhead > 0:
            raise ValueError(f"callbacks.{self.name}.max_overhead must be null or > 0, got {max_overhead!r}")
        self.max_overhead = max_overhead
        self.log_prefix = (log_prefix if log_prefix is not None else self.name).rstrip("/")
        self.plot = plot
        self.history: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.skipped = 0
        self._elapsed = 0.0  # wall time of fit before this process (resume), probes included
        self._fit_start: float | None = None
        self._last_cost: float | None = None

    # --- what a subclass provides ------------------------------------------------------------------
    @abc.abstractmethod
    def measure(self, trainer: Any, pl_module: Any, batch: Any = None) -> dict[str, Any] | None:
        """The probe's values now (``batch``: the step's batch for step probes); None: nothing measured."""
        ...

    def make_plot(self) -> Any:
        """A matplotlib figure of the history, or None (optional; the base saves and closes it)."""
        return None

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # --- schedule ----------------------------------------------------------------------------------
    def due(self, trainer: Any) -> bool:
        """Step schedule: every ``every_n_steps`` optimizer steps, once per step."""
        if self.every_n_steps == 0:
            return False
        step = trainer.global_step
        if step % self.every_n_steps:
            return False
        return not self.history or self.history[-1]["step"] != step

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._fit_start = time.perf_counter() - self._elapsed

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.due(trainer):
            if self._over_budget(trainer):
                self.skipped += 1
                return
            self._run(trainer, pl_module, batch, epoch_end=False)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.every_n_epochs or not is_probe_epoch(trainer, self.every_n_epochs):
            return
        max_epochs = getattr(trainer, "max_epochs", None)
        final = (max_epochs is not None and trainer.current_epoch + 1 >= max_epochs) or trainer.should_stop
        if not final and self._over_budget(trainer):
            self.skipped += 1
            return
        self._run(trainer, pl_module, None, epoch_end=True)

    @property
    def cost_s(self) -> float:
        """Seconds this probe has spent (read by the run's :class:`~shiftlab.callbacks.probe_budget.ProbeBudget`)."""
        return self.seconds

    def _over_budget(self, trainer: Any) -> bool:
        from shiftlab.callbacks.probe_budget import budget_of

        if self._last_cost is None:  # the first measurement always runs
            return False
        budget = budget_of(trainer)
        decide, over = False, False
        if budget is not None and budget.max_overhead is not None:  # the run's budget, all probes together
            decide, over = True, not budget.allows(2 * self._last_cost)
        if self.max_overhead is not None and self._fit_start is not None:  # this probe's own budget
            train_seconds = max(time.perf_counter() - self._fit_start - self.seconds, 0.0)
            decide = True
            over = over or self.seconds + 2 * self._last_cost > self.max_overhead * train_seconds
        # rank 0 decides (the same configuration on every rank, so every rank takes this branch together)
        return bool(rank0_value(trainer, over)) if decide else False

    # --- one probe ---------------------------------------------------------------------------------
    def _run(self, trainer: Any, pl_module: Any, batch: Any, epoch_end: bool) -> None:
        t0 = time.perf_counter()
        values = self.measure(trainer, pl_module, batch)
        self._last_cost = time.perf_counter() - t0
        self.seconds += self._last_cost
        if values is None:
            return
        step = getattr(trainer, "global_step", 0)
        self.history.append({"step": int(step), "epoch": int(trainer.current_epoch), **values})
        scalars = {f"{self.log_prefix}/{k}": float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        scalars[f"probe_cost/{self.name}_s"] = self.seconds
        if epoch_end:
            for key, value in scalars.items():
                pl_module.log(key, value, on_step=False, on_epoch=True)
        else:
            for logger in getattr(trainer, "loggers", ()):
                logger.log_metrics(scalars, step=step)
        self.after_record(trainer, values)

    def after_record(self, trainer: Any, values: dict[str, Any]) -> None:
        """Hook after a probe was recorded (e.g. a stopping decision)."""

    # --- output ------------------------------------------------------------------------------------
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero or not self.history or not trainer.loggers:
            return  # a Trainer without loggers (logger=False) writes no files
        out = Path(getattr(trainer, "default_root_dir", None) or os.getcwd())
        from shiftlab.trainers.checkpoint_io import atomic_write_text
        from shiftlab.trainers.plots import finish_panels, save_png

        atomic_write_text(out / "probes" / f"{self.name}.json",
                          json.dumps({"seconds": self.seconds, "skipped": self.skipped, "history": self.history},
                                     indent=1))
        if self.plot and type(self).make_plot is not Probe.make_plot:
            try:
                import matplotlib

                matplotlib.use("Agg")

                fig = self.make_plot()
                if fig is not None:
                    finish_panels(fig)
                    fig.tight_layout()
                    save_png(fig, out / "plots" / f"{self.name}.png")
            except Exception as e:  # a plot must never fail a run
                rank_zero_warn(f"{self.name}: plot failed: {e}")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` over the history."""
        pts = [(h["step"], h[key]) for h in self.history if key in h]
        return [p[0] for p in pts], [p[1] for p in pts]

    def summary_items(self) -> dict[str, Any]:
        items: dict[str, Any] = {}
        if self.history:
            items = {f"{self.log_prefix}/{k}": v for k, v in self.history[-1].items()
                     if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.history or self.skipped:
            items[f"probe_cost/{self.name}_s"] = round(self.seconds, 3)
        if self.max_overhead is not None or self.skipped:
            items[f"probe_cost/{self.name}_skipped"] = self.skipped
        return items

    # --- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self._fit_start if self._fit_start is not None else self._elapsed
        return {"history": [dict(h) for h in self.history], "seconds": self.seconds, "skipped": self.skipped,
                "elapsed": elapsed, "last_cost": self._last_cost, **self.extra_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.seconds = float(state_dict.get("seconds", 0.0))
        self.skipped = int(state_dict.get("skipped", 0))
        self._elapsed = float(state_dict.get("elapsed", 0.0))
        self._last_cost = state_dict.get("last_cost")
        self.load_extra_state(state_dict)

