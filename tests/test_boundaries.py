"""Boundaries and properties: splits, label-noise counts and seeds, config range bounds, every
stopping rule exactly at its thresholds, BN momentum at 0 / 1 / None, and the Hessian probes on
indefinite, negative-definite and degenerate Hessians.

Why: the plausible bugs these catch (``round`` vs ``int``, ``>`` vs ``>=``, a fraction of the
wrong set, a check at the wrong epoch of a strip, an eigenvalue that lost its sign) all pass
tests that only try comfortable mid-range values.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from shiftlab.callbacks.stopping_rules import make_rule, replay, training_progress
from shiftlab.callbacks.hessian import hessian_vector_product, hutchinson_trace, top_hessian_eigenvalue
from shiftlab.trainers.config_checks import ConfigError, check_config
from shiftlab.trainers.data.base import TensorDataModule
from shiftlab.trainers.data.label_noise import corrupt_labels
from shiftlab.trainers.norms._bn_common import StatBatchNorm
from shiftlab.trainers.norms.batch_renorm import BatchRenorm, renorm_limits
from shiftlab.trainers.norms.ghost_bn import GhostBatchNorm

FAST = settings(max_examples=40, deadline=None)


# =========================================================================== data splits
class _Pool(TensorDataModule):
    """``x`` is the sample's index in the pool, so every split can be traced back."""

    name = "pool"

    def __init__(self, n: int, fixed_test: int = 0, **kw) -> None:
        super().__init__(standardize=False, **kw)
        self.n, self.fixed_test = n, fixed_test

    def load(self) -> tuple:
        x = torch.arange(self.n, dtype=torch.float32)[:, None]
        y = torch.arange(self.n) % 3
        if self.fixed_test:
            xt = -1 - torch.arange(self.fixed_test, dtype=torch.float32)[:, None]
            return x, y, xt, torch.arange(self.fixed_test) % 3
        return x, y


def _ids(split) -> set[int]:
    return {int(v) for v in split.x[:, 0]}


def test_train_fraction_takes_its_fraction_of_the_training_split_not_of_the_pool():
    full, half = _Pool(1000, seed=3), _Pool(1000, seed=3, train_fraction=0.5)
    full.setup(), half.setup()
    # pool 1000: test round(0.2*1000)=200, val 100, training split 700 -> half of it is 350, not 500
    assert (len(full.test_set), len(full.val_set), len(full.train_set)) == (200, 100, 700)
    assert (len(half.test_set), len(half.val_set), len(half.train_set)) == (200, 100, 350)
    assert _ids(half.train_set) <= _ids(full.train_set)  # a subset of the training split
    assert _ids(half.val_set) == _ids(full.val_set) and _ids(half.test_set) == _ids(full.test_set)


@FAST
@given(n=st.integers(4, 400), val=st.floats(0.01, 0.45), test=st.floats(0.0, 0.45),
       frac=st.floats(0.001, 1.0), seed=st.integers(0, 2**16))
def test_split_sizes_and_disjointness(n, val, test, frac, seed):
    dm = _Pool(n, val_fraction=val, test_fraction=test, train_fraction=frac, seed=seed)
    n_test, n_val = int(round(test * n)), int(round(val * n))
    if n - n_test - n_val < 1:
        return
    dm.setup()
    n_train = n - n_test - n_val
    expected = n_train if frac >= 1.0 else max(1, int(round(frac * n_train)))
    assert (len(dm.test_set), len(dm.val_set), len(dm.train_set)) == (n_test, n_val, expected)
    tr, va, te = _ids(dm.train_set), _ids(dm.val_set), _ids(dm.test_set)
    assert not (tr & va or tr & te or va & te)
    assert tr | va | te <= set(range(n))
    if frac >= 1.0:
        assert tr | va | te == set(range(n))
    # labels travel with their samples
    assert torch.equal(dm.train_set.y, dm.train_set.x[:, 0].long() % 3)


def test_fixed_test_set_is_not_carved_from_the_pool():
    dm = _Pool(200, fixed_test=30, val_fraction=0.25, train_fraction=0.5, seed=1)
    dm.setup()
    assert len(dm.test_set) == 30 and _ids(dm.test_set) == set(range(-30, 0))
    assert len(dm.val_set) == 50 and len(dm.train_set) == 75  # half of 200 - 50


def test_split_is_seeded():
    a, b, c = _Pool(100, seed=1), _Pool(100, seed=1), _Pool(100, seed=2)
    for d in (a, b, c):
        d.setup()
    assert torch.equal(a.train_set.x, b.train_set.x)
    assert not torch.equal(a.train_set.x, c.train_set.x)


def test_standardization_uses_training_split_statistics_only():
    class Gauss(_Pool):
        def load(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(300, 3, generator=g) * torch.tensor([1.0, 5.0, 0.0]) + torch.tensor([2.0, -1.0, 7.0])
            x[:, 2] = 7.0  # constant feature: only centred (std replaced by 1)
            return x, torch.arange(300) % 3

    raw, std = Gauss(300, seed=0), Gauss(300, seed=0)
    std.standardize = True
    raw.setup(), std.setup()
    mean, sd = raw.train_set.x.mean(0), raw.train_set.x.std(0)
    sd = torch.where(sd < 1e-3, torch.ones_like(sd), sd)
    for split in ("train_set", "val_set", "test_set"):
        torch.testing.assert_close(getattr(std, split).x, (getattr(raw, split).x - mean) / sd)
    torch.testing.assert_close(std.train_set.x[:, :2].std(0), torch.ones(2))


# =========================================================================== label noise
@pytest.mark.parametrize("rate,count", [(0.05, 0), (0.15, 2), (0.25, 2), (0.35, 4), (0.45, 4), (0.55, 6),
                                        (0.65, 6), (0.95, 10)])
def test_label_noise_count_of_ten_labels_is_pythons_round(rate, count):
    """Documented: exactly ``round(rate * n)`` corrupted, Python's round (half to even), so
    0.35 of 10 labels corrupts 4 and 0.25 of 10 corrupts 2."""
    y = torch.arange(10) % 4
    noisy, mask = corrupt_labels(y, rate, 4, seed=0)
    assert int(mask.sum()) == count
    assert torch.equal(noisy != y, mask)


@FAST
@given(n=st.integers(1, 500), rate=st.floats(0.0, 0.999), k=st.integers(2, 12), seed=st.integers(0, 2**31))
def test_label_noise_properties(n, rate, k, seed):
    y = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed % 1000))
    noisy, mask = corrupt_labels(y, rate, k, seed)
    assert int(mask.sum()) == round(rate * n)
    assert torch.equal(noisy != y, mask)  # corrupted labels really changed, the others did not
    assert int(noisy.min()) >= 0 and int(noisy.max()) < k
    again, mask2 = corrupt_labels(y, rate, k, seed)
    assert torch.equal(again, noisy) and torch.equal(mask, mask2)
    assert torch.equal(y, y.clone())  # input not modified in place


def test_label_noise_masks_differ_across_seeds():
    y = torch.arange(100) % 10
    masks = [corrupt_labels(y, 0.3, 10, seed=s)[1] for s in range(20)]
    for i in range(20):
        for j in range(i):
            assert not torch.equal(masks[i], masks[j]), (i, j)


def test_label_noise_draws_every_other_class_uniformly():
    k, n = 4, 6000
    y = torch.arange(n) % k
    noisy, mask = corrupt_labels(y, 0.5, k, seed=7)
    shift = ((noisy - y) % k)[mask]
    counts = torch.bincount(shift, minlength=k).double()
    assert counts[0] == 0
    expected = mask.sum().double() / (k - 1)
    sd = math.sqrt(float(expected) * (1 - 1 / (k - 1)))
    assert (counts[1:] - expected).abs().max() < 5 * sd


def test_label_noise_edge_rates_and_classes():
    y = torch.tensor([0, 1, 0, 1])
    noisy, mask = corrupt_labels(y, 0.0, 2, 0)
    assert not mask.any() and torch.equal(noisy, y)
    noisy, mask = corrupt_labels(torch.zeros(5, dtype=torch.long), 0.6, 1, 0)  # one class: nothing to flip to
    assert not mask.any()
    noisy, mask = corrupt_labels(y, 0.9, 2, 0)  # two classes: a flip is the other class
    assert int(mask.sum()) == 4 and torch.equal(noisy, 1 - y)
    for bad in (-0.01, 1.0):
        with pytest.raises(ValueError, match="label_noise"):
            corrupt_labels(y, bad, 2, 0)


def test_datamodule_label_noise_is_seeded_per_run_seed():
    masks = []
    for seed in (0, 1, 0):
        dm = _Pool(200, seed=seed, label_noise=0.35)
        dm.setup()
        ts = dm.train_set
        assert int(ts.corrupted.sum()) == round(0.35 * len(ts)) == 49  # 140 training samples
        assert torch.equal(ts.y != ts.y_true, ts.corrupted)
        masks.append(ts.corrupted)
        assert dm.describe()["corrupted"] == 49
    assert torch.equal(masks[0], masks[2]) and not torch.equal(masks[0], masks[1])


# =========================================================================== config range bounds
BOUNDS = [  # key, accepted values (the bounds themselves where inclusive), rejected values
    ("seed", [0, 7], [-1, 1.5, True]),
    ("torch_threads", [1], [0]),
    ("optimizer.lr", [1e-12, 3.0], [0, 0.0, -1e-3]),
    ("optimizer.weight_decay", [0, 0.0], [-1e-12]),
    ("optimizer.momentum", [0, 0.0, 0.999999], [1, 1.0, -1e-12, 1.2]),
    ("optimizer.max_iter", [1], [0, 1.5]),
    ("data.label_noise", [0, 0.0, 0.999], [1.0, -0.01]),
    ("data.val_fraction", [1e-9, 0.999], [0, 0.0, 1.0]),
    ("data.test_fraction", [0, 0.0, 0.999], [1.0, -0.1]),
    ("data.train_fraction", [1e-9, 1, 1.0], [0, 0.0, 1.0001]),
    ("data.num_workers", [0], [-1]),
    ("batching.batch_size", [1], [0, 2.0]),
    ("batching.chunk_size", [1], [0]),
    ("batching.clip_grad_norm", [None, 1e-9], [0, 0.0, -1.0]),
    ("batching.grad_norm_penalty", [0, 0.0], [-1e-9]),
    ("batching.grad_penalty_eps", [1e-9], [0, 0.0]),
    ("trainer.max_epochs", [1, -1], [0, -2]),
    ("trainer.devices", ["auto", 1, -1, "0,1"], [0, -2]),
    ("trainer.num_nodes", [1], [0]),
    ("model.dropout", [0, 0.0, 0.999], [1.0, -0.1]),
    ("cluster_env", ["auto", "kubeflow", "none"], ["slurm"]),
    ("optimized_metric_mode", ["min", "max"], ["up"]),
]


def _cfg(key: str, value) -> OmegaConf:
    cfg = OmegaConf.create({})
    OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


@pytest.mark.parametrize("key,ok,bad", BOUNDS, ids=[b[0] for b in BOUNDS])
def test_config_range_bounds(key, ok, bad):
    for v in ok:
        check_config(_cfg(key, v))
    for v in bad:
        with pytest.raises(ConfigError) as err:
            check_config(_cfg(key, v))
        msg = str(err.value)
        assert msg.startswith(f"{key}=") and "not allowed; allowed:" in msg and "\n" not in msg, msg


def test_config_devices_list_of_ids_is_accepted():
    check_config(_cfg("trainer.devices", [0, 1]))
    with pytest.raises(ConfigError, match=r"^trainer\.devices=\[\] is not allowed"):
        check_config(_cfg("trainer.devices", []))


def test_config_missing_keys_are_skipped_and_sync_batchnorm_rules():
    check_config(OmegaConf.create({}))
    bn = {"_target_": "shiftlab.trainers.norms.batchnorm.build", "_partial_": True}
    ghost = {"_target_": "shiftlab.trainers.norms.ghost_bn.build", "_partial_": True}
    check_config(OmegaConf.create({"trainer": {"sync_batchnorm": True}, "norm": bn}))
    with pytest.raises(ConfigError, match="trainer.sync_batchnorm=true is not allowed with norm=ghost_bn"):
        check_config(OmegaConf.create({"trainer": {"sync_batchnorm": True}, "norm": ghost}))
    with pytest.warns(FutureWarning):  # a saved config in the old form: the name decides
        from shiftlab.trainers.registry import _warned

        _warned.clear()
        check_config(OmegaConf.create({"trainer": {"sync_batchnorm": True}, "norm": {"name": "batchnorm"}}))
    with pytest.raises(ConfigError, match="on CPU"):
        check_config(OmegaConf.create({"trainer": {"sync_batchnorm": True, "accelerator": "cpu"}}))
    check_config(OmegaConf.create({"trainer": {"sync_batchnorm": False, "accelerator": "cpu"}, "norm": {"name": "x"}}))


# =========================================================================== stopping rules
# Values below are exact in binary floating point, so each rule sits *exactly* on its threshold.
def _stop(name: str, val, train=None, **kw) -> int | None:
    """The epoch the rule stops after, or None when it never fires (``replay`` then reports the
    last index, which a test must not mistake for a stop there)."""
    d = replay(name, val, train, **kw)
    return d.stop_epoch if d.stopped else None


def test_gl_at_alpha_zero_needs_a_strict_rise():
    assert not replay("gl", [1.0, 1.0, 1.0, 1.0], alpha=0.0).stopped  # GL = 0 is not > 0
    d = replay("gl", [1.0, 0.5, 0.5, 0.5000001], alpha=0.0)
    assert (d.stopped, d.stop_epoch, d.best_epoch) == (True, 3, 1)


def test_gl_exactly_at_alpha_does_not_stop():
    curve = [1.0, 0.5, 0.53125]  # GL = 100 * (0.53125 / 0.5 - 1) = 6.25 exactly
    assert not replay("gl", curve, alpha=6.25).stopped
    assert _stop("gl", curve, alpha=6.2499) == 2
    acc = [0.5, 0.75, 0.5]  # max mode: 100 * (0.75 / 0.5 - 1) = 50
    assert not replay("gl", acc, alpha=50.0, mode="max").stopped
    assert _stop("gl", acc, alpha=49.99, mode="max") == 2
    rule = make_rule("gl", alpha=6.2499)
    replay(rule, curve)
    assert rule.gl == 6.25


def test_gl_warmup_boundary():
    curve = [1.0, 2.0, 2.0, 2.0]
    assert _stop("gl", curve, alpha=5, warmup=2) == 2  # first epoch allowed to decide
    assert _stop("gl", curve, alpha=5, warmup=1) == 1
    assert _stop("gl", curve, alpha=5, warmup=0) == 1


def test_training_progress_closed_form():
    assert training_progress([9.0, 1.0, 1.0, 1.0, 2.0], 4) == 250.0  # 1000 * (5 / (4 * 1) - 1)
    assert training_progress([3.0, 3.0], 2) == 0.0
    assert training_progress([1.0, 0.0, 2.0], 3) == math.inf
    assert training_progress([0.0, 0.0], 2) == 0.0
    assert training_progress([4.0, 2.0], 5) == pytest.approx(1000 * (6 / 4 - 1))  # short history: its length


PQ_VAL = [1.0, 0.5, 0.6, 0.53125]  # strip end at epoch 3: GL = 6.25
PQ_TRAIN = [1.0, 1.0, 1.0, 2.0]  # P_4 = 1000 * (5 / 4 - 1) = 250 -> PQ = 0.025


def test_pq_exactly_at_alpha_does_not_stop():
    assert not replay("pq", PQ_VAL, PQ_TRAIN, alpha=0.025, k=4).stopped
    d = replay("pq", PQ_VAL, PQ_TRAIN, alpha=0.0249, k=4)
    assert (d.stopped, d.stop_epoch, d.best_epoch) == (True, 3, 1)


def test_pq_decides_only_at_strip_ends_never_mid_strip():
    k = 4
    # GL/P_k would be huge at every epoch of the second strip (4..7); only epoch 7 may decide
    val = [1.0, 0.5, 0.5, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9]
    train = [1.0, 0.9, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7001, 0.7]
    assert _stop("pq", val, train, alpha=0.5, k=k) == 7
    # the condition holds mid-strip (epochs 4-6) but not at the strip end (val back at its best)
    val2 = [1.0, 0.5, 0.5, 0.5, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5]
    train2 = [1.0, 0.9, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7001, 0.7, 0.7, 0.7, 0.7]
    assert not replay("pq", val2, train2, alpha=0.5, k=k).stopped
    # and the first strip end is a decision point too (epoch k - 1)
    assert _stop("pq", [0.5, 0.9, 0.9, 0.9], [1.0, 1.0, 1.0, 1.0001], alpha=0.5, k=k) == 3


def test_pq_zero_progress_and_zero_loss():
    # flat training strip: P_k = 0 -> PQ infinite when GL > 0, zero when GL = 0
    assert _stop("pq", [0.5, 0.6], [1.0, 1.0], alpha=100.0, k=2) == 1
    assert not replay("pq", [0.5, 0.5], [1.0, 1.0], alpha=0.0, k=2).stopped
    rule = make_rule("pq", alpha=0.0, k=2)
    replay(rule, [0.5, 0.6], [0.0, 1.0])  # P_k infinite -> PQ = 0
    assert rule.pk == math.inf and rule.pq == 0.0 and not rule.stopped


def test_pq_small_positive_progress_and_small_generalization_loss():
    # 0 < P_k <= 1: a real quotient (P_2 = 1000 * (2000.5 / 2000 - 1) = 0.25), not the P_k = 0 case
    val, train = [0.5, 0.50125], [1000.0, 1000.5]  # GL = 0.25 -> PQ = 1.0
    assert _stop("pq", val, train, alpha=1.01, k=2) is None
    assert _stop("pq", val, train, alpha=0.99, k=2) == 1
    # flat training strip (P_k = 0) with 0 < GL <= 1: PQ is infinite, not zero
    assert _stop("pq", [1.0, 1.005], [1.0, 1.0], alpha=1e6, k=2) == 1


def test_generalization_loss_needs_positive_values_in_both_modes():
    with pytest.raises(ValueError, match="positive"):
        replay("gl", [0.5, 0.0, 0.3], alpha=5.0, mode="max")  # a non-positive accuracy, best still positive
    with pytest.raises(ValueError, match="positive"):
        replay("gl", [0.5, -0.1], alpha=5.0, mode="max")
    with pytest.raises(ValueError, match="positive"):  # a zero best recorded during warm-up
        replay("pq", [0.0, 1.0, 1.0], [1.0, 1.0, 1.0], alpha=0.5, k=1, warmup=1)


def test_up_needs_strict_rises_at_strip_ends():
    assert not replay("up", [1.0, 1.0, 1.0, 1.0], s=1, k=1).stopped  # equal is not a rise
    assert _stop("up", [1.0, 1.0, 1.0000001], s=1, k=1) == 2
    assert _stop("up", [1.0, 1.1, 1.2], s=1, k=1) == 1  # the first comparison: epoch k with epoch 0
    # k=3: mid-strip spikes do not count; strip ends (2, 5, 8, 11) go 1.0, 0.9, 0.8, 0.7
    val = [2.0, 5.0, 1.0, 3.0, 4.0, 0.9, 9.0, 9.0, 0.8, 7.0, 7.0, 0.7]
    assert not replay("up", val, s=1, k=3).stopped
    # strip-end to strip-end comparisons: ends 1.0, 1.1, 1.2 -> two successive rises at epochs 5 and 8
    val = [0.1, 0.1, 1.0, 0.1, 0.1, 1.1, 0.1, 0.1, 1.2]
    assert _stop("up", val, s=2, k=3) == 8
    assert _stop("up", val, s=1, k=3) == 5
    assert not replay("up", val, s=3, k=3).stopped


def test_up_max_mode_counts_falls():
    acc = [0.5, 0.6, 0.55, 0.5]
    assert _stop("up", acc, s=2, k=1, mode="max") == 3
    assert not replay("up", [0.5, 0.6, 0.6, 0.7], s=1, k=1, mode="max").stopped


def test_patience_min_delta_is_strict():
    curve = [1.0, 0.75, 0.75]  # an improvement of exactly min_delta is not an improvement
    assert _stop("patience", curve, patience=1, min_delta=0.25) == 1
    assert _stop("patience", curve, patience=1, min_delta=0.2499) == 2
    assert _stop("patience", curve, patience=2, min_delta=0.25) == 2
    assert not replay("patience", [1.0, 0.75], patience=2, min_delta=0.25).stopped


def test_patience_zero_behaves_like_one_and_counts_ties_as_no_improvement():
    curve = [1.0, 0.5, 0.5, 0.4]
    assert _stop("patience", curve, patience=0) == 2
    assert _stop("patience", curve, patience=1) == 2
    assert _stop("patience", [0.5, 0.6, 0.7, 0.1, 0.2, 0.3], patience=2, mode="max") == 4
    d = replay("patience", [3.0, 2.0, 2.5, 2.6, 2.7], patience=3, warmup=4)
    assert (d.stopped, d.stop_epoch, d.best_epoch) == (True, 4, 1)  # wait counted through warm-up


CURV = dict(log=False, half_life=None, window=4, warmup=0, z=3.0, z_plateau=0.0, min_delta=0.005)
PARABOLA = [(t - 5) ** 2 + 1.0 for t in range(14)]  # noise-free: the fit is exact, se = 0


@pytest.mark.parametrize("behind,confirm,stop", [(2, 1, 7), (2, 3, 9), (3, 1, 8), (0, 1, 6), (0, 2, 7)])
def test_quadratic_rule_thresholds_on_an_exact_parabola(behind, confirm, stop):
    """Minimum at epoch 5; the fitted slope 2 (t - 5) is > 0 from epoch 6, the plateau test
    (remaining improvement 0 < min_delta) holds from epoch 5; both need the best epoch
    ``behind`` epochs back, and the rule stops once a condition held ``confirm`` epochs running."""
    d = replay("quadratic", PARABOLA, min_behind=behind, plateau_behind=max(behind, 1), confirm=confirm, **CURV)
    assert (d.stopped, d.stop_epoch, d.best_epoch) == (True, stop, 5)


def test_quadratic_rule_slope_and_remaining_on_the_parabola():
    rule = make_rule("quadratic", min_behind=99, plateau_behind=99, **CURV)
    rows = replay(rule, PARABOLA[:5], trace=True).trace
    assert rows[4]["slope"] == pytest.approx(-2.0, abs=1e-9)  # d/dt (t - 5)^2 at t = 4
    assert rows[4]["curvature"] == pytest.approx(2.0, abs=1e-9)
    assert rows[4]["remaining"] == pytest.approx(2.0, abs=1e-9)  # slope^2 / curvature = 4 / 2
    assert rows[4]["smoothed"] == pytest.approx(2.0, abs=1e-9)
    rule = make_rule("quadratic", min_behind=99, plateau_behind=99, lookahead=0.5, **CURV)
    assert replay(rule, PARABOLA[:5], trace=True).trace[4]["remaining"] == pytest.approx(1.0)  # linear cap


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_every_rule_stops_on_non_finite(bad):
    for name, kw in (("patience", {"patience": 5}), ("gl", {"alpha": 5.0}), ("up", {"s": 2, "k": 2}),
                     ("quadratic", {"window": 4, "warmup": 10, "confirm": 3}), ("curvature", {})):
        d = replay(name, [1.0, 0.9, bad, 0.1], **kw)
        assert (d.stop_epoch, d.stopped) == (2, True), name
    d = replay("pq", [1.0, 0.9, bad], [1.0, 0.9, 0.8], alpha=0.5, k=5)
    assert (d.stopped, d.stop_epoch) == (True, 2)


@pytest.mark.parametrize("name,kw", [("patience", {"patience": -1}), ("patience", {"min_delta": -1e-9}),
                                     ("gl", {"alpha": -1e-9}), ("pq", {"alpha": -1e-9}), ("pq", {"k": 0}),
                                     ("up", {"s": 0}), ("up", {"k": 0}), ("gl", {"warmup": -1})])
def test_rule_arguments_out_of_range(name, kw):
    with pytest.raises(ValueError, match="out of range"):
        make_rule(name, **kw)
    ok = {k: (0 if k in ("patience", "warmup") else 0.0 if k in ("alpha", "min_delta") else 1) for k in kw}
    make_rule(name, **ok)  # the bound itself is allowed


# =========================================================================== BN momentum boundaries
def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 2, 3, generator=g) * (i + 1) + i for i in range(n)]


def _unbiased_stats(x):
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=True)


@pytest.mark.parametrize("cls", [StatBatchNorm, BatchRenorm])
def test_bn_running_stats_at_momentum_boundaries(cls):
    xs = _batches()
    kw = {"r_max": 1.0, "d_max": 0.0} if cls is BatchRenorm else {}
    for momentum in (0.0, 1.0, None, 0.3):
        if cls is BatchRenorm and momentum is None:
            continue
        bn = cls(2, momentum=momentum, **kw).train()
        rm, rv = torch.zeros(2), torch.ones(2)
        for i, x in enumerate(xs):
            bn(x)
            m, v = _unbiased_stats(x)
            f = 1.0 / (i + 1) if momentum is None else momentum
            rm, rv = (1 - f) * rm + f * m, (1 - f) * rv + f * v
        torch.testing.assert_close(bn.running_mean, rm, msg=f"momentum={momentum}")
        torch.testing.assert_close(bn.running_var, rv, msg=f"momentum={momentum}")
        assert int(bn.num_batches_tracked) == 3
    last_m, last_v = _unbiased_stats(xs[-1])
    bn = cls(2, momentum=1.0, **kw).train()
    for x in xs:
        bn(x)
    torch.testing.assert_close(bn.running_mean, last_m)  # momentum 1: the last batch only
    torch.testing.assert_close(bn.running_var, last_v)


@pytest.mark.parametrize("momentum", [0.0, 1.0, None, 0.3])
def test_ghost_bn_running_stats_equal_sequential_chunk_updates(momentum):
    x = _batches(1, seed=3)[0].repeat(3, 1, 1)[:20] * torch.linspace(0.5, 2, 20)[:, None, None]
    bn = GhostBatchNorm(2, virtual_batch_size=6, momentum=momentum).train()
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    bn.num_batches_tracked.fill_(2)
    rm, rv, seen = torch.full((2,), 0.5), torch.full((2,), 2.0), 2
    for lo in range(0, 20, 6):  # chunks of 6, 6, 6, 2 (the last has 2 * 3 values per channel)
        m, v = _unbiased_stats(x[lo:lo + 6])
        seen += 1
        f = 1.0 / seen if momentum is None else momentum
        rm, rv = (1 - f) * rm + f * m, (1 - f) * rv + f * v
    bn(x)
    torch.testing.assert_close(bn.running_mean, rm)
    torch.testing.assert_close(bn.running_var, rv)
    assert int(bn.num_batches_tracked) == 6


def test_renorm_limits_at_ramp_boundaries():
    kw = dict(r_max=3.0, d_max=5.0, warmup_steps=10, r_max_steps=30, d_max_steps=20)
    assert renorm_limits(0, **kw) == (1.0, 0.0)
    assert renorm_limits(10, **kw) == (1.0, 0.0)  # the last warm-up step
    assert renorm_limits(15, **kw) == (1.5, 2.5)  # linear from the end of warm-up
    assert renorm_limits(20, **kw) == (2.0, 5.0)  # d reaches its final value at d_max_steps
    assert renorm_limits(30, **kw) == (3.0, 5.0)
    assert renorm_limits(10**6, **kw) == (3.0, 5.0)
    assert renorm_limits(11, 3.0, 5.0, 10, 5, 10) == (3.0, 5.0)  # ramps that end inside warm-up


# =========================================================================== Hessian probes
def _quadratic(eigs, seed=0):
    """``f(w) = 0.5 w^T A w + b^T w`` with ``A = Q diag(eigs) Q^T`` (random rotation ``Q``)."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(n, generator=g, dtype=torch.float64).requires_grad_(True)
    return a, w, (lambda: 0.5 * w @ a @ w + b @ w)


@pytest.mark.parametrize("eigs,expected", [
    ([1.0, -3.0, 0.5], -3.0),  # indefinite, negative dominant
    ([4.0, -1.0, 0.5], 4.0),  # indefinite, positive dominant
    ([-2.0, -5.0, -1.0], -5.0),  # negative definite
    ([-2.0, -2.0, 1.0], -2.0),  # degenerate: repeated dominant eigenvalue
    ([0.0, 0.0, -4.0], -4.0),  # degenerate: rank one
    ([0.0, 3.0, 0.0, 0.0], 3.0),  # degenerate: rank one, positive
])
def test_top_eigenvalue_keeps_its_sign(eigs, expected):
    a, w, f = _quadratic(eigs)
    got = top_hessian_eigenvalue(f, [w], iters=200, tol=1e-10, generator=torch.Generator().manual_seed(1))
    assert got == pytest.approx(expected, rel=1e-6)
    v = torch.randn(len(eigs), dtype=torch.float64)
    torch.testing.assert_close(hessian_vector_product(f, [w], v), a @ v)


def test_top_eigenvalue_of_a_zero_hessian_is_zero():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert top_hessian_eigenvalue(lambda: c @ w, [w], generator=torch.Generator().manual_seed(0)) == 0.0
    _, w2, f = _quadratic([0.0, 0.0])
    assert top_hessian_eigenvalue(f, [w2], generator=torch.Generator().manual_seed(0)) == 0.0


def test_top_eigenvalue_single_iteration_is_the_rayleigh_quotient():
    a, w, f = _quadratic([1.0, -3.0, 0.5])
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    v = v / v.norm()
    got = top_hessian_eigenvalue(f, [w], iters=1, generator=gen)
    assert got == pytest.approx(float(v @ a @ v), rel=1e-12)


def test_top_eigenvalue_of_an_overflowing_hessian_is_nan():
    w = torch.tensor([1e-200, 1.0], dtype=torch.float64, requires_grad=True)
    got = top_hessian_eigenvalue(lambda: -torch.log(w).sum(), [w], generator=torch.Generator().manual_seed(0))
    assert math.isnan(got)  # 1 / w^2 overflows: NaN, never a finite or infinite "eigenvalue"


@pytest.mark.parametrize("tol", [0.5, 0.05, 1e-3])
def test_power_iteration_stops_by_the_documented_relative_tolerance(tol):
    """Small eigenvalues (|lambda| ~ 0.05), so an absolute term in the tolerance would show."""
    eigs = [0.04, -0.05, 0.03]
    a, w, f = _quadratic(eigs, seed=6)
    got = top_hessian_eigenvalue(f, [w], iters=50, tol=tol, generator=torch.Generator().manual_seed(2))
    v = torch.randn(3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v = v / v.norm()
    eig = None
    for _ in range(50):  # plain power iteration with the docstring's stopping rule
        hv = a @ v
        new = float(v @ hv)
        v = hv / hv.norm()
        if eig is not None and abs(new - eig) <= tol * abs(eig):
            eig = new
            break
        eig = new
    assert got == pytest.approx(eig, rel=1e-9, abs=1e-15)
    if tol == 0.5:
        assert abs(got - (-0.05)) > 1e-3  # a loose tolerance really stops early


@pytest.mark.parametrize("eigs", [[1.0, -3.0, 0.5], [-2.0, -5.0, -1.0], [0.0, 0.0, -4.0]])
def test_hutchinson_trace_keeps_its_sign(eigs):
    a, w, f = _quadratic(eigs, seed=2)
    est = hutchinson_trace(f, [w], samples=400, generator=torch.Generator().manual_seed(0))
    off = a - torch.diag(torch.diag(a))
    sd = math.sqrt(2 * float((off ** 2).sum()) / 400)  # the estimator's documented variance
    assert abs(est - sum(eigs)) < 5 * sd + 1e-9
    diag = torch.diag(torch.tensor(eigs, dtype=torch.float64))
    wd = torch.zeros(len(eigs), dtype=torch.float64, requires_grad=True)
    exact = hutchinson_trace(lambda: 0.5 * wd @ diag @ wd, [wd], samples=3, generator=torch.Generator().manual_seed(0))
    assert exact == pytest.approx(sum(eigs), abs=1e-12)  # diagonal: exact whatever the samples


def test_hutchinson_is_the_mean_of_the_rademacher_quadratic_forms():
    a, w, f = _quadratic([1.0, -3.0, 0.5], seed=4)
    got = hutchinson_trace(f, [w], samples=5, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    vs = [torch.randint(0, 2, (3,), generator=g).double() * 2 - 1 for _ in range(5)]
    assert got == pytest.approx(float(np.mean([float(v @ a @ v) for v in vs])), rel=1e-12)
