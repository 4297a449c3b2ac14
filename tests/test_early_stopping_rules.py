"""Stopping rules on hand-made curves whose stop epoch is known (pure Python, fast)."""
from __future__ import annotations

import math
import random

import pytest

from callbacks.early_stopping import (CurvatureRule, GLRule, PatienceRule, PQRule, UPRule,
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
    with pytest.raises(ValueError, match="allowed: curvature, patience, gl, pq, up"):
        make_rule("plateau")
    with pytest.raises(ValueError, match="allowed: min, max"):
        make_rule("gl", mode="down")
    with pytest.raises(ValueError, match="window"):
        make_rule("curvature", window=2)


@pytest.mark.parametrize("name,kw", [("patience", {}), ("gl", {}), ("up", {"k": 2}),
                                      ("curvature", {}), ("pq", {})])
def test_state_dict_resume_continues_same_decision(name, kw):
    r = random.Random(3)
    val = [1 / (1 + 0.2 * t) + 0.002 * t * t / 50 + r.gauss(0, 0.01) for t in range(80)]
    tr = [1 / (1 + 0.3 * t) for t in range(80)]
    full = replay(name, val, tr, **kw)
    a = make_rule(name, **kw)
    for t in range(20):
        a.update(val[t], tr[t])
    b = make_rule(name, **kw)
    b.load_state_dict(a.state_dict())
    stop = None
    for t in range(20, 80):
        if b.update(val[t], tr[t]):
            stop = t
            break
    assert stop == (full.stop_epoch if full.stopped else None)
    assert b.best_epoch == full.best_epoch


# ---------------------------------------------------------------------------- curvature
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
def test_curvature_stops_after_the_minimum_of_a_noisy_u(seed):
    tol = _resolvable(0.4, 0.01)  # ~5.5 epochs
    d = replay("curvature", _u_curve(seed))
    assert d.stopped and 35 - tol <= d.stop_epoch <= 60, d
    assert abs(d.best_epoch - 35) <= 2 * tol  # within 4 noise sd of the minimum


@pytest.mark.parametrize("seed", range(10))
def test_curvature_stops_just_after_a_sharp_minimum(seed):
    tol = _resolvable(1.0, 0.002)  # ~1.6 epochs
    d = replay("curvature", _u_curve(seed, noise=0.002, amp=1.0))
    assert d.stopped and 35 <= d.stop_epoch <= 45, d
    assert abs(d.best_epoch - 35) <= tol + 1


@pytest.mark.parametrize("seed", range(10))
def test_curvature_stops_on_the_plateau_of_a_decreasing_curve(seed):
    r = random.Random(seed)
    curve = [0.2 + 1.5 * math.exp(-t / 6) + r.gauss(0, 0.002) for t in range(150)]
    d = replay("curvature", curve)
    # the exponential has < 1% of the plateau value left after t ~ 6*ln(1.5/0.002) = 40
    assert d.stopped and 25 <= d.stop_epoch <= 110, d


@pytest.mark.parametrize("seed", range(10))
def test_curvature_does_not_stop_in_warmup_on_pure_noise(seed):
    r = random.Random(seed)
    rule = CurvatureRule()
    curve = [1.0 + r.gauss(0, 0.05) for _ in range(60)]
    d = replay(rule, curve)
    assert d.stop_epoch >= rule.warmup


def test_curvature_max_mode_mirrors_min_mode():
    loss = _u_curve(1)
    d_min = replay("curvature", loss)
    d_max = replay("curvature", [2.0 - v for v in loss], mode="max", log=False)
    d_lin = replay("curvature", loss, log=False)
    assert (d_max.stop_epoch, d_max.best_epoch) == (d_lin.stop_epoch, d_lin.best_epoch)
    assert d_min.stopped


def test_curvature_trace_logs_smoothed_slope_curvature():
    d = replay("curvature", _u_curve(2), trace=True)
    row = d.trace[-1]
    assert set(row) >= {"smoothed", "slope", "curvature"}
    assert row["slope"] > 0 and abs(row["smoothed"] - _u_curve(2)[d.stop_epoch]) < 0.05


def test_rules_share_the_interface():
    for cls in (PatienceRule, GLRule, UPRule, CurvatureRule):
        rule = cls()
        assert not rule.update(1.0)
        assert rule.best_epoch == 0 and isinstance(rule.diagnostics(), dict)
