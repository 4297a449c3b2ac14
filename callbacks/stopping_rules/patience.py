"""Patience (Lightning / Keras ``EarlyStopping`` semantics, counted in epochs): the baseline
every other rule is measured against."""
from __future__ import annotations

import math

from shiftlab.callbacks.stopping_rules.base import StoppingRule
from shiftlab.callbacks.stopping_rules.registry import register_rule


@register_rule("patience")
class PatienceRule(StoppingRule):
    """Stop after ``patience`` consecutive epochs without improving the reference by more than
    ``min_delta`` (Lightning's ``EarlyStopping`` semantics, counted in epochs; ``patience=0``
    stops at the first epoch that does not improve, like Keras)."""

    name = "patience"

    def __init__(self, patience: int = 10, min_delta: float = 0.0, mode: str = "min",
                 warmup: int = 0) -> None:
        if int(patience) < 0:
            raise ValueError(f"patience={patience} is out of range; allowed: patience >= 0")
        if float(min_delta) < 0:
            raise ValueError(f"min_delta={min_delta} is out of range; allowed: min_delta >= 0")
        self.patience, self.min_delta = int(patience), float(min_delta)
        super().__init__(mode=mode, warmup=warmup)

    def reset(self) -> None:
        super().reset()
        self.ref = math.inf if self.mode == "min" else -math.inf
        self.wait = 0

    def _track(self) -> None:
        v = self.values[-1]
        if self._better(v, self.ref, self.min_delta):
            self.ref, self.wait = v, 0
        else:
            self.wait += 1

    def _observe(self) -> None:
        self._track()

    def _decide(self) -> str | None:
        self._track()
        if self.wait >= max(1, self.patience):  # Lightning: stop once wait_count >= patience
            return (f"no improvement > {self.min_delta:g} in {self.wait} epochs "
                    f"(patience={self.patience})")
        return None

    def diagnostics(self) -> dict[str, float]:
        return {"wait": float(self.wait)}
