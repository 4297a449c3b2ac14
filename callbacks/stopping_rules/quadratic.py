"""The local quadratic rules: a weighted quadratic fit over a trailing window gives the smoothed
value, slope and curvature of the validation curve with standard errors (``quadratic``, shiftlab's
v1 ``curvature`` rule; ``se_slope`` takes the noise from the measured standard errors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from shiftlab.callbacks.stopping_rules.base import StoppingRule
from shiftlab.callbacks.stopping_rules.registry import register_rule


@dataclass
class LocalFit:
    """Weighted quadratic ``y(s) = value + slope*s + curvature*s^2/2`` around the newest epoch
    (``s = 0``; ``s < 0`` is the past), with standard errors from the residual variance."""

    value: float
    slope: float
    curvature: float
    se_value: float
    se_slope: float
    se_curvature: float
    n: int


def _inv3(a: list[list[float]]) -> list[list[float]] | None:
    """Inverse of a symmetric 3x3 matrix by cofactors; None if (numerically) singular."""
    (p, q, r), (_, s, t), (_, _, u) = a
    det = p * (s * u - t * t) - q * (q * u - t * r) + r * (q * t - s * r)
    scale = max(abs(p * s * u), 1e-300)
    if abs(det) < 1e-12 * scale:
        return None
    c = [[s * u - t * t, r * t - q * u, q * t - r * s],
         [r * t - q * u, p * u - r * r, q * r - p * t],
         [q * t - r * s, q * r - p * t, p * s - q * q]]
    return [[x / det for x in row] for row in c]


def _matmul3(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)] for i in range(3)]


def _wls(basis: list[tuple[float, float, float]], ws: list[float], y: Sequence[float]
         ) -> tuple[list[float], list[list[float]]] | None:
    m = [[sum(w * f[i] * f[j] for w, f in zip(ws, basis)) for j in range(3)] for i in range(3)]
    aty = [sum(w * f[i] * v for w, f, v in zip(ws, basis, y)) for i in range(3)]
    inv = _inv3(m)
    if inv is None:
        return None
    return [sum(inv[i][j] * aty[j] for j in range(3)) for i in range(3)], inv


def local_quadratic_fit(y: Sequence[float], half_life: float | None = None,
                        robust: int = 0, sigma: Sequence[float] | None = None
                        ) -> LocalFit | None:
    """Weighted least-squares quadratic through ``y`` (equally spaced, newest last).

    Weights ``w_i = 0.5 ** (age_i / half_life)`` (uniform if ``half_life`` is None) favour
    recent epochs. Coordinates are centred on the newest point so the intercept is the smoothed
    current value and the linear term the current slope (a one-sided Savitzky-Golay filter with
    error bars). The noise is taken as homoscedastic, so the weights are a choice of estimator,
    not of noise model: the covariance is the sandwich ``sigma^2 M^-1 (A'W^2A) M^-1`` with
    ``M = A'WA`` and ``sigma^2`` from the weighted residuals (Kish effective sample size for the
    degrees of freedom). ``robust > 0`` runs that many Huber re-weighting passes (tuning
    constant 1.345 times the residuals' MAD scale), so a single loss spike neither bends the
    fit nor inflates its error bars. Needs at least 4 points; returns None otherwise or when
    singular. ``sigma`` (per-point noise sd, e.g. the measured standard error of each
    validation loss) replaces the residual-based noise level: the covariance is then
    ``M^-1 (A'W Sigma W A) M^-1`` with ``Sigma = diag(sigma^2)``.
    """
    n = len(y)
    if n < 4:
        return None
    xs = [float(i - (n - 1)) for i in range(n)]
    prior = [1.0 if not half_life else 0.5 ** (-x / half_life) for x in xs]
    basis = [(1.0, x, 0.5 * x * x) for x in xs]  # value, slope, curvature
    ws = prior
    sol = _wls(basis, ws, y)
    if sol is None:
        return None
    for _ in range(int(robust)):
        resid = [v - sum(b * fi for b, fi in zip(sol[0], f)) for f, v in zip(basis, y)]
        scale = 1.4826 * sorted(abs(r) for r in resid)[n // 2]
        if scale <= 0:
            break
        cut = 1.345 * scale
        ws = [w * min(1.0, cut / abs(r)) if r else w for w, r in zip(prior, resid)]
        new = _wls(basis, ws, y)
        if new is None:
            break
        sol = new
    beta, inv = sol
    resid = [v - sum(b * fi for b, fi in zip(beta, f)) for f, v in zip(basis, y)]
    if sigma is not None:
        m2 = [[sum(w * w * sg * sg * f[i] * f[j] for w, sg, f in zip(ws, sigma, basis))
               for j in range(3)] for i in range(3)]
        sigma2 = 1.0
    else:
        m2 = [[sum(w * w * f[i] * f[j] for w, f in zip(ws, basis)) for j in range(3)]
              for i in range(3)]
        sw = sum(ws)
        n_eff = sw * sw / sum(w * w for w in ws)
        sigma2 = sum(w * r * r for w, r in zip(ws, resid)) / sw * n_eff / max(n_eff - 3.0, 1.0)
    cov = _matmul3(_matmul3(inv, m2), inv)
    se = [math.sqrt(max(sigma2 * cov[i][i], 0.0)) for i in range(3)]
    return LocalFit(beta[0], beta[1], beta[2], se[0], se[1], se[2], n)


@register_rule("quadratic")
class QuadraticRule(StoppingRule):
    """Stop from the fitted local shape of the validation curve (shiftlab's v1 rule, ``quadratic``).

    Each epoch it fits :func:`local_quadratic_fit` to the last ``window`` values, transformed by
    ``log`` (so changes are relative; used while every value is positive) and oriented so that
    lower is better. The fit gives the smoothed value, the slope and the curvature at the newest
    epoch with standard errors (exponential weights with ``half_life`` epochs; ``robust`` Huber
    passes against spikes). After ``warmup`` epochs a stop condition is:

    1. **minimum passed**: the slope is positive with confidence, ``slope > z * se_slope``, and
       the best epoch is at least ``min_behind`` epochs back; or
    2. **plateau**: the improvement still to come, ``R``, is below ``min_delta`` and the best
       epoch is at least ``plateau_behind`` epochs back. With the optimistic descent speed
       ``g = max(0, -slope) + z_plateau * se_slope`` and the pessimistic curvature
       ``c = curvature - z_plateau * se_curvature``: ``R = min(g^2 / c, g * lookahead)`` if
       ``c > 0`` (an exponential decay ``y = A exp(-k s)`` has exactly ``y'^2 / y''`` left to
       fall; the linear bound caps it over ``lookahead`` epochs), else ``R = g * lookahead``.
       On a log scale ``min_delta`` is a relative change (0.005 = 0.5 %).

    Training stops when a condition has held ``confirm`` epochs in a row (one noisy epoch does
    not stop a run). The best epoch (the weights to restore) is the arg-best of the smoothed
    values (``restore="smoothed"``, less sensitive to one lucky validation epoch) or of the raw
    values (``restore="raw"``); both are causal, so a callback can save the weights then.

    Defaults (v1): chosen by a 400-sample random search over a grid in the v1 benchmark on the
    tuning half of the 72-run v1 corpus (fewest
    epochs among settings whose test-loss and test-accuracy regrets do not exceed those of
    ``patience=10`` on that half): ``window=8, half_life=4, z=3, z_plateau=0, min_delta=0.005,
    lookahead=10, min_behind=2, plateau_behind=2, confirm=3, robust=0, restore="smoothed",
    warmup=10``. With ``z_plateau=0`` the plateau test uses the point slope, so in practice the
    rule stops once the fitted slope has been non-negative (or the extrapolated tail below
    0.5 %) for 3 epochs with the smoothed best 2+ epochs back. Its v2 benchmark results are in
    the README's early-stopping section. ``noise="measured"`` takes the noise from the measured
    standard errors (:class:`SESlopeRule`).
    """

    name = "quadratic"

    def __init__(self, window: int = 8, half_life: float | None = 4.0, z: float = 3.0,
                 z_plateau: float | None = 0.0, min_delta: float = 0.005,
                 lookahead: float = 10.0, min_behind: int = 2, plateau_behind: int = 2,
                 confirm: int = 3, robust: int = 0, log: bool = True,
                 restore: str = "smoothed", noise: str = "residual", mode: str = "min",
                 warmup: int = 10) -> None:
        if noise not in ("residual", "measured"):
            raise ValueError(f"noise={noise!r} is unknown; allowed: residual, measured")
        self.noise = noise
        if int(window) < 4:
            raise ValueError(f"window={window} is out of range; allowed: window >= 4")
        if half_life is not None and float(half_life) <= 0:
            raise ValueError(f"half_life={half_life} is out of range; allowed: > 0 or null")
        if float(z) < 0 or float(min_delta) < 0 or float(lookahead) <= 0:
            raise ValueError("z, min_delta must be >= 0 and lookahead > 0 "
                             f"(got z={z}, min_delta={min_delta}, lookahead={lookahead})")
        if int(confirm) < 1 or int(min_behind) < 0:
            raise ValueError(f"confirm={confirm}, min_behind={min_behind} are out of range; "
                             "allowed: confirm >= 1, min_behind >= 0")
        if restore not in ("raw", "smoothed"):
            raise ValueError(f"restore={restore!r} is unknown; allowed: raw, smoothed")
        self.window, self.z, self.min_delta = int(window), float(z), float(min_delta)
        self.z_plateau = self.z if z_plateau is None else float(z_plateau)
        self.half_life = None if half_life is None else float(half_life)
        self.lookahead, self.min_behind = float(lookahead), int(min_behind)
        self.confirm, self.robust = int(confirm), int(robust)
        self.plateau_behind = int(plateau_behind)
        self.log, self.restore = bool(log), restore
        super().__init__(mode=mode, warmup=warmup)

    def reset(self) -> None:
        super().reset()
        self.smoothed = math.nan  # transformed, oriented: lower is better
        self.slope = math.nan
        self.curvature = math.nan
        self.se_slope = math.nan
        self.remaining = math.nan
        self.streak = 0  # consecutive epochs a stop condition held
        self.use_log = self.log
        self.best_smoothed = math.inf
        self.raw_best_value = math.inf if self.mode == "min" else -math.inf
        self.raw_best_epoch = -1

    def _transform(self, ys: Sequence[float]) -> list[float]:
        sign = self._sign()
        if self.use_log:
            return [sign * math.log(v) for v in ys]
        return [sign * v for v in ys]

    def _track_best(self, value: float) -> None:
        if self.use_log and value <= 0:  # log needs positive values: fall back for good
            self.use_log, self.best_smoothed = False, math.inf
        if self.raw_best_epoch < 0 or self._better(value, self.raw_best_value):
            self.raw_best_value, self.raw_best_epoch = value, self.epoch
        self._fit()
        if self.restore == "raw":
            self.best_value, self.best_epoch = self.raw_best_value, self.raw_best_epoch
        elif self.smoothed < self.best_smoothed or self.best_epoch < 0:
            self.best_smoothed = self.smoothed
            self.best_value, self.best_epoch = value, self.epoch

    def _sigma(self) -> list[float] | None:
        """Measured noise of the window's transformed values (None: use the residuals)."""
        if self.noise != "measured":
            return None
        se = self.se_values[-self.window:]
        vs = self.values[-self.window:]
        if not all(math.isfinite(e) and e > 0 for e in se):
            return None
        return [e / abs(v) for e, v in zip(se, vs)] if self.use_log else list(se)

    def _fit(self) -> None:
        ys = self._transform(self.values[-self.window:])
        fit = local_quadratic_fit(ys, self.half_life, self.robust, self._sigma())
        if fit is None:
            self.smoothed = ys[-1]
            self.slope = self.curvature = self.se_slope = self.remaining = math.nan
            return
        self.smoothed, self.slope, self.curvature = fit.value, fit.slope, fit.curvature
        self.se_slope = fit.se_slope
        # optimistic descent speed and pessimistic (lower-bound) curvature: a noisy fit must
        # not talk the rule into a plateau
        g = max(0.0, -fit.slope) + self.z_plateau * fit.se_slope
        c = fit.curvature - self.z_plateau * fit.se_curvature
        lin = g * self.lookahead
        self.remaining = min(g * g / c, lin) if c > 0 else lin

    def _decide(self) -> str | None:
        if math.isnan(self.slope):
            self.streak = 0
            return None
        behind = self.epoch - self.best_epoch
        reason = None
        if self.slope > self.z * self.se_slope and behind >= self.min_behind:
            reason = (f"minimum passed: slope={self.slope:.3g} > z*se={self.z * self.se_slope:.3g}, "
                      f"best epoch {self.best_epoch} is {behind} epochs back")
        elif self.remaining < self.min_delta and behind >= self.plateau_behind:
            reason = (f"plateau: extrapolated remaining improvement {self.remaining:.3g} < "
                      f"min_delta={self.min_delta:g} (slope={self.slope:.3g}, "
                      f"curvature={self.curvature:.3g})")
        self.streak = self.streak + 1 if reason else 0
        if reason and self.streak >= self.confirm:
            return reason + (f", {self.streak} epochs in a row" if self.confirm > 1 else "")
        return None

    def diagnostics(self) -> dict[str, float]:
        """Smoothed value in the monitored metric's units; slope, curvature and the remaining
        improvement in the transformed, lower-is-better units the decision uses."""
        sm = self._sign() * self.smoothed
        if self.use_log and math.isfinite(sm):
            sm = math.exp(sm)
        return {"smoothed": sm, "slope": self.slope, "curvature": self.curvature,
                "se_slope": self.se_slope, "remaining": self.remaining}


@register_rule("se_slope")
class SESlopeRule(QuadraticRule):
    """The local quadratic rule with its noise level taken from the *measured* standard error
    of the validation loss (``update(..., se=...)``) instead of the fit residuals (``se_slope``).
    Its ``DEFAULTS`` were tuned on the benchmark's tuning split; without standard errors it is
    :class:`QuadraticRule` with those settings."""

    name = "se_slope"
    DEFAULTS: dict[str, Any] = {"noise": "measured", "z": 1.0, "min_delta": 0.03, "confirm": 3}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**self.DEFAULTS, **kwargs})
