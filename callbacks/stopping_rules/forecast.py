"""The parametric forecast: fit ``a + b exp(-s/k) + c s`` (decay towards a floor plus a rising
over-fitting term) to the curve so far and forecast the remaining improvement with an interval
(``forecast``). The learned default rule logs the same forecast so a user sees why it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from shiftlab.callbacks.stopping_rules.base import StoppingRule
from shiftlab.callbacks.stopping_rules.registry import register_rule


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


@dataclass
class Forecast:
    """What the fitted curve says about the future (transformed, lower-is-better units).

    ``minimum`` / ``sd_minimum``: predicted minimum over the look-ahead and its sd;
    ``improvement`` / ``sd_improvement``: how far below the best fitted value so far it lies;
    ``epochs_left``: epochs from now to the predicted minimum; ``p_improve``: probability that
    the improvement exceeds ``min_delta``; ``timescale``: the fitted decay time."""

    minimum: float
    sd_minimum: float
    improvement: float
    sd_improvement: float
    epochs_left: float
    p_improve: float
    timescale: float


TIMESCALES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


def forecast_curve(ys: Sequence[float], sigma: Sequence[float] | None, horizon: float,
                   min_delta: float, timescales: Sequence[float] = TIMESCALES
                   ) -> Forecast | None:
    """Fit ``y(s) = a + b exp(-s/k) + c (s - now)/n`` (decay towards a floor plus a linear
    over-fitting drift) to ``ys`` by weighted least squares for each ``k`` in ``timescales``,
    keep the best ``k``, and forecast the minimum over the next ``horizon`` epochs.

    Weights are ``1/sigma^2`` when the measured noise is given (the residual scale then only
    inflates, never shrinks, the covariance: SGD jitter adds to sampling noise), else uniform
    with the residual variance. The interval ignores the choice of ``k`` (it is conditional on
    the fitted timescale). None with fewer than 6 points."""
    import numpy as np

    n = len(ys)
    if n < 6:
        return None
    y = np.asarray(ys, dtype=float)
    s = np.arange(n, dtype=float)
    w = np.ones(n) if sigma is None else 1.0 / np.maximum(np.asarray(sigma, float), 1e-12) ** 2
    ks = np.array([k for k in timescales if k <= 4 * n], dtype=float)
    if len(ks) == 0:
        return None
    a = np.stack([np.ones((len(ks), n)), np.exp(-s[None, :] / ks[:, None]),
                  np.broadcast_to((s - (n - 1)) / n, (len(ks), n))], axis=-1)  # (K, n, 3)
    m = np.einsum("kni,n,knj->kij", a, w, a)
    rhs = np.einsum("kni,n,n->ki", a, w, y)
    ok = np.abs(np.linalg.det(m)) > 1e-12 * np.abs(m[:, 0, 0] * m[:, 1, 1] * m[:, 2, 2]) + 1e-300
    if not ok.any():
        return None
    a, m, rhs, ks = a[ok], m[ok], rhs[ok], ks[ok]
    beta = np.linalg.solve(m, rhs[..., None])[..., 0]
    rss = np.einsum("kn,n->k", (y[None, :] - np.einsum("kni,ki->kn", a, beta)) ** 2, w)
    j = int(np.argmin(rss))
    k, b = float(ks[j]), beta[j]
    scale2 = rss[j] / max(n - 3, 1)
    cov = np.linalg.inv(m[j]) * (scale2 if sigma is None else max(1.0, scale2))

    def phi(t: np.ndarray) -> np.ndarray:
        return np.stack([np.ones_like(t), np.exp(-t / k), (t - (n - 1)) / n], axis=-1)

    past = phi(s) @ b
    ib = int(np.argmin(past))
    fut_s = (n - 1) + np.linspace(1.0, max(horizon, 1.0), 40)
    fut = phi(fut_s) @ b
    i_min = int(np.argmin(fut))
    g_min = phi(fut_s[i_min:i_min + 1])[0]
    g = phi(s[ib:ib + 1])[0] - g_min
    var_i, var_m = float(g @ cov @ g), float(g_min @ cov @ g_min)
    imp = float(past[ib] - fut[i_min])
    sd_i = math.sqrt(max(var_i, 0.0))
    p = _normal_cdf((imp - min_delta) / sd_i) if sd_i > 0 else float(imp > min_delta)
    return Forecast(float(fut[i_min]), math.sqrt(max(var_m, 0.0)), imp, sd_i,
                    float(fut_s[i_min] - (n - 1)), p, k)


class _ForecastMixin:
    """Runs :func:`forecast_curve` on the rule's recent history (log scale when positive) and
    keeps the latest :class:`Forecast` for decisions and logging."""

    def _forecast(self: Any) -> Forecast | None:
        vs = self.values[-self.fit_window:]
        sign = self._sign()
        use_log = self.log and all(v > 0 for v in vs)
        ys = [sign * (math.log(v) if use_log else v) for v in vs]
        se = self.se_values[-self.fit_window:]
        sigma = None
        if all(math.isfinite(e) and e > 0 for e in se):
            sigma = [e / abs(v) for e, v in zip(se, vs)] if use_log else list(se)
        horizon = max(self.min_horizon, self.horizon_frac * (self.epoch + 1))
        fc = forecast_curve(ys, sigma, horizon, self.min_delta)
        self.fc_log = use_log
        self.fc = None if fc is None else vars(fc).copy()
        return fc

    def forecast_diagnostics(self: Any) -> dict[str, float]:
        """Predicted minimum with a ``z_interval`` band in the monitored metric's units, the
        expected epochs left and the probability of a further improvement."""
        if not self.fc:
            return {}
        fc, sign = self.fc, self._sign()
        lo = fc["minimum"] - self.z_interval * fc["sd_minimum"]
        hi = fc["minimum"] + self.z_interval * fc["sd_minimum"]
        back = (lambda u: math.exp(sign * u)) if self.fc_log else (lambda u: sign * u)
        ends = sorted((back(lo), back(hi)))
        return {"forecast_min": back(fc["minimum"]), "forecast_lo": ends[0],
                "forecast_hi": ends[1], "epochs_left": fc["epochs_left"],
                "p_improve": fc["p_improve"]}


@register_rule("forecast")
class ForecastRule(_ForecastMixin, StoppingRule):
    """Stop when the parametric forecast of the curve gives a small chance of improving on the
    best epoch by more than ``min_delta`` (``forecast``).

    Each epoch :func:`forecast_curve` fits ``a + b exp(-s/k) + c s`` to the last ``fit_window``
    values (log scale: ``min_delta`` is relative) and forecasts the minimum over the next
    ``max(min_horizon, horizon_frac * epochs so far)`` epochs with an interval; with measured
    standard errors (``update(..., se=...)``) they set the noise, else the residuals do. Stop when
    ``p_improve < p_stop`` for ``confirm`` epochs in a row with the best epoch ``min_behind`` or
    more epochs back. Restores the raw best epoch.
    """

    name = "forecast"

    def __init__(self, fit_window: int = 40, horizon_frac: float = 0.5, min_horizon: float = 10.0,
                 min_delta: float = 0.03, p_stop: float = 0.5, confirm: int = 1,
                 min_behind: int = 2, z_interval: float = 1.96, log: bool = True,
                 mode: str = "min", warmup: int = 10) -> None:
        if int(fit_window) < 6:
            raise ValueError(f"fit_window={fit_window} is out of range; allowed: fit_window >= 6")
        if not 0.0 < float(p_stop) < 1.0:
            raise ValueError(f"p_stop={p_stop} is out of range; allowed: 0 < p_stop < 1")
        if float(horizon_frac) < 0 or float(min_horizon) < 1 or float(min_delta) < 0:
            raise ValueError("horizon_frac >= 0, min_horizon >= 1, min_delta >= 0 required (got "
                             f"{horizon_frac}, {min_horizon}, {min_delta})")
        if int(confirm) < 1 or int(min_behind) < 0:
            raise ValueError(f"confirm={confirm}, min_behind={min_behind} are out of range; "
                             "allowed: confirm >= 1, min_behind >= 0")
        self.fit_window, self.horizon_frac = int(fit_window), float(horizon_frac)
        self.min_horizon, self.min_delta, self.p_stop = float(min_horizon), float(min_delta), float(p_stop)
        self.confirm, self.min_behind = int(confirm), int(min_behind)
        self.z_interval, self.log = float(z_interval), bool(log)
        super().__init__(mode=mode, warmup=warmup)

    def reset(self) -> None:
        super().reset()
        self.fc: dict[str, float] | None = None
        self.fc_log = self.log
        self.streak = 0

    def _decide(self) -> str | None:
        fc = self._forecast()
        if fc is None:
            self.streak = 0
            return None
        behind = self.epoch - self.best_epoch
        ok = fc.p_improve < self.p_stop and behind >= self.min_behind
        self.streak = self.streak + 1 if ok else 0
        if ok and self.streak >= self.confirm:
            return (f"forecast: P(improvement > {self.min_delta:g}) = {fc.p_improve:.3g} < "
                    f"{self.p_stop:g} for {self.streak} epochs (predicted improvement "
                    f"{fc.improvement:.3g} +- {fc.sd_improvement:.3g}, best epoch {self.best_epoch})")
        return None

    def diagnostics(self) -> dict[str, float]:
        return self.forecast_diagnostics()
