"""launcher=stacked with the BatchNorm variants ghost_bn, batch_renorm and noisy_bn: each stacked member ends
where its plain run ends, member by member (weights, running statistics, batch counts, optimizer state,
metrics), with per-member batch statistics (per virtual batch for ghost_bn) and per-member running statistics;
noisy_bn members draw their plain runs' noise (CPU), interleaved with dropout masks.

Tolerances as in tests/test_stacked_bn.py: RTOL / ATOL of tests/test_stacked.py for SGD with momentum, the
stated ADAM_BN_* bounds for Adam (a bias right before the norm has a true gradient of zero, and Adam rescales
the rounding noise there). batch_renorm uses a short warm-up and ramp, so its limits move and bind within the
test's 40 steps; the test checks that r or d was clipped after the warm-up (otherwise it would only test BN).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from conftest import compose_cfg
from shiftlab.trainers.checkpoint_io import load_weights_only
from shiftlab.trainers.norms import batch_renorm
from shiftlab.trainers.norms.batch_renorm import BatchRenorm, renorm_limits, renorm_limits_tensor
from shiftlab.trainers.norms.ghost_bn import GhostBatchNorm
from shiftlab.trainers.stacked.grouping import why_not_stacked
from shiftlab.trainers.stacked.run import train_stacked
from shiftlab.trainers.train import train
from test_stacked import ATOL, RTOL, SMALL, _cfg, _close
from test_stacked_bn import ADAM_BN_ACC, ADAM_BN_ATOL, ADAM_BN_RTOL, CNN, _assert_member_equals_plain, _run_both
from test_stacked_members import STOPPING, STOPPING_MEMBERS, _assert_tensors_close
from test_stacked_members import _run_both as _run_members

# digits: 1258 training samples, batches of 64 (the last one 42): virtual batches of 24 give chunks
# 24, 24, 16 (a trailing chunk) per batch and 24, 18 in the last one
GHOST = ("norm=ghost_bn", "norm.virtual_batch_size=24")
# limits 1 / 0 for 4 steps, then d_max reached at step 12 and r_max at step 30 of the 40
RENORM = ("norm=batch_renorm", "norm.r_max=1.5", "norm.d_max=0.5", "norm.warmup_steps=4", "norm.r_max_steps=30",
          "norm.d_max_steps=12")


@pytest.fixture
def clipping(monkeypatch) -> dict[str, int]:
    """Counts batch_renorm's corrections after the warm-up: ``clipped`` plain forwards where r or d hit its
    limit, ``plain`` / ``stacked`` forwards (stacked ones run under vmap and are only counted)."""
    seen = {"plain": 0, "clipped": 0, "stacked": 0}
    real = batch_renorm.renorm_corrections

    def spy(mean, std, running_mean, running_std, r_lim, d_lim):
        r, d = real(mean, std, running_mean, running_std, r_lim, d_lim)
        if torch._C._functorch.is_batchedtensor(mean):
            seen["stacked"] += 1
        elif float(r_lim) > 1 or float(d_lim) > 0:
            seen["plain"] += 1
            raw_r, raw_d = std / running_std, (mean - running_mean) / running_std
            seen["clipped"] += bool((r != raw_r).any() or (d != raw_d).any())
        return r, d

    monkeypatch.setattr(batch_renorm, "renorm_corrections", spy)
    return seen


@pytest.mark.parametrize("variant", ["ghost", "renorm"])
def test_bn_variant_members_equal_their_plain_runs_with_momentum(tmp_path, clipping, variant):
    overrides = (*(GHOST if variant == "ghost" else RENORM), "optimizer=momentum")
    runs = _run_both(tmp_path, (0, 1), overrides)
    for got, want, mine, plain in runs:
        _assert_member_equals_plain(got, want, mine, plain, RTOL, ATOL)
        assert got["global_step"] == 40
    if variant == "renorm":
        # 2 renorm layers x 36 post-warm-up steps x 2 plain runs
        assert clipping["plain"] == 144 and clipping["clipped"] > 0 and clipping["stacked"] > 0, clipping
    else:
        assert clipping == {"plain": 0, "clipped": 0, "stacked": 0}


@pytest.mark.parametrize("variant", ["ghost", "renorm"])
def test_bn_variant_members_with_dropout_equal_their_plain_runs(tmp_path, variant):
    """With dropout the stacked engine finds the masks' shapes by a meta dry run of the model, where a
    train-mode variant could not read its chunk or batch count (it failed so before the dry run put the other
    layers in eval mode)."""
    overrides = (*(GHOST if variant == "ghost" else RENORM), "model.dropout=0.2", "optimizer=momentum")
    for got, want, mine, plain in _run_both(tmp_path, (0, 1), overrides):
        _assert_member_equals_plain(got, want, mine, plain, RTOL, ATOL)
        a, b = (load_weights_only(d / "checkpoints" / "last.ckpt")["callbacks"] for d in (mine, plain))
        assert torch.equal(a["RunContract"]["torch_rng"], b["RunContract"]["torch_rng"])


def test_ghost_bn_members_equal_their_plain_runs_with_adam(tmp_path):
    """Measured (2 seeds): state up to 3.4e-3 apart, losses up to 1.6e-5 relative. (batch_renorm with Adam,
    not kept as a test: 3.7e-3 and 1.9e-4, too close to ADAM_BN_RTOL = 3e-4 to be a stable bound.)"""
    for got, want, mine, plain in _run_both(tmp_path, (0, 1), (*GHOST, "optimizer=adam")):
        _assert_member_equals_plain(got, want, mine, plain, 0.0, ADAM_BN_ATOL, metric_rtol=ADAM_BN_RTOL,
                                    acc_atol=ADAM_BN_ACC)


def test_ghost_bn_cnn_members_equal_their_plain_runs(tmp_path):
    """experiment=mnist1d_cnn (504 training samples, batches of 100): ghost BN over conv channels, virtual
    batches of 24 (4 x 24 + a trailing 4; the last batch of 4 is one chunk).

    Measured with virtual batches of 21 or 33 (trailing chunks of 16 or of one sample): seed 1's first conv
    weight ends 1.3e-6 / 2.5e-6 from its plain run's (over ATOL), seed 0's within 1e-7; the layer itself is
    bitwise equal under vmap for those sizes (test below), so that is the conv's reassociation, amplified
    through small virtual batches."""
    for got, want, mine, plain in _run_both(tmp_path, (0, 1), ("optimizer=momentum", "norm=ghost_bn",
                                                                 "norm.virtual_batch_size=24"), base=CNN):
        _assert_member_equals_plain(got, want, mine, plain, RTOL, ATOL)


@pytest.mark.parametrize("make,shape,steps,counted", [
    (lambda: GhostBatchNorm(8, virtual_batch_size=33), (100, 8, 40), 2, 4),  # a trailing one-sample chunk (kept)
    (lambda: GhostBatchNorm(8, virtual_batch_size=11), (45, 8), 2, 4),  # a trailing one-value chunk (merged)
    (lambda: BatchRenorm(8, r_max=1.5, d_max=0.5, warmup_steps=2, r_max_steps=6, d_max_steps=4), (30, 8), 8, 1),
], ids=["ghost-conv", "ghost-mlp", "renorm"])
def test_layer_under_vmap_equals_the_plain_layer(make, shape, steps, counted):
    """One layer per member under vmap(functional_call), as the stacked engine runs it, against each member's
    plain layer in float64: outputs, input and weight gradients and the buffers after every training step
    (measured bitwise equal, float32 too). batch_renorm runs through its warm-up and ramp; ghost_bn counts
    one batch per virtual batch (``counted`` per step)."""
    torch.manual_seed(0)
    layers = [make().double() for _ in range(3)]
    for m in layers:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
    plain = [copy.deepcopy(m) for m in layers]
    params, buffers = stack_module_state(layers)
    template = copy.deepcopy(layers[0]).to("meta")
    stacked = vmap(lambda p, b, x: functional_call(template, (p, b), (x,)))
    for _ in range(steps):
        x = (torch.randn(3, *shape, dtype=torch.float64) * 2 + 1).requires_grad_()
        w = torch.randn(3, *shape, dtype=torch.float64)
        y = stacked(params, buffers, x)
        gx, gw = torch.autograd.grad((y * w).sum(), (x, params["weight"]))
        for k, m in enumerate(plain):
            xk = x[k].detach().clone().requires_grad_()
            yk = m(xk)
            gxk, gwk = torch.autograd.grad((yk * w[k]).sum(), (xk, m.weight))
            for a, b in ((y[k], yk), (gx[k], gxk), (gw[k], gwk), *((buffers[n][k], b) for n, b in m.named_buffers())):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert buffers["num_batches_tracked"].tolist() == [steps * counted] * 3


@pytest.mark.parametrize("norm", [
    ("norm=ghost_bn", "norm.virtual_batch_size=96"),
    ("norm=noisy_bn", "batching.grad_norm_penalty=0.1", "batching.clip_grad_norm=0.05"),
], ids=["ghost", "noisy-penalty-clip"])
def test_full_batch_members_equal_their_plain_runs(tmp_path, norm):
    """batching=full over chunks of 500 (500, 500, 258), one step per epoch: ghost_bn with virtual batches of
    96 inside each chunk (5 x 96 + 20, 2 x 96 + 66); noisy_bn with the gradient-norm penalty's extra pass (which
    draws noise too). Clipped as test_stacked_bn's penalty case: the penalty's finite difference divides
    rounding differences by its small step (measured without clipping: weights 1.0e-6, momentum buffer 3.3e-6
    apart; with one extra draw before each layer's noise, i.e. other noise than its plain run's, 5.7e-2)."""
    ov = ("batching=full", "batching.chunk_size=500", "trainer.max_epochs=3", *norm, "optimizer=momentum",
          "optimizer.lr=0.5")
    for got, want, mine, plain in _run_both(tmp_path, (0, 1), ov):
        _assert_member_equals_plain(got, want, mine, plain, RTOL, ATOL, loops=True)
        assert got["global_step"] == 3


@pytest.mark.parametrize("overrides", [
    ("norm=noisy_bn", "optimizer=momentum"),
    ("norm=noisy_bn", "norm.noise_position=before_affine", "model.dropout=0.2", "optimizer=momentum"),
], ids=["after-affine", "before-affine-dropout"])
def test_noisy_bn_members_draw_their_plain_runs_noise(tmp_path, overrides):
    """Each member's noise (and dropout masks, drawn between the noisy layers' draws in the forward's call
    order) is its plain run's: weights, running statistics and the RunContract RNG state at the end agree."""
    for got, want, mine, plain in _run_both(tmp_path, (0, 1), overrides):
        _assert_member_equals_plain(got, want, mine, plain, RTOL, ATOL)
        a, b = (load_weights_only(d / "checkpoints" / "last.ckpt")["callbacks"] for d in (mine, plain))
        assert torch.equal(a["RunContract"]["torch_rng"], b["RunContract"]["torch_rng"])


def test_plain_run_resumes_a_noisy_bn_member(tmp_path):
    """A plain run resumed from a noisy_bn member's last.ckpt continues its noise stream (the RunContract RNG
    state) and ends where the uninterrupted 3-epoch plain run ends."""
    ov = ("norm=noisy_bn", "optimizer=momentum", "scheduler=constant")
    dirs = [tmp_path / "s0", tmp_path / "s1"]
    train_stacked([_cfg(d, s, *ov) for s, d in enumerate(dirs)], dirs)
    got = train(_cfg(tmp_path / "resumed", 1, *ov, "trainer.max_epochs=3",
                     f"ckpt_path={dirs[1] / 'checkpoints' / 'last.ckpt'}"))
    train(_cfg(tmp_path / "plain", 1, *ov, "trainer.max_epochs=3"))
    assert (got["status"], got["epochs_run"]) == ("completed", 3)
    a = load_weights_only(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_weights_only(tmp_path / "plain" / "checkpoints" / "last.ckpt")["state_dict"]
    _assert_tensors_close(a, b, "resumed noisy_bn member")


@pytest.mark.parametrize("variant", ["ghost", "renorm", "noisy"])
def test_bn_variant_members_stop_early_where_their_plain_runs_stop(tmp_path, variant):
    """A stopped member keeps its variant's running statistics and batch count (the same buffer names as
    BatchNorm's, put back after each epoch)."""
    norm = {"ghost": GHOST, "renorm": RENORM, "noisy": ("norm=noisy_bn",)}[variant]
    epochs = []
    for j, (got, want, d, p) in enumerate(_run_members(tmp_path, STOPPING_MEMBERS, *norm, *STOPPING)):
        epochs.append(want["epochs_run"])
        assert (got["epochs_run"], got["global_step"]) == (want["epochs_run"], want["global_step"])
        for key in ("val/loss", "train/loss", "test/loss", "test/acc"):
            _close(got[key], want[key], f"member {j}: {key}")
        mine = load_weights_only(d / "checkpoints" / "last.ckpt")["state_dict"]
        plain = load_weights_only(p / "checkpoints" / "last.ckpt")["state_dict"]
        _assert_tensors_close(mine, plain, f"member {j}: last.ckpt")
    assert len(set(epochs)) > 1, epochs  # members stopped at different epochs


@pytest.mark.parametrize("warmup,r_steps,d_steps", [(10, 30, 20), (10, 5, 10), (10, 11, 10), (0, 7, 3),
                                                    (3, 40000, 25000)])
def test_renorm_limits_tensor_equals_renorm_limits(warmup, r_steps, d_steps):
    """The tensor form (the layer's, also under vmap) gives renorm_limits' numbers exactly, around the warm-up
    end and each ramp end, including ramps that end inside the warm-up."""
    steps = sorted({s for b in (0, warmup, r_steps, d_steps) for s in range(max(b - 3, 0), b + 4)} | {10**6})
    want = torch.tensor([renorm_limits(s, 3.0, 5.0, warmup, r_steps, d_steps) for s in steps], dtype=torch.float64)
    step_t = torch.tensor(steps)
    for i, s in enumerate(steps):
        got = renorm_limits_tensor(step_t[i], 3.0, 5.0, warmup, r_steps, d_steps)
        assert (float(got[0]), float(got[1])) == tuple(want[i].tolist()), s
    batched = vmap(lambda t: torch.stack(renorm_limits_tensor(t, 3.0, 5.0, warmup, r_steps, d_steps)))(step_t)
    assert torch.equal(batched, want)


@pytest.mark.parametrize("overrides,reason", [
    (list(GHOST), None),
    (list(RENORM), None),
    (["norm=batch_renorm"], None),  # sync=true by default: a no-op in a single process
    (["norm=ghost_bn", "batching=full"], None),
    (["norm=noisy_bn", "model.dropout=0.2"], None),
    (["norm=ghost_bn", "norm.momentum=null"], "norm.momentum=null"),
    (["norm=batch_renorm", "norm.momentum=null"], "norm.momentum=null"),
    (["norm=noisy_bn", "norm.momentum=null"], "norm.momentum=null"),
    (["norm=noisy_bn", "callbacks=batch_noise", "callbacks.noise_scale.every_n_epochs=1"], "with norm=noisy_bn"),
    (["norm=triton_bn"], "not the BatchNorm variants triton_bn / weight_std"),
])
def test_grouping_accepts_the_variants_and_names_the_rest(overrides, reason):
    why = why_not_stacked(compose_cfg(SMALL + overrides))
    assert why == reason if reason is None else (why is not None and reason in why), why
