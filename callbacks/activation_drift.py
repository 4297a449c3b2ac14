"""``callbacks=activation_drift``: Ioffe & Szegedy 2015, Fig. 1, the distribution of every norm layer's
input and output on a fixed probe batch (math: :func:`shiftlab.callbacks.covariate_shift.activation_drift`).

Runs every ``every_n_steps`` optimizer steps (0: off, at no cost) at the start of a training batch,
i.e. on the weights ``w_t`` *before* step ``t``, on a fixed probe batch. Values go to every logger at
``trainer.global_step``, the whole history to ``<run>/probes/activation_drift.json``, a plot to
``<run>/plots/activation_drift.png`` and the last values to summary.json (:class:`~shiftlab.callbacks.probe.Probe`).
DDP: every rank computes the probe (the in-layer BN sync needs every rank in each forward); rank 0
logs and writes. The probe never changes the training trajectory: the measure works on deep copies and
restores the RNG state (tested: bit-identical CPU loss trajectories).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from shiftlab.callbacks.covariate_shift import activation_drift
from shiftlab.callbacks.probe import Probe
from shiftlab.callbacks.probe_utils import check_positive_int, fixed_subset, probe_model


class ActivationDriftMonitor(Probe):
    """Ioffe & Szegedy 2015, Fig. 1: percentiles / mean / std of every norm layer's input and output.

    Args:
        every_n_steps: probe period in optimizer steps (0: off).
        split: ``"train"`` or ``"val"``: where the fixed probe batch comes from.
        probe_size: samples in the probe batch (the same ones every time and on every rank).
        unit: follow one channel / hidden unit (Ioffe & Szegedy follow one sigmoid), None pools all.
        layers: norm-layer names to probe (None: all, including ``nn.Identity`` slots of ``norm=none``).
        train_mode: measure in training mode (batch statistics, on a copy) instead of eval mode.
    """

    name = "activation_drift"

    def __init__(self, every_n_steps: int = 100, split: str = "val", probe_size: int = 256, unit: int | None = None,
                 layers: Sequence[str] | None = None, train_mode: bool = False, seed: int = 0,
                 log_prefix: str | None = None, plot: bool = True) -> None:
        super().__init__(every_n_steps=every_n_steps, log_prefix=log_prefix, plot=plot)
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

    def measure(self, trainer: Any, pl_module: Any, batch: Any = None) -> dict[str, float]:
        return activation_drift(probe_model(pl_module), self._probe_batch(trainer, pl_module), layers=self.layers,
                                unit=self.unit, train_mode=self.train_mode)

    def make_plot(self) -> Any:
        import matplotlib.pyplot as plt

        layers = sorted({k.rsplit("/", 2)[0] for h in self.history for k in h if k.endswith("/in/p50")})
        if not layers:
            return None
        fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            for p, style in (("p15", "--"), ("p50", "-"), ("p85", "--")):
                steps, vals = self.series(f"{layer}/in/{p}")
                ax.plot(steps, vals, style, color="C0", label=f"input {p}")
            ax.set_title(layer, fontsize=8)
            ax.set_xlabel("step")
        axes[0][0].legend(fontsize=7)
        return fig
