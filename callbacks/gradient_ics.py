"""``callbacks=gradient_ics``: Santurkar et al. 2018, Def. 2.1, gradient change of each layer caused by the
update of the layers before it (math: :func:`shiftlab.callbacks.covariate_shift.gradient_ics`).

Runs every ``every_n_steps`` optimizer steps (0: off, at no cost) at the start of a training batch,
i.e. on the weights ``w_t`` *before* step ``t``, on the batch step ``t`` trains on. Values go to every logger at
``trainer.global_step``, the whole history to ``<run>/probes/gradient_ics.json``, a plot to
``<run>/plots/gradient_ics.png`` and the last values to summary.json (:class:`~shiftlab.callbacks.probe.Probe`).
DDP: every rank computes the probe (the in-layer BN sync needs every rank in each forward), on its local batch; rank 0
logs and writes. The probe never changes the training trajectory: the measure works on deep copies and
restores the RNG state (tested: bit-identical CPU loss trajectories).
Mini-batch regime only: it needs the step's batch.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from shiftlab.callbacks.covariate_shift import gradient_ics
from shiftlab.callbacks.probe import Probe
from shiftlab.callbacks.probe_utils import loss_of, probe_model


class GradientICSMonitor(Probe):
    """Santurkar et al. 2018, Def. 2.1: ``||G - G'||_2`` and ``cos(G, G')`` per weight layer.

    Args:
        every_n_steps: probe period in optimizer steps (0: off). Cost per probe: one forward +
            backward per probed layer, plus one, on a deep copy.
        layers: 1-based indices of the Linear/Conv layers in forward order (None: all but the first).
    """

    name = "gradient_ics"

    def __init__(self, every_n_steps: int = 200, layers: Sequence[int] | None = None,
                 log_prefix: str | None = None, plot: bool = True) -> None:
        super().__init__(every_n_steps=every_n_steps, log_prefix=log_prefix, plot=plot)
        self.layers = [int(i) for i in layers] if layers is not None else None

    def measure(self, trainer: Any, pl_module: Any, batch: Any = None) -> dict[str, float] | None:
        if not trainer.optimizers or isinstance(trainer.optimizers[0], torch.optim.LBFGS):
            return None  # the measure replays one optimizer step; L-BFGS steps need a closure
        res = gradient_ics(probe_model(pl_module), loss_of(pl_module), batch[0], batch[1], trainer.optimizers[0],
                           layers=self.layers)
        return {f"{name}/{k}": v for name, d in res.items() for k, v in d.items() if k != "index"}

    def make_plot(self) -> Any:
        import matplotlib.pyplot as plt

        layers = sorted({k[: -len("/l2")] for h in self.history for k in h if k.endswith("/l2")})
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
        for i, layer in enumerate(layers):
            a.plot(*self.series(f"{layer}/l2"), color=f"C{i % 10}", label=layer)
            b.plot(*self.series(f"{layer}/cos"), color=f"C{i % 10}", label=layer)
        a.set_title("||G - G'||_2")
        b.set_title("cos(G, G')")
        for ax in (a, b):
            ax.set_xlabel("step")
        a.legend(fontsize=6)
        return fig
