"""``callbacks=landscape``: Santurkar et al. 2018, Sec. 3.1, loss variation, gradient predictiveness and
effective beta-smoothness along the gradient (math: :func:`shiftlab.callbacks.covariate_shift.landscape_smoothness`).

Runs every ``every_n_steps`` optimizer steps (0: off, at no cost) at the start of a training batch,
i.e. on the weights ``w_t`` *before* step ``t``, on the batch step ``t`` trains on. Values go to every logger at
``trainer.global_step``, the whole history to ``<run>/probes/landscape.json``, a plot to
``<run>/plots/landscape.png`` and the last values to summary.json (:class:`~shiftlab.callbacks.probe.Probe`).
DDP: every rank computes the probe (the in-layer BN sync needs every rank in each forward), on its local batch; rank 0
logs and writes. The probe never changes the training trajectory: the measure works on deep copies and
restores the RNG state (tested: bit-identical CPU loss trajectories).
Mini-batch regime only: it needs the step's batch.
"""
from __future__ import annotations

from typing import Any, Sequence

from shiftlab.callbacks.covariate_shift import landscape_smoothness
from shiftlab.callbacks.probe import Probe
from shiftlab.callbacks.probe_utils import check_positive_int, loss_of, probe_model


class LandscapeSmoothnessMonitor(Probe):
    """Santurkar et al. 2018, Sec. 3.1: loss variation, gradient predictiveness, effective beta.

    Args:
        every_n_steps: probe period in optimizer steps (0: off). Cost per probe: ``num_etas + 1``
            forward + backward passes on a deep copy.
        eta_range: ``[lo, hi]`` step sizes, multiples of the current learning rate when
            ``relative_to_lr`` (paper: [0.5, 4] x lr), else absolute.
        num_etas: step sizes spaced evenly in the range.
    """

    name = "landscape"

    def __init__(self, every_n_steps: int = 200, eta_range: Sequence[float] = (0.5, 4.0), num_etas: int = 4,
                 relative_to_lr: bool = True, log_prefix: str | None = None, plot: bool = True) -> None:
        super().__init__(every_n_steps=every_n_steps, log_prefix=log_prefix, plot=plot)
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

    def measure(self, trainer: Any, pl_module: Any, batch: Any = None) -> dict[str, float]:
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else 1.0
        res = landscape_smoothness(probe_model(pl_module), loss_of(pl_module), batch[0], batch[1], self.etas(lr))
        return {k: v for k, v in res.items() if not isinstance(v, list)}

    def make_plot(self) -> Any:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        for ax, key in ((axes[0], "loss"), (axes[1], "grad_diff")):
            steps, lo = self.series(f"{key}_min")
            _, hi = self.series(f"{key}_max")
            ax.fill_between(steps, lo, hi, alpha=0.4)
            ax.plot(steps, lo, color="C0", lw=0.8, label="min")  # the edges: one probe is a visible point
            ax.plot(steps, hi, color="C0", lw=0.8, ls="--", label="max")
        axes[0].set_title("loss variation")
        axes[1].set_title("gradient predictiveness")
        axes[2].plot(*self.series("beta_smoothness"))
        axes[2].set_title("effective beta-smoothness")
        for ax in axes:
            ax.set_xlabel("step")
        return fig
