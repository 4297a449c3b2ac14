"""Stopping rules on hand-made curves whose stop epoch is known (pure Python, fast)."""
from __future__ import annotations

import math
import random

import pytest

from shiftlab.callbacks.stopping_rules import (FEATURES, LEARNED_COEF, CurvatureRule, ForecastRule,
                                               GLRule, LearnedRule, PatienceRule, PQRule, QuadraticRule,
                                               SESlopeRule, UPRule, curve_features, forecast_curve,
                                               local_quadratic_fit, make_rule, replay)


# ---------------------------------------------------------------------------- patience
def test_patience_stops_after_patience_epochs_without_improvement():
    curve = [5, 4, 3, 2, 2.5, 2.4, 2.3, 2.2, 2.1, 2.05]
    d = replay("patience", curve, patience=3)
    # best at index 3; epochs 4, 5, 6 do not improve: wait reaches 3 at epoch 6 -> stop (Lightning)
    assert (d.stop_epoch, d.best_epoch, d.stopped) == (6, 3, True)
    assert replay("patience", curve, patience=0).stop_epoch == 4  # Keras' patience=0


def test_patience_min_delta_ignores_small_improvements():
    curve = [1.0, 0.5, 0.49, 0.48, 0.47, 0.46]
    assert replay("patience", curve, patience=2, min_delta=0.05).stop_epoch == 3
    assert not replay("patience", curve, patience=2, min_delta=0.0).stopped


def test_patience_max_mode_and_best_epoch():
    acc = [0.1, 0.5, 0.7, 0.6, 0.65, 0.69, 0.5]
    d = replay("patience", acc, patience=2, mode="max")
    assert d.best_epoch == 2 and d.stop_epoch == 4


def test_never_stopping_returns_last_index():
    d = replay("patience", [3, 2, 1, 0.5], patience=10)
    assert d.stop_epoch == 3 and not d.stopped and d.best_epoch == 3


# ---------------------------------------------------------------------------- Prechelt GL
def test_gl_stops_first_epoch_over_alpha():
    # E_opt = 1.0 at index 2; GL = 3% at 3, 4.9% at 4, 5.1% at 5 -> stop at 5 with alpha=5
    curve = [2.0, 1.5, 1.0, 1.03, 1.049, 1.051, 0.9]
    d = replay("gl", curve, alpha=5)
    assert (d.stop_epoch, d.best_epoch) == (5, 2)
    assert replay("gl", curve, alpha=5.2).stop_epoch == 6  # never fires: last index
    assert not replay("gl", curve, alpha=5.2).stopped


def test_gl_max_mode_uses_relative_degradation():
    acc = [0.5, 0.8, 0.79, 0.75]  # 100 * (0.8 / 0.75 - 1) = 6.7
    assert replay("gl", acc, alpha=5, mode="max").stop_epoch == 3
    assert replay("gl", acc, alpha=7, mode="max").stop_epoch == 3 and not replay(
        "gl", acc, alpha=7, mode="max").stopped


def test_gl_rejects_non_positive_values():
    with pytest.raises(ValueError, match="positive"):
        replay("gl", [1.0, -0.5])


# ---------------------------------------------------------------------------- Prechelt PQ
def test_pq_checks_only_at_strip_ends_with_training_progress():
    val = [1.0, 0.8, 0.7, 0.6, 0.5, 0.52, 0.53, 0.54, 0.55, 0.56]
    # strip 2 (indices 5..9): train losses nearly flat -> tiny progress, large GL/P_k
    train = [1.0, 0.8, 0.6, 0.5, 0.4, 0.300, 0.300, 0.300, 0.300, 0.303]
    rule = PQRule(alpha=0.5, k=5)
    d = replay(rule, val, train)
    # P_5 at index 9 = 1000*(1.503/(5*0.3) - 1) = 2; GL = 12 -> PQ = 6 > 0.5
    assert d.stop_epoch == 9 and d.best_epoch == 4
    assert rule.pk == pytest.approx(2.0)
    assert rule.pq == pytest.approx(12.0 / 2.0)
    # first strip end (index 4) has GL = 0 -> no stop; with strong progress PQ stays small
    fast = [1.0, 0.8, 0.6, 0.5, 0.4, 0.35, 0.3, 0.25, 0.2, 0.1]
    assert not replay(PQRule(alpha=0.5, k=5), val, fast).stopped  # PQ = 12/~380


def test_pq_needs_train_curve():
    with pytest.raises(ValueError, match="training curve"):
        replay("pq", [1.0, 0.5])


# ---------------------------------------------------------------------------- Prechelt UP
def test_up_counts_successive_rising_strips():
    k = 2
    # strip ends at indices 1, 3, 5, 7, 9: values 1.0, 0.8, 0.9, 1.0, 1.1
    val = [1.2, 1.0, 0.9, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1]
    assert replay("up", val, s=1, k=k).stop_epoch == 5
    assert replay("up", val, s=2, k=k).stop_epoch == 7
    assert replay("up", val, s=3, k=k).stop_epoch == 9
    assert not replay("up", val, s=4, k=k).stopped


def test_up_resets_when_a_strip_improves():
    val = [1.0, 1.1, 1.0, 1.2, 0.5, 0.6, 0.7]  # k=1: up, down, up, down, up, up
    assert replay("up", val, s=2, k=1).stop_epoch == 6


# ---------------------------------------------------------------------------- common
def test_warmup_blocks_decisions_but_tracks_best():
    curve = [1.0, 0.5, 2.0, 3.0, 4.0]
    assert replay("gl", curve, alpha=5).stop_epoch == 2
    d = replay("gl", curve, alpha=5, warmup=4)
    assert d.stop_epoch == 4 and d.best_epoch == 1


def test_non_finite_value_stops_at_once():
    d = replay("patience", [1.0, 0.5, math.nan, 0.1], patience=10)
    assert d.stop_epoch == 2 and d.best_epoch == 1 and "nan" in d.reason


def test_make_rule_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="^rule=plateau is not allowed; allowed: known stopping rule "
                                         "names: curvature, evidence, forecast, gl, learned, patience, pq, "
                                         "quadratic, se_slope, up$"):
        make_rule("plateau")
    with pytest.raises(ValueError, match="allowed: min, max"):
        make_rule("gl", mode="down")
    with pytest.raises(ValueError, match="window"):
        make_rule("quadratic", window=2)
    with pytest.raises(ValueError, match="p_stop"):
        make_rule("curvature", p_stop=1.5)
    with pytest.raises(ValueError, match="fit_window"):
        make_rule("forecast", fit_window=3)


@pytest.mark.parametrize("name,kw", [("patience", {}), ("gl", {}), ("up", {"k": 2}),
                                      ("curvature", {}), ("pq", {}), ("quadratic", {}),
                                      ("se_slope", {}), ("forecast", {}), ("learned", {})])
@pytest.mark.parametrize("with_se", [False, True])
def test_state_dict_resume_continues_same_decision(name, kw, with_se):
    import json

    r = random.Random(3)
    val = [1 / (1 + 0.2 * t) + 0.002 * t * t / 50 + r.gauss(0, 0.01) for t in range(80)]
    tr = [1 / (1 + 0.3 * t) for t in range(80)]
    se = [0.01] * 80 if with_se else None
    full = replay(name, val, tr, val_se=se, **kw)
    assert full.stopped or name in ("gl", "pq")  # the curve has a clear minimum near t = 25
    a = make_rule(name, **kw)
    for t in range(20):
        a.update(val[t], tr[t], None if se is None else se[t])
    b = make_rule(name, **kw)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # survives a JSON round trip
    stop = None
    for t in range(20, 80):
        if b.update(val[t], tr[t], None if se is None else se[t]):
            stop = t
            break
    assert stop == (full.stop_epoch if full.stopped else None)
    assert b.best_epoch == full.best_epoch


# ---------------------------------------------------------------------------- quadratic (v1)
def test_local_quadratic_fit_recovers_slope_and_curvature():
    ys = [3.0 + 0.5 * x + 0.25 * x * x for x in range(-9, 1)]  # newest x = 0
    fit = local_quadratic_fit(ys, half_life=4)
    assert fit.value == pytest.approx(3.0)
    assert fit.slope == pytest.approx(0.5)
    assert fit.curvature == pytest.approx(0.5)
    assert fit.se_slope == pytest.approx(0.0, abs=1e-9)
    r = random.Random(0)
    noisy = local_quadratic_fit([y + r.gauss(0, 0.1) for y in ys], half_life=None)
    assert noisy.se_slope > 0.01
    assert abs(noisy.slope - 0.5) < 4 * noisy.se_slope


def _u_curve(seed: int, n: int = 100, t_min: int = 35, noise: float = 0.01,
             amp: float = 0.4) -> list[float]:
    r = random.Random(seed)
    return [0.3 + amp * ((t - t_min) / t_min) ** 2 + r.gauss(0, noise) for t in range(n)]


def _resolvable(amp: float, noise: float, t_min: int = 35) -> float:
    """Half-width of the bottom of the U within one noise sd of the minimum: inside it, which
    epoch is 'the minimum' is not resolvable from the data."""
    return t_min * math.sqrt(noise / amp)


@pytest.mark.parametrize("seed", range(10))
def test_quadratic_stops_after_the_minimum_of_a_noisy_u(seed):
    tol = _resolvable(0.4, 0.01)  # ~5.5 epochs
    d = replay("quadratic", _u_curve(seed))
    assert d.stopped and 35 - tol <= d.stop_epoch <= 60, d
    assert abs(d.best_epoch - 35) <= 2 * tol  # within 4 noise sd of the minimum


@pytest.mark.parametrize("seed", range(10))
def test_quadratic_stops_just_after_a_sharp_minimum(seed):
    tol = _resolvable(1.0, 0.002)  # ~1.6 epochs
    d = replay("quadratic", _u_curve(seed, noise=0.002, amp=1.0))
    assert d.stopped and 35 <= d.stop_epoch <= 45, d
    assert abs(d.best_epoch - 35) <= tol + 1


@pytest.mark.parametrize("seed", range(10))
def test_quadratic_stops_on_the_plateau_of_a_decreasing_curve(seed):
    r = random.Random(seed)
    curve = [0.2 + 1.5 * math.exp(-t / 6) + r.gauss(0, 0.002) for t in range(150)]
    d = replay("quadratic", curve)
    # the exponential has < 1% of the plateau value left after t ~ 6*ln(1.5/0.002) = 40
    assert d.stopped and 25 <= d.stop_epoch <= 110, d


@pytest.mark.parametrize("seed", range(10))
def test_quadratic_does_not_stop_in_warmup_on_pure_noise(seed):
    r = random.Random(seed)
    rule = QuadraticRule()
    curve = [1.0 + r.gauss(0, 0.05) for _ in range(60)]
    d = replay(rule, curve)
    assert d.stop_epoch >= rule.warmup


def test_quadratic_max_mode_mirrors_min_mode():
    loss = _u_curve(1)
    d_min = replay("quadratic", loss)
    d_max = replay("quadratic", [2.0 - v for v in loss], mode="max", log=False)
    d_lin = replay("quadratic", loss, log=False)
    assert (d_max.stop_epoch, d_max.best_epoch) == (d_lin.stop_epoch, d_lin.best_epoch)
    assert d_min.stopped


def test_quadratic_trace_logs_smoothed_slope_curvature():
    d = replay("quadratic", _u_curve(2), trace=True)
    row = d.trace[-1]
    assert set(row) >= {"smoothed", "slope", "curvature"}
    assert row["slope"] > 0 and abs(row["smoothed"] - _u_curve(2)[d.stop_epoch]) < 0.05


def test_rules_share_the_interface():
    for cls in (PatienceRule, GLRule, UPRule, QuadraticRule, SESlopeRule, ForecastRule,
                LearnedRule, CurvatureRule):
        rule = cls()
        assert not rule.update(1.0)
        assert rule.best_epoch == 0 and isinstance(rule.diagnostics(), dict)


# ---------------------------------------------------------------------------- measured noise
def test_local_fit_with_measured_sigma_uses_it_for_the_errors():
    import numpy as np

    ys = [1.0 + 0.1 * x + 0.02 * x * x for x in range(-7, 1)]
    r = random.Random(1)
    noisy = [y + r.gauss(0, 0.05) for y in ys]
    fit = local_quadratic_fit(noisy, half_life=None, sigma=[0.2] * 8)
    xs = np.arange(-7, 1, dtype=float)
    a = np.stack([np.ones(8), xs, 0.5 * xs * xs], axis=1)
    cov = 0.2 ** 2 * np.linalg.inv(a.T @ a)  # uniform weights, known noise
    assert fit.se_slope == pytest.approx(math.sqrt(cov[1, 1]))
    assert fit.se_curvature == pytest.approx(math.sqrt(cov[2, 2]))
    # the residual-based errors differ (the true scatter is 0.05, not 0.2)
    assert local_quadratic_fit(noisy, half_life=None).se_slope < 0.5 * fit.se_slope


def test_se_slope_rule_reads_standard_errors_and_falls_back_without():
    curve = _u_curve(4)
    with_se = SESlopeRule()
    replay(with_se, curve, val_se=[0.05] * len(curve))
    without = replay("se_slope", curve)
    same = replay(QuadraticRule(**{k: v for k, v in SESlopeRule.DEFAULTS.items() if k != "noise"}),
                  curve)
    assert (without.stop_epoch, without.best_epoch) == (same.stop_epoch, same.best_epoch)
    # a 5x larger measured noise makes the 'minimum passed' test more cautious: no earlier stop
    assert with_se.stopped_epoch is None or with_se.stopped_epoch >= without.stop_epoch


# ---------------------------------------------------------------------------- forecast
def test_forecast_curve_finds_the_minimum_of_decay_plus_drift():
    # y = 1 + exp(-s/8) + 0.01 s: minimum at s* = 8 ln(12.5) = 20.2, seen up to s = 15
    ys = [1 + math.exp(-s / 8) + 0.01 * s for s in range(16)]
    fc = forecast_curve(ys, None, horizon=20, min_delta=0.0)
    assert fc.timescale == 8.0
    assert fc.epochs_left == pytest.approx(20.2 - 15, abs=0.6)
    assert fc.minimum == pytest.approx(1 + math.exp(-20.2 / 8) + 0.202, abs=1e-4)
    assert fc.improvement > 0 and fc.p_improve == 1.0  # exact fit: no uncertainty
    assert forecast_curve(ys[:5], None, 10, 0.0) is None


def test_forecast_interval_widens_with_measured_noise():
    r = random.Random(0)
    ys = [1 + math.exp(-s / 8) + 0.01 * s + r.gauss(0, 0.002) for s in range(30)]
    small = forecast_curve(ys, [0.002] * 30, horizon=15, min_delta=0.005)
    big = forecast_curve(ys, [0.05] * 30, horizon=15, min_delta=0.005)
    assert big.sd_minimum > 5 * small.sd_minimum


def test_forecast_rule_stops_after_a_u_and_logs_its_forecast():
    d = replay("forecast", _u_curve(0), trace=True)
    assert d.stopped and 35 <= d.stop_epoch <= 70 and abs(d.best_epoch - 35) <= 11
    row = d.trace[-1]
    assert row["forecast_lo"] <= row["forecast_min"] <= row["forecast_hi"]
    assert row["epochs_left"] >= 0 and 0 <= row["p_improve"] < ForecastRule().p_stop


@pytest.mark.parametrize("seed", range(3))
def test_forecast_rule_goes_on_while_the_curve_still_falls(seed):
    r = random.Random(seed)
    curve = [0.2 + 1.5 * math.exp(-t / 40) + r.gauss(0, 0.002) for t in range(60)]
    assert not replay("forecast", curve).stopped


# ---------------------------------------------------------------------------- learned / default
def test_curve_features_are_scale_free():
    r = random.Random(2)
    val = [0.5 + 1 / (1 + 0.1 * t) + r.gauss(0, 0.01) for t in range(40)]
    tr = [1 / (1 + 0.2 * t) for t in range(40)]
    se = [0.02] * 40
    best = min(range(40), key=val.__getitem__)
    f1 = curve_features(val, tr, se, best)
    f2 = curve_features([3 * v for v in val], [3 * v for v in tr], [3 * e for e in se], best)
    assert set(f1) == set(FEATURES)
    for k in FEATURES:
        assert f1[k] == pytest.approx(f2[k], rel=1e-9, abs=1e-12), k
    f3 = curve_features(val, tr, [], best)  # no standard errors: the residual scatter instead
    assert f3["gain_half_noise"] != pytest.approx(f1["gain_half_noise"])


def test_learned_rule_uses_its_coefficients():
    curve = _u_curve(5)
    # a constant logit of -10 (p ~ 5e-5) stops at the first decision after warm-up
    stop_now = {k: 0.0 for k in FEATURES} | {"bias": -10.0}
    d = replay(LearnedRule(coef=stop_now, warmup=5), curve)
    assert d.stop_epoch == 5
    never = {k: 0.0 for k in FEATURES} | {"bias": 10.0}
    assert not replay(LearnedRule(coef=never), curve).stopped
    with pytest.raises(ValueError, match="unknown features"):
        LearnedRule(coef={"curvature_of_moon": 1.0})
    with pytest.raises(ValueError, match="mode"):
        LearnedRule(mode="max")


def test_default_rule_is_the_tuned_learned_rule():
    rule = make_rule("curvature")
    assert isinstance(rule, LearnedRule) and rule.name == "curvature"
    assert rule.coef == LEARNED_COEF and any(v != 0 for v in LEARNED_COEF.values())


@pytest.mark.parametrize("seed", range(5))
def test_default_rule_stops_after_the_minimum_with_or_without_extras(seed):
    val = _u_curve(seed)
    train = [1 / (1 + 0.2 * t) for t in range(len(val))]
    for kwargs in ({}, {"train_loss": train}, {"train_loss": train, "val_se": [0.01] * len(val)}):
        d = replay("curvature", val, **kwargs)
        assert d.stopped and 35 <= d.stop_epoch <= 75, (kwargs.keys(), d)
        assert abs(d.best_epoch - 35) <= 2 * _resolvable(0.4, 0.01)


@pytest.mark.parametrize("seed", range(3))
def test_default_rule_does_not_stop_early_on_a_long_descent(seed):
    r = random.Random(seed)
    curve = [0.2 + 1.5 * math.exp(-t / 40) + r.gauss(0, 0.002) for t in range(60)]
    d = replay("curvature", curve)
    assert d.stop_epoch >= 30, d


def test_default_rule_stop_reason_quotes_the_forecast():
    d = replay("curvature", _u_curve(1), trace=True)
    assert "forecast minimum" in d.reason and "epochs" in d.reason
    assert {"p_continue", "forecast_min", "forecast_lo", "forecast_hi", "epochs_left"} <= set(
        d.trace[-1])


def test_replay_checks_the_standard_errors_length():
    with pytest.raises(ValueError, match="val_se has 2 epochs"):
        replay("curvature", [1.0, 0.9, 0.8], val_se=[0.1, 0.1])
