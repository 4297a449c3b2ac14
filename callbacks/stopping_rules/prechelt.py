"""Prechelt's (1998) criteria: GL_alpha (generalization loss), PQ_alpha (generalization loss over
training progress) and UP_s (successive rises).

Why kept: they are the classic baselines of "Early stopping -- but when?", and PQ is the one
classic rule that reads the training curve.
"""
from __future__ import annotations

import math
from typing import Sequence

from shiftlab.callbacks.stopping_rules.base import StoppingRule
from shiftlab.callbacks.stopping_rules.registry import register_rule


def _relative_loss(rule: StoppingRule, value: float) -> float:
    """Prechelt's generalization loss in percent, generalized to max mode as the relative
    degradation ``100 * (best / value - 1)``. Needs positive values."""
    best = rule.best_value
    if value <= 0 or best <= 0:
        raise ValueError(f"rule {rule.name!r} needs positive monitored values (got {value:g}, "
                         f"best {best:g}); monitor a loss or an error rate")
    return 100.0 * (value / best - 1.0) if rule.mode == "min" else 100.0 * (best / value - 1.0)


@register_rule("gl")
class GLRule(StoppingRule):
    """Prechelt's GL_alpha: stop as soon as ``GL(t) = 100 (E_va(t) / E_opt(t) - 1) > alpha``."""

    name = "gl"

    def __init__(self, alpha: float = 5.0, mode: str = "min", warmup: int = 0) -> None:
        if float(alpha) < 0:
            raise ValueError(f"alpha={alpha} is out of range; allowed: alpha >= 0")
        self.alpha = float(alpha)
        super().__init__(mode=mode, warmup=warmup)

    def reset(self) -> None:
        super().reset()
        self.gl = 0.0

    def _observe(self) -> None:
        self.gl = _relative_loss(self, self.values[-1])

    def _decide(self) -> str | None:
        self._observe()
        if self.gl > self.alpha:
            return f"GL={self.gl:.3g} > alpha={self.alpha:g}"
        return None

    def diagnostics(self) -> dict[str, float]:
        return {"gl": self.gl}


def training_progress(train: Sequence[float], k: int) -> float:
    """Prechelt's ``P_k(t) = 1000 * (sum of the last k train errors / (k * their min) - 1)``."""
    strip = train[-k:]
    lo = min(strip)
    if lo <= 0:
        return math.inf if sum(strip) > 0 else 0.0
    return 1000.0 * (sum(strip) / (len(strip) * lo) - 1.0)


@register_rule("pq")
class PQRule(StoppingRule):
    """Prechelt's PQ_alpha: at each end of a strip of ``k`` epochs, stop when ``GL / P_k > alpha``.

    ``P_k`` is measured on the training curve (``train_value``), always in 'lower is better'
    orientation (pass a loss or an error).
    """

    name = "pq"
    needs_train = True

    def __init__(self, alpha: float = 0.5, k: int = 5, mode: str = "min", warmup: int = 0) -> None:
        if float(alpha) < 0:
            raise ValueError(f"alpha={alpha} is out of range; allowed: alpha >= 0")
        if int(k) < 1:
            raise ValueError(f"k={k} is out of range; allowed: k >= 1")
        self.alpha, self.k = float(alpha), int(k)
        super().__init__(mode=mode, warmup=warmup)

    def reset(self) -> None:
        super().reset()
        self.gl, self.pk, self.pq = 0.0, math.inf, 0.0

    def _decide(self) -> str | None:
        self.gl = _relative_loss(self, self.values[-1])
        if (self.epoch + 1) % self.k != 0:
            return None
        self.pk = training_progress(self.train_values, self.k)
        self.pq = self.gl / self.pk if self.pk > 0 else (math.inf if self.gl > 0 else 0.0)
        if self.pq > self.alpha:
            return f"GL/P_k={self.pq:.3g} > alpha={self.alpha:g} (GL={self.gl:.3g}, P_k={self.pk:.3g})"
        return None

    def diagnostics(self) -> dict[str, float]:
        return {"gl": self.gl, "pk": self.pk, "pq": self.pq}


@register_rule("up")
class UPRule(StoppingRule):
    """Prechelt's UP_s: stop when the validation error rose (fell, in max mode) at the end of
    ``s`` successive strips of ``k`` epochs, each compared with the end of the previous strip."""

    name = "up"

    def __init__(self, s: int = 3, k: int = 5, mode: str = "min", warmup: int = 0) -> None:
        if int(s) < 1 or int(k) < 1:
            raise ValueError(f"s={s}, k={k} are out of range; allowed: s >= 1 and k >= 1")
        self.s, self.k = int(s), int(k)
        super().__init__(mode=mode, warmup=warmup)

    def reset(self) -> None:
        super().reset()
        self.ups = 0

    def _strip_end(self) -> None:
        if (self.epoch + 1) % self.k != 0 or self.epoch < self.k:
            return
        now, before = self.values[-1], self.values[-1 - self.k]
        self.ups = self.ups + 1 if self._better(before, now) else 0

    def _observe(self) -> None:
        self._strip_end()

    def _decide(self) -> str | None:
        self._strip_end()
        if self.ups >= self.s:
            return f"validation worsened in {self.ups} successive strips of {self.k} (s={self.s})"
        return None

    def diagnostics(self) -> dict[str, float]:
        return {"ups": float(self.ups)}
