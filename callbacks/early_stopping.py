"""Early-stopping rules as plain Python objects, and a replay over recorded curves.

Why plain objects: the same rule must decide identically inside a Lightning callback, in a unit
test on a hand-made curve, and in the benchmark that replays thousands of recorded curves. A rule
consumes one epoch at a time (``update(value, train_value, se)``), answers stop / go, and remembers
the best epoch (whose weights a callback restores). No torch, no Trainer.

Rules (``make_rule(name, **kwargs)``; ``mode="min"`` unless told):

``curvature``  shiftlab's default (:class:`CurvatureRule`): the ``learned`` rule with the setting
    chosen on the benchmark's tuning split. It reads the curve's recent gains and slope in units
    of the measured noise, the time since the best, the train curve and the generalization gap,
    and logs a parametric forecast (predicted minimum with an interval, epochs left).
``learned``    :class:`LearnedRule`: logistic regression on :func:`curve_features`, shipped as
    plain coefficients.
``forecast``   :class:`ForecastRule`: fits ``a + b exp(-s/k) + c s`` to the curve so far and stops
    when the chance of improving by more than ``min_delta`` within the look-ahead is small.
``se_slope``   :class:`SESlopeRule`: the local quadratic test with the noise taken from the
    measured standard errors of the validation loss.
``quadratic``  :class:`QuadraticRule` (shiftlab's v1 ``curvature``): a weighted local quadratic
    fit over a trailing window gives the smoothed value, slope and curvature at the newest epoch
    with standard errors; it stops when the minimum has been passed with confidence, or when the
    improvement still to come is below ``min_delta``.
``patience``   Lightning/Keras style: stop after ``patience`` epochs without an improvement of
    more than ``min_delta``.
``gl``         Prechelt (1998) GL_alpha: stop when the generalization loss
    ``GL = 100 * (E_va / E_opt - 1)`` exceeds ``alpha``.
``pq``         Prechelt's PQ_alpha: at the end of each strip of ``k`` epochs, stop when
    ``GL / P_k > alpha`` with training progress ``P_k = 1000 * (mean of the strip's train errors /
    their min - 1)``. Needs the training curve.
``up``         Prechelt's UP_s: stop when the validation error rose at the end of ``s``
    successive strips of ``k`` epochs.

Every rule takes ``mode`` (``min`` | ``max``; ``learned`` / ``curvature``: ``min`` only) and
``warmup`` (epochs before any decision; the best epoch is still tracked during warm-up). A
non-finite monitored value stops at once. ``update(value, train_value, se)`` takes the epoch's
training value and the standard error of the monitored value when they are known; rules that
use them fall back on the curve itself without them.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = [
    "StoppingRule",
    "PatienceRule",
    "GLRule",
    "PQRule",
    "UPRule",
    "CurvatureRule",
    "QuadraticRule",
    "SESlopeRule",
    "ForecastRule",
    "Forecast",
    "forecast_curve",
    "LearnedRule",
    "curve_features",
    "FEATURES",
    "LEARNED_COEF",
    "LEARNED_DELTA",
    "LocalFit",
    "local_quadratic_fit",
    "Decision",
    "make_rule",
    "replay",
    "RULES",
]

MODES = ("min", "max")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
    return mode


class StoppingRule(abc.ABC):
    """Base class: best-epoch bookkeeping, warm-up, non-finite check, state (de)serialisation.

    Subclasses implement :meth:`_decide` (called after warm-up with the epoch already recorded)
    returning a stop reason or ``None``.
    """

    name = "base"
    needs_train = False

    def __init__(self, mode: str = "min", warmup: int = 0) -> None:
        self.mode = _check_mode(mode)
        if int(warmup) < 0:
            raise ValueError(f"warmup={warmup} is out of range; allowed: warmup >= 0")
        self.warmup = int(warmup)
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        self.epoch = -1  # index of the last epoch seen
        self.values: list[float] = []
        self.train_values: list[float] = []
        self.se_values: list[float] = []  # nan where no standard error was given
        self.best_value = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = -1
        self.stopped_epoch: int | None = None
        self.reason: str | None = None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same decision after a resume (JSON-friendly)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, list(v) if isinstance(v, (list, tuple)) else v)

    # -- helpers --------------------------------------------------------------------------------
    def _better(self, a: float, b: float, delta: float = 0.0) -> bool:
        """True when ``a`` improves on ``b`` by more than ``delta``."""
        return a < b - delta if self.mode == "min" else a > b + delta

    def _sign(self) -> float:
        """+1 in min mode; -1 in max mode, so ``sign * value`` is always 'lower is better'."""
        return 1.0 if self.mode == "min" else -1.0

    @property
    def stopped(self) -> bool:
        return self.stopped_epoch is not None

    def diagnostics(self) -> dict[str, float]:
        """Per-epoch numbers worth logging (why the rule decided what it did)."""
        return {}

    # -- the step ------------------------------------------------------------------------------
    def update(self, value: float, train_value: float | None = None,
               se: float | None = None) -> bool:
        """Record one epoch (``se``: the monitored value's standard error, when measured);
        return True when training should stop after it."""
        if self.stopped:
            return True
        value = float(value)
        self.epoch += 1
        self.values.append(value)
        self.se_values.append(math.nan if se is None else float(se))
        if train_value is not None:
            self.train_values.append(float(train_value))
        elif self.needs_train:
            raise ValueError(f"rule {self.name!r} needs the training curve; pass train_value")
        if not math.isfinite(value):
            return self._stop(f"monitored value is {value} at epoch {self.epoch}")
        self._track_best(value)
        if self.epoch < self.warmup:
            self._observe()
            return False
        reason = self._decide()
        return self._stop(reason) if reason else False

    def _track_best(self, value: float) -> None:
        """Update the epoch whose weights would be restored (raw arg-best by default)."""
        if self.best_epoch < 0 or self._better(value, self.best_value):
            self.best_value, self.best_epoch = value, self.epoch

    def _observe(self) -> None:
        """Hook for rules that keep running statistics during warm-up too."""

    @abc.abstractmethod
    def _decide(self) -> str | None:
        """The reason to stop after this epoch, or None to go on."""

    def _stop(self, reason: str) -> bool:
        self.stopped_epoch, self.reason = self.epoch, reason
        return True


# ------------------------------------------------------------------------------------------------
# classic criteria
# ------------------------------------------------------------------------------------------------
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


def _relative_loss(rule: StoppingRule, value: float) -> float:
    """Prechelt's generalization loss in percent, generalized to max mode as the relative
    degradation ``100 * (best / value - 1)``. Needs positive values."""
    best = rule.best_value
    if value <= 0 or best <= 0:
        raise ValueError(f"rule {rule.name!r} needs positive monitored values (got {value:g}, "
                         f"best {best:g}); monitor a loss or an error rate")
    return 100.0 * (value / best - 1.0) if rule.mode == "min" else 100.0 * (best / value - 1.0)


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


# ------------------------------------------------------------------------------------------------
# curvature rule
# ------------------------------------------------------------------------------------------------
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


class SESlopeRule(QuadraticRule):
    """The local quadratic rule with its noise level taken from the *measured* standard error
    of the validation loss (``update(..., se=...)``) instead of the fit residuals (``se_slope``).
    Its ``DEFAULTS`` were tuned on the benchmark's tuning split; without standard errors it is
    :class:`QuadraticRule` with those settings."""

    name = "se_slope"
    DEFAULTS: dict[str, Any] = {"noise": "measured", "z": 1.0, "min_delta": 0.03, "confirm": 3}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**self.DEFAULTS, **kwargs})


# ------------------------------------------------------------------------------------------------
# parametric forecast
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# learned rule
# ------------------------------------------------------------------------------------------------
FEATURES = ("log_epoch", "log_since_best", "frac_since_best", "gain_half", "gain_quarter",
            "excess_noise", "gain_half_noise", "slope_z", "train_loglog_slope",
            "gap_loglog_slope", "bias")


def _slope(ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of equally spaced ``ys`` and the residual sd."""
    n = len(ys)
    xm, ym = (n - 1) / 2.0, sum(ys) / n
    sxx = sum((i - xm) ** 2 for i in range(n))
    b = sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sxx
    r = [y - ym - b * (i - xm) for i, y in enumerate(ys)]
    return b, math.sqrt(sum(e * e for e in r) / max(n - 2, 1))


def curve_features(values: Sequence[float], train: Sequence[float], se: Sequence[float],
                   best_epoch: int, window: int = 8) -> dict[str, float]:
    """Scale-free features of a (positive, lower-is-better) validation curve at its newest
    epoch: time, time since the best, recent gains of the running best (log scale, raw and in
    noise units), the slope's z-score, the train curve's and the generalization gap's log-log
    slopes. The noise unit is the measured relative standard error when given, else the
    residual sd of a linear fit to the last ``window`` log values."""
    t = len(values) - 1
    lv = [math.log(v) for v in values]
    run_best, cur = [], math.inf
    for v in lv:
        cur = min(cur, v)
        run_best.append(cur)
    recent = lv[-window:]
    slope, resid = _slope(recent) if len(recent) >= 3 else (0.0, 0.0)
    se_now = se[-1] if se else math.nan
    noise = se_now / values[-1] if math.isfinite(se_now) and se_now > 0 else resid
    noise = max(noise, 1e-4)
    se_slope = noise * math.sqrt(12.0 / (len(recent) ** 3 - len(recent))) if len(recent) >= 3 else 1.0
    gain_half = run_best[t // 2] - run_best[t]
    gain_q = run_best[(3 * t) // 4] - run_best[t]
    f = {
        "log_epoch": math.log(t + 1.0),
        "log_since_best": math.log(1.0 + t - best_epoch),
        "frac_since_best": (t - best_epoch) / (t + 1.0),
        "gain_half": 100.0 * gain_half,
        "gain_quarter": 100.0 * gain_q,
        "excess_noise": min((lv[-1] - run_best[t]) / noise, 20.0),
        "gain_half_noise": min(gain_half / noise, 50.0),
        "slope_z": max(-20.0, min(slope / se_slope, 20.0)),
        "train_loglog_slope": 0.0,
        "gap_loglog_slope": 0.0,
        "bias": 1.0,
    }
    if len(train) == len(values) and t >= 3 and all(v > 0 for v in train):
        h = t // 2
        dlog_t = math.log((t + 1.0) / (h + 1.0))
        lt = [math.log(v) for v in train]
        f["train_loglog_slope"] = max(-5.0, min((lt[t] - lt[h]) / dlog_t, 5.0))
        f["gap_loglog_slope"] = max(-5.0, min(((lv[t] - lt[t]) - (lv[h] - lt[h])) / dlog_t, 5.0))
    return f


# Fitted by ``python -m shiftlab.experiments.early_stopping_benchmark --tune`` on the tuning split only
# (logistic regression of "the validation loss still beats its running best by more than
# LEARNED_DELTA" on :func:`curve_features`; see ``learned_dataset`` there).
LEARNED_DELTA = 0.01
LEARNED_COEF: dict[str, float] = {
    "log_epoch": -1.2832,
    "log_since_best": -0.2134,
    "frac_since_best": -2.927,
    "gain_half": 0.0456,
    "gain_quarter": 0.1888,
    "excess_noise": 0.0516,
    "gain_half_noise": 0.1176,
    "slope_z": -0.2963,
    "train_loglog_slope": -0.5341,
    "gap_loglog_slope": -1.4195,
    "bias": 3.6958,
}


class LearnedRule(_ForecastMixin, StoppingRule):
    """Stop when a logistic model of curve features says the validation loss is unlikely to
    improve much more (``learned``).

    The model's probability ``p_continue`` is that the validation loss will still beat its
    running best by more than ``LEARNED_DELTA`` (relative, log scale) before the run ends. It was
    fitted on the benchmark's tuning split only (the threshold chosen there by leave-one-cell-out
    cross-validation) and ships as plain coefficients (``coef``, default :data:`LEARNED_COEF`)
    over :func:`curve_features`: time and time since the best, recent gains of the running best
    in noise units (the measured standard error when given, else the residual scatter), the
    slope's z-score, the train curve's and the generalization gap's log-log slopes. Stop when
    ``p_continue < p_stop`` for ``confirm`` epochs in a row with the best epoch at least
    ``min_behind`` epochs back (a curve still setting new bests is not stopped); restores the
    raw best epoch. Needs
    positive monitored values in ``min`` mode (a loss). Logs, but does not decide on, the
    parametric forecast of :class:`ForecastRule`.
    """

    name = "learned"
    # the forecast it logs (not used in the decision): see ForecastRule
    fit_window, horizon_frac, min_horizon, min_delta, z_interval, log = 40, 0.5, 10.0, 0.005, 1.96, True

    def __init__(self, p_stop: float = 0.2, confirm: int = 1, coef: dict[str, float] | None = None,
                 window: int = 8, min_behind: int = 0, mode: str = "min", warmup: int = 5) -> None:
        if not 0.0 < float(p_stop) < 1.0:
            raise ValueError(f"p_stop={p_stop} is out of range; allowed: 0 < p_stop < 1")
        if int(confirm) < 1 or int(window) < 3:
            raise ValueError(f"confirm={confirm}, window={window} are out of range; "
                             "allowed: confirm >= 1, window >= 3")
        if mode != "min":
            raise ValueError(f"mode={mode!r} is not allowed for rule 'learned'; allowed: min")
        if int(min_behind) < 0:
            raise ValueError(f"min_behind={min_behind} is out of range; allowed: min_behind >= 0")
        self.p_stop, self.confirm, self.window = float(p_stop), int(confirm), int(window)
        self.min_behind = int(min_behind)
        self.coef = dict(LEARNED_COEF if coef is None else coef)
        unknown = set(self.coef) - set(FEATURES)
        if unknown:
            raise ValueError(f"coef has unknown features {sorted(unknown)}; allowed: {', '.join(FEATURES)}")
        super().__init__(mode=mode, warmup=warmup)

    def reset(self) -> None:
        super().reset()
        self.p_continue = math.nan
        self.streak = 0
        self.fc: dict[str, float] | None = None
        self.fc_log = True

    def features(self) -> dict[str, float]:
        if any(v <= 0 for v in self.values):
            raise ValueError(f"rule {self.name!r} needs positive monitored values; monitor a loss")
        return curve_features(self.values, self.train_values, self.se_values, self.best_epoch,
                              self.window)

    def _decide(self) -> str | None:
        f = self.features()
        z = sum(self.coef.get(k, 0.0) * v for k, v in f.items())
        self.p_continue = 1.0 / (1.0 + math.exp(-max(-50.0, min(z, 50.0))))
        ok = self.p_continue < self.p_stop and self.epoch - self.best_epoch >= self.min_behind
        self.streak = self.streak + 1 if ok else 0
        if ok and self.streak >= self.confirm:
            reason = (f"{self.name}: P(val improves > {LEARNED_DELTA:.0%}) = {self.p_continue:.3g} "
                      f"< {self.p_stop:g} "
                      f"for {self.streak} epoch(s); best epoch {self.best_epoch}")
            d = self._forecast_now()
            if d:
                reason += (f"; forecast minimum {d['forecast_min']:.4g} [{d['forecast_lo']:.4g}, "
                           f"{d['forecast_hi']:.4g}] in ~{d['epochs_left']:.0f} epochs")
            return reason
        return None

    def _forecast_now(self) -> dict[str, float]:
        self._forecast()
        return self.forecast_diagnostics()

    def diagnostics(self) -> dict[str, float]:
        """``p_continue`` (the model's probability of a further gain) plus the parametric
        forecast of :class:`ForecastRule` (predicted minimum, its interval, epochs left, chance
        of a further 0.5% gain), computed here only: it does not enter the decision."""
        return {"p_continue": self.p_continue, **self._forecast_now()}


class CurvatureRule(LearnedRule):
    """The default rule (``curvature``, ``callbacks=curvature_stop``): :class:`LearnedRule` with
    the ``p_stop`` / ``confirm`` / ``min_behind`` chosen on the benchmark's tuning split (highest gap closed to
    the validation oracle among settings using no more epochs than patience=10 there). The
    curve's local curvature test of shiftlab's first rule lives on as ``quadratic``."""

    name = "curvature"

    def __init__(self, p_stop: float = 0.5, confirm: int = 1, min_behind: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(p_stop=p_stop, confirm=confirm, min_behind=min_behind, **kwargs)


# ------------------------------------------------------------------------------------------------
RULES: dict[str, Callable[..., StoppingRule]] = {
    "curvature": CurvatureRule,
    "quadratic": QuadraticRule,
    "se_slope": SESlopeRule,
    "forecast": ForecastRule,
    "learned": LearnedRule,
    "patience": PatienceRule,
    "gl": GLRule,
    "pq": PQRule,
    "up": UPRule,
}


def make_rule(name: str, **kwargs: Any) -> StoppingRule:
    """Build a rule by name (``curvature`` | ``quadratic`` | ``se_slope`` | ``forecast`` |
    ``learned`` | ``patience`` | ``gl`` | ``pq`` | ``up``)."""
    try:
        cls = RULES[name]
    except KeyError:
        raise ValueError(f"rule={name!r} is unknown; allowed: {', '.join(RULES)}") from None
    return cls(**kwargs)


@dataclass
class Decision:
    """Outcome of a replay. ``stop_epoch``: 0-based index of the epoch after which training
    stops (the last index when the rule never fires); ``best_epoch``: the epoch restored."""

    stop_epoch: int
    best_epoch: int
    stopped: bool
    reason: str | None
    trace: list[dict[str, float]] = field(default_factory=list)


def replay(rule: StoppingRule | str, val_loss: Sequence[float],
           train_loss: Sequence[float] | None = None, trace: bool = False,
           val_se: Sequence[float | None] | None = None, **kwargs: Any) -> Decision:
    """Run ``rule`` (an object, reset first, or a name for :func:`make_rule`) over a recorded
    curve, epoch by epoch, exactly as a callback would see it."""
    if isinstance(rule, str):
        rule = make_rule(rule, **kwargs)
    elif kwargs:
        raise ValueError("keyword arguments are only accepted with a rule name")
    if len(val_loss) == 0:
        raise ValueError("val_loss is empty; replay needs at least one epoch")
    if train_loss is not None and len(train_loss) != len(val_loss):
        raise ValueError(f"train_loss has {len(train_loss)} epochs, val_loss {len(val_loss)}")
    if val_se is not None and len(val_se) != len(val_loss):
        raise ValueError(f"val_se has {len(val_se)} epochs, val_loss {len(val_loss)}")
    rule.reset()
    rows: list[dict[str, float]] = []
    for i, v in enumerate(val_loss):
        stop = rule.update(v, None if train_loss is None else train_loss[i],
                           None if val_se is None else val_se[i])
        if trace:
            rows.append(rule.diagnostics())
        if stop:
            return Decision(i, rule.best_epoch, True, rule.reason, rows)
    return Decision(len(val_loss) - 1, rule.best_epoch, False, None, rows)
