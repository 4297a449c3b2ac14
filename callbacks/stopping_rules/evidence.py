"""The evidence-based stopping criterion (Mahsereci, Balles, Lassner & Hennig 2017) as a stopping rule.

Why: it needs no validation set. At a point where the mini-batch gradient is indistinguishable
from its own sampling noise (``EB = 1 - (B/D) sum_j g_j^2 / s_j^2 > 0``), further steps fit noise.

Where the per-step statistics come from: the rule does not compute anything itself. Each
:meth:`update` receives one EB value, computed by :func:`shiftlab.callbacks.gradient_stats.eb_criterion`
from the per-example gradients of one training mini-batch (``g_j`` its mean gradient, ``s_j^2``
the per-parameter sample variance over its examples, ``B`` its size, ``D`` the parameter count).
:class:`shiftlab.callbacks.gradient_tests.GradientTests` with ``stop_rule: evidence`` computes it
at every probe (every ``every_n_steps`` training steps, on the batch about to be stepped on) and
feeds it here; one rule "epoch" is one probe. Replaying a recorded EB series through
``update`` gives the same decision.

The single-batch value is noisy (its sign flips from batch to batch near the boundary), so the
rule stops on an exponential moving average (bias-corrected, ``smoothing`` = the weight of the
past) being above ``threshold`` for ``patience`` consecutive probes.
"""
from __future__ import annotations

import math

from shiftlab.callbacks.stopping_rules.base import StoppingRule
from shiftlab.callbacks.stopping_rules.registry import register_rule

__all__ = ["EvidenceRule"]


@register_rule("evidence")
class EvidenceRule(StoppingRule):
    """Stop when the smoothed EB criterion stays above ``threshold`` for ``patience`` updates.

    Args:
        threshold: the paper stops at ``EB > 0``.
        smoothing: EMA weight of the past in ``[0, 1)`` (``0``: the raw per-batch value).
        patience: consecutive updates above the threshold needed.
        warmup: updates before any decision (the EMA is still updated meanwhile).
    """

    name = "evidence"

    def __init__(self, threshold: float = 0.0, smoothing: float = 0.9, patience: int = 3,
                 mode: str = "min", warmup: int = 0) -> None:
        if not 0.0 <= float(smoothing) < 1.0:
            raise ValueError(f"smoothing={smoothing} is out of range; allowed: 0 <= smoothing < 1")
        if int(patience) < 1:
            raise ValueError(f"patience={patience} is out of range; allowed: patience >= 1")
        self.threshold, self.smoothing, self.patience = float(threshold), float(smoothing), int(patience)
        super().__init__(mode=mode, warmup=warmup)

    def reset(self) -> None:
        super().reset()
        self.ema_raw = 0.0
        self.ema = math.nan
        self.above = 0

    def _observe(self) -> None:
        b = self.smoothing
        self.ema_raw = b * self.ema_raw + (1 - b) * self.values[-1]
        self.ema = self.ema_raw / (1 - b ** (self.epoch + 1))  # bias-corrected
        self.above = self.above + 1 if self.ema > self.threshold else 0

    def _decide(self) -> str | None:
        self._observe()
        if self.above >= self.patience:
            return (f"evidence-based criterion (EMA {self.ema:.3g}) > {self.threshold:g} for "
                    f"{self.above} probes")
        return None

    def diagnostics(self) -> dict[str, float]:
        return {"eb_smoothed": self.ema, "above": float(self.above)}
