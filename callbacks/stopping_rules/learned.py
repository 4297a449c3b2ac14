"""The learned rule and shiftlab's default (``learned``, ``curvature``): logistic regression on
scale-free curve features, shipped as plain coefficients fitted on the benchmark's tuning split.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from shiftlab.callbacks.stopping_rules.base import StoppingRule
from shiftlab.callbacks.stopping_rules.forecast import _ForecastMixin
from shiftlab.callbacks.stopping_rules.registry import register_rule

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


@register_rule("learned")
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


@register_rule("curvature")
class CurvatureRule(LearnedRule):
    """The default rule (``curvature``, ``callbacks=curvature_stop``): :class:`LearnedRule` with
    the ``p_stop`` / ``confirm`` / ``min_behind`` chosen on the benchmark's tuning split (highest gap closed to
    the validation oracle among settings using no more epochs than patience=10 there). The
    curve's local curvature test of shiftlab's first rule lives on as ``quadratic``."""

    name = "curvature"

    def __init__(self, p_stop: float = 0.5, confirm: int = 1, min_behind: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(p_stop=p_stop, confirm=confirm, min_behind=min_behind, **kwargs)
