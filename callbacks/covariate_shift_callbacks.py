"""Lightning callbacks that run the covariate-shift measures of ``callbacks/covariate_shift.py``.

Each probe runs every ``every_n_steps`` optimizer steps (0 switches it off: the hook returns at
once, so a disabled probe costs nothing), at the start of a training batch, i.e. on the weights
``w_t`` *before* step ``t``, on the very batch step ``t`` trains on (activation drift uses a
fixed probe batch instead). Values go to every logger (``trainer.loggers``, step =
``trainer.global_step``), to ``<output_dir>/probes/<probe>.json`` (the whole history) and to
``<output_dir>/plots/<probe>.png`` at the end of training; the last values join summary.json.

DDP: every rank computes the probe (the in-layer BN sync needs every rank in each forward), on
its local batch; rank 0 logs and writes. The probes never change the training trajectory: they
work on deep copies and restore the RNG state (tested: bit-identical CPU loss trajectories).
Mini-batch regime only: the ICS and landscape probes need the step's batch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from shiftlab.callbacks.reporting import Reporter
from shiftlab.callbacks.covariate_shift import activation_drift, gradient_ics, landscape_smoothness
from shiftlab.callbacks.probe_utils import check_positive_int, fixed_subset, probe_model


def _default_loss(pl_module) -> Callable:
    return getattr(pl_module, "loss_fn", None) or F.cross_entropy


class _StepProbe(L.Callback, Reporter):
    """Shared scheduling, logging, history, plotting and (de)serialization."""

    probe_name = "probe"

    def __init__(self, every_n_steps: int, log_prefix: str | None = None, plot: bool = True) -> None:
        self.every_n_steps = check_positive_int(f"callbacks.{self.probe_name}.every_n_steps", every_n_steps,
                                                allow_zero=True)
        self.log_prefix = log_prefix if log_prefix is not None else f"{self.probe_name}/"
        self.plot = plot
        self.history: list[dict[str, Any]] = []
        self.seconds = 0.0

    # --- scheduling -----------------------------------------------------------------------------
    def due(self, trainer) -> bool:
        if self.every_n_steps == 0:
            return False
        step = trainer.global_step
        if step % self.every_n_steps:
            return False
        return not self.history or self.history[-1]["step"] != step

    def record(self, trainer, values: dict[str, float]) -> None:
        step = int(trainer.global_step)
        self.history.append({"step": step, "epoch": int(trainer.current_epoch), **values})
        scalars = {f"{self.log_prefix}{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)

    # --- output ---------------------------------------------------------------------------------
    @staticmethod
    def _out_dir(trainer) -> Path:
        return Path(getattr(trainer, "default_root_dir", None) or os.getcwd())

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        out = self._out_dir(trainer)
        (out / "probes").mkdir(parents=True, exist_ok=True)
        (out / "probes" / f"{self.probe_name}.json").write_text(
            json.dumps({"seconds": self.seconds, "history": self.history}, indent=1))
        if self.plot:
            try:
                (out / "plots").mkdir(parents=True, exist_ok=True)
                self.make_plot(out / "plots" / f"{self.probe_name}.png")
            except Exception as e:  # a plot must never fail a run
                rank_zero_warn(f"{self.probe_name}: plot failed: {e}")

    def make_plot(self, path: Path) -> None:  # overridden
        pass

    def summary_items(self) -> dict[str, Any]:
        if not self.history:
            return {}
        last = {k: v for k, v in self.history[-1].items() if isinstance(v, (int, float))}
        return {f"{self.log_prefix}{k}": v for k, v in last.items() if k not in ("epoch",)} | {
            f"{self.log_prefix}seconds": round(self.seconds, 3)}

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.seconds = float(state_dict.get("seconds", 0.0))

    def _timed(self, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
        import time

        t0 = time.perf_counter()
        vals = fn()
        self.seconds += time.perf_counter() - t0
        return vals

    def _series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(h["step"], h[key]) for h in self.history if key in h]
        return [p[0] for p in pts], [p[1] for p in pts]


class ActivationDriftMonitor(_StepProbe):
    """Ioffe & Szegedy 2015, Fig. 1: percentiles / mean / std of every norm layer's input and output.

    Args:
        every_n_steps: probe period in optimizer steps (0: off).
        split: ``"train"`` or ``"val"``: where the fixed probe batch comes from.
        probe_size: samples in the probe batch (the same ones every time and on every rank).
        unit: follow one channel / hidden unit (Ioffe & Szegedy follow one sigmoid), None pools all.
        layers: norm-layer names to probe (None: all, including ``nn.Identity`` slots of ``norm=none``).
        train_mode: measure in training mode (batch statistics, on a copy) instead of eval mode.
    """

    probe_name = "activation_drift"

    def __init__(self, every_n_steps: int = 100, split: str = "val", probe_size: int = 256, unit: int | None = None,
                 layers: Sequence[str] | None = None, train_mode: bool = False, seed: int = 0,
                 log_prefix: str | None = None, plot: bool = True) -> None:
        super().__init__(every_n_steps, log_prefix, plot)
        if split not in ("train", "val"):
            raise ValueError(f"callbacks.activation_drift.split={split!r} is invalid; allowed: train, val")
        self.split, self.unit, self.train_mode, self.seed = split, unit, train_mode, seed
        self.probe_size = check_positive_int("callbacks.activation_drift.probe_size", probe_size)
        self.layers = list(layers) if layers is not None else None
        self._x: torch.Tensor | None = None

    def _probe_batch(self, trainer, pl_module) -> torch.Tensor:
        if self._x is None:
            dm = trainer.datamodule
            data = getattr(dm, f"{self.split}_set", None)
            if data is None or len(data.x) == 0:
                data = dm.train_set
            idx = fixed_subset(len(data.x), self.probe_size, self.seed)
            self._x = data.x[idx].to(pl_module.device)
        return self._x

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.due(trainer):
            return
        x = self._probe_batch(trainer, pl_module)
        self.record(trainer, self._timed(lambda: activation_drift(
            probe_model(pl_module), x, layers=self.layers, unit=self.unit, train_mode=self.train_mode)))

    def make_plot(self, path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = sorted({k.rsplit("/", 2)[0] for h in self.history for k in h if k.endswith("/in/p50")})
        if not layers:
            return
        fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            for p, style in (("p15", "--"), ("p50", "-"), ("p85", "--")):
                steps, vals = self._series(f"{layer}/in/{p}")
                ax.plot(steps, vals, style, color="C0", label=f"input {p}")
            ax.set_title(layer, fontsize=8)
            ax.set_xlabel("step")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


class GradientICSMonitor(_StepProbe):
    """Santurkar et al. 2018, Def. 2.1: ``||G - G'||_2`` and ``cos(G, G')`` per weight layer.

    Args:
        every_n_steps: probe period in optimizer steps (0: off). Cost per probe: one forward +
            backward per probed layer, plus one, on a deep copy.
        layers: 1-based indices of the Linear/Conv layers in forward order (None: all but the first).
    """

    probe_name = "gradient_ics"

    def __init__(self, every_n_steps: int = 200, layers: Sequence[int] | None = None,
                 log_prefix: str | None = None, plot: bool = True) -> None:
        super().__init__(every_n_steps, log_prefix, plot)
        self.layers = [int(i) for i in layers] if layers is not None else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.due(trainer) or not trainer.optimizers:
            return
        opt = trainer.optimizers[0]
        if isinstance(opt, torch.optim.LBFGS):
            return
        x, y = batch[0], batch[1]
        res = self._timed(lambda: gradient_ics(probe_model(pl_module), _default_loss(pl_module), x, y, opt,
                                               layers=self.layers))
        flat = {f"{name}/{k}": v for name, d in res.items() for k, v in d.items() if k != "index"}
        self.record(trainer, flat)

    def make_plot(self, path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = sorted({k[: -len("/l2")] for h in self.history for k in h if k.endswith("/l2")})
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
        for i, layer in enumerate(layers):
            a.plot(*self._series(f"{layer}/l2"), color=f"C{i % 10}", label=layer)
            b.plot(*self._series(f"{layer}/cos"), color=f"C{i % 10}", label=layer)
        a.set_title("||G - G'||_2")
        b.set_title("cos(G, G')")
        for ax in (a, b):
            ax.set_xlabel("step")
        a.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


class LandscapeSmoothnessMonitor(_StepProbe):
    """Santurkar et al. 2018, Sec. 3.1: loss variation, gradient predictiveness, effective beta.

    Args:
        every_n_steps: probe period in optimizer steps (0: off). Cost per probe: ``num_etas + 1``
            forward + backward passes on a deep copy.
        eta_range: ``[lo, hi]`` step sizes, multiples of the current learning rate when
            ``relative_to_lr`` (paper: [0.5, 4] x lr), else absolute.
        num_etas: step sizes spaced evenly in the range.
    """

    probe_name = "landscape"

    def __init__(self, every_n_steps: int = 200, eta_range: Sequence[float] = (0.5, 4.0), num_etas: int = 4,
                 relative_to_lr: bool = True, log_prefix: str | None = None, plot: bool = True) -> None:
        super().__init__(every_n_steps, log_prefix, plot)
        lo, hi = (float(v) for v in eta_range)
        if not 0 < lo <= hi:
            raise ValueError(f"callbacks.landscape.eta_range={list(eta_range)} must satisfy 0 < lo <= hi")
        self.eta_range = (lo, hi)
        self.num_etas = check_positive_int("callbacks.landscape.num_etas", num_etas)
        self.relative_to_lr = relative_to_lr

    def etas(self, lr: float) -> list[float]:
        lo, hi = self.eta_range
        n = self.num_etas
        base = [lo + (hi - lo) * i / (n - 1) for i in range(n)] if n > 1 else [lo]
        return [e * lr for e in base] if self.relative_to_lr else base

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.due(trainer):
            return
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else 1.0
        x, y = batch[0], batch[1]
        res = self._timed(lambda: landscape_smoothness(probe_model(pl_module), _default_loss(pl_module), x, y,
                                                       self.etas(lr)))
        self.record(trainer, {k: v for k, v in res.items() if not isinstance(v, list)})

    def make_plot(self, path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        steps, lo = self._series("loss_min")
        _, hi = self._series("loss_max")
        axes[0].fill_between(steps, lo, hi, alpha=0.4)
        axes[0].set_title("loss variation")
        s2, dlo = self._series("grad_diff_min")
        _, dhi = self._series("grad_diff_max")
        axes[1].fill_between(s2, dlo, dhi, alpha=0.4)
        axes[1].set_title("gradient predictiveness")
        axes[2].plot(*self._series("beta_smoothness"))
        axes[2].set_title("effective beta-smoothness")
        for ax in axes:
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
