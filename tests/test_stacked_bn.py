"""launcher=stacked with BatchNorm and full batch: each stacked member ends where its plain run ends, member by
member (weights, BN running statistics, optimizer state, metrics), and a plain run resumes a BN member.

Tolerances: RTOL / ATOL of tests/test_stacked.py (1e-5 / 1e-6; measured differences are ~1e-7) wherever the
optimizer is SGD or momentum. Adam + BatchNorm gets a looser, stated bound (ADAM_BN_*): a Linear/conv bias
right before BN (and a weight column over an input feature that is constant within a batch) has a true
gradient of exactly zero; what backward returns there is rounding noise (~1e-9) that differs between the
batched and the single GEMMs, and Adam rescales that noise to steps of size ~lr. Those directions change no
train-mode output but do move running_mean, so after 40 steps parameters differ by up to ~5e-3 (lr=1e-3) and
losses by ~5e-5 relative; momentum SGD on the same config agrees to ~1e-7.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import compose_cfg
from shiftlab.trainers.checkpoint_io import load_weights_only
from shiftlab.trainers.stacked.engine import StackedGroup
from shiftlab.trainers.stacked.grouping import why_not_stacked
from shiftlab.trainers.stacked.run import train_stacked
from shiftlab.trainers.train import train
from test_stacked import ATOL, RTOL, SMALL, _cfg

# Adam + BN, measured (digits MLP [32,32], 2 epochs = 40 steps, lr 1e-3, 2 seeds): weights / running stats differ
# by up to 5.1e-3, losses by up to 5.5e-5 relative, test/acc by one of 359 samples. Bounds with ~3-4x margin;
# a wrong running statistic or eval mode moves val/loss by far more.
ADAM_BN_RTOL, ADAM_BN_ATOL, ADAM_BN_ACC = 3e-4, 2e-2, 0.012  # losses (rel) / state (abs) / accuracies (abs)
METRICS = ("val/loss", "val/acc", "train/loss", "train/acc", "train/loss_epoch_mean", "test/loss", "test/acc",
           "test/f1_macro")
# the CNN has no model.hidden; a small mnist1d (630 train samples) keeps the test to a few seconds
CNN = [o for o in SMALL if not o.startswith("model.hidden")] + [
    "experiment=mnist1d_cnn", "data.num_samples=700", "model.channels=[8,8]"]


def _run_both(tmp_path: Path, seeds: tuple[int, ...], overrides: tuple[str, ...], base: list[str] | None = None
              ) -> list[tuple[dict, dict, Path, Path]]:
    """Stacked members and their plain runs: ``[(stacked summary, plain summary, stacked dir, plain dir)]``."""
    make = (lambda out, s: compose_cfg(base + [f"seed={s}", *overrides], out)) if base else \
        (lambda out, s: _cfg(out, s, *overrides))
    dirs = [tmp_path / f"stacked{s}" for s in seeds]
    got = train_stacked([make(d, s) for d, s in zip(dirs, seeds)], dirs)
    return [(g, train(make(tmp_path / f"plain{s}", s)), d, tmp_path / f"plain{s}")
            for s, g, d in zip(seeds, got, dirs)]


def _assert_member_equals_plain(got: dict, want: dict, mine_dir: Path, plain_dir: Path, rtol: float, atol: float,
                                metric_rtol: float | None = None, acc_atol: float | None = None,
                                loops: bool = True) -> None:
    """Summary metrics, last.ckpt weights and BN buffers (num_batches_tracked exactly), optimizer state, the
    epoch history and (``loops``) Lightning's loop counters of one member against its plain run."""
    mrt = metric_rtol if metric_rtol is not None else rtol
    for key in METRICS:
        tol = acc_atol if acc_atol is not None and ("acc" in key or "f1" in key) else atol
        assert got[key] == pytest.approx(want[key], rel=mrt, abs=tol), key
    assert (got["status"], got["global_step"], got["epochs_run"]) == \
        (want["status"], want["global_step"], want["epochs_run"])
    mine = load_weights_only(mine_dir / "checkpoints" / "last.ckpt")
    plain = load_weights_only(plain_dir / "checkpoints" / "last.ckpt")
    assert mine["state_dict"].keys() == plain["state_dict"].keys()
    for k, v in plain["state_dict"].items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(mine["state_dict"][k], v), k
        else:
            torch.testing.assert_close(mine["state_dict"][k], v, rtol=rtol, atol=atol, msg=k)
    for i, st in plain["optimizer_states"][0]["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                torch.testing.assert_close(mine["optimizer_states"][0]["state"][i][k], v, rtol=rtol, atol=atol)
    for a, b in zip(mine["callbacks"]["EpochHistory"]["history"], plain["callbacks"]["EpochHistory"]["history"],
                    strict=True):
        assert a.keys() == b.keys() and a == pytest.approx(b, rel=mrt, abs=atol)
    assert (mine["epoch"], mine["global_step"]) == (plain["epoch"], plain["global_step"])
    if loops:
        assert mine["loops"] == plain["loops"]


def _bn_keys(state_dict: dict) -> set[str]:
    return {k for k in state_dict if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.mark.parametrize("overrides", [
    ("norm=batchnorm", "optimizer=momentum"),
    ("norm=batchnorm", "optimizer=sgd", "scheduler=constant", "optimizer.lr=0.2"),
], ids=["bn-momentum-cosine", "bn-sgd"])
def test_bn_mlp_members_equal_their_plain_runs(tmp_path, overrides):
    for got, want, mine, plain in _run_both(tmp_path, (0, 1), overrides):
        _assert_member_equals_plain(got, want, mine, plain, RTOL, ATOL)
    sd = load_weights_only(mine / "checkpoints" / "last.ckpt")["state_dict"]
    assert len(_bn_keys(sd)) == 6 and int(sd["model.net.2.num_batches_tracked"]) == got["global_step"]


def test_bn_mlp_with_adam_the_default_experiment(tmp_path):
    """The default experiment's norm and optimizer (BatchNorm + Adam + cosine), under the looser stated bound."""
    for got, want, mine, plain in _run_both(tmp_path, (0, 1), ("norm=batchnorm", "optimizer=adam")):
        _assert_member_equals_plain(got, want, mine, plain, 0.0, ADAM_BN_ATOL, metric_rtol=ADAM_BN_RTOL,
                                    acc_atol=ADAM_BN_ACC)


def test_bn_cnn_members_equal_their_plain_runs(tmp_path):
    """experiment=mnist1d_cnn: BatchNorm1d over conv channels, per member."""
    runs = _run_both(tmp_path, (0, 1), ("optimizer=momentum",), base=CNN)
    for got, want, mine, plain in runs:
        _assert_member_equals_plain(got, want, mine, plain, RTOL, ATOL)
    sd = load_weights_only(runs[0][2] / "checkpoints" / "last.ckpt")["state_dict"]
    assert "model.features.1.running_var" in _bn_keys(sd)


@pytest.mark.parametrize("overrides", [
    ("norm=none", "optimizer=sgd", "optimizer.lr=0.5"),
    ("norm=layernorm", "optimizer=momentum", "optimizer.lr=0.5", "batching.clip_grad_norm=0.05"),
    ("norm=batchnorm", "optimizer=momentum", "optimizer.lr=0.5", "batching.grad_norm_penalty=0.1",
     "batching.clip_grad_norm=0.05"),
], ids=["none-sgd", "layernorm-momentum-clip", "bn-momentum-penalty-clip"])
def test_full_batch_members_equal_their_plain_runs(tmp_path, overrides):
    """batching=full over chunks of 500 of the ~1260 training samples (an uneven last chunk): one step per epoch;
    with BatchNorm each chunk uses its own statistics in the plain and the stacked run alike.

    Loop counters are compared too: the plain full-batch run uses manual optimization, and the stacked
    checkpoint writer (outputs.py) writes that layout for full-batch members."""
    ov = ("batching=full", "batching.chunk_size=500", "trainer.max_epochs=3", *overrides)
    for got, want, mine, plain in _run_both(tmp_path, (0, 1), ov):
        _assert_member_equals_plain(got, want, mine, plain, RTOL, ATOL, loops=True)
        assert got["global_step"] == 3


def test_plain_run_resumes_a_bn_member_checkpoint(tmp_path):
    """A plain run continues a BN member's last.ckpt (running statistics included) to epoch 3 and ends where an
    uninterrupted plain 3-epoch run ends."""
    ov = ("norm=batchnorm", "optimizer=momentum", "scheduler=constant")
    dirs = [tmp_path / "s0", tmp_path / "s1"]
    train_stacked([_cfg(d, s, *ov) for s, d in enumerate(dirs)], dirs)
    last = dirs[1] / "checkpoints" / "last.ckpt"
    assert len(_bn_keys(load_weights_only(last)["state_dict"])) == 6
    got = train(_cfg(tmp_path / "resumed", 1, *ov, "trainer.max_epochs=3", f"ckpt_path={last}"))
    want = train(_cfg(tmp_path / "plain", 1, *ov, "trainer.max_epochs=3"))
    assert got["status"] == "completed" and got["epochs_run"] == 3 and got["global_step"] == want["global_step"]
    assert got["val/loss"] == pytest.approx(want["val/loss"], rel=RTOL, abs=ATOL)
    a = load_weights_only(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_weights_only(tmp_path / "plain" / "checkpoints" / "last.ckpt")["state_dict"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=k)
    assert int(a["model.net.2.num_batches_tracked"]) == got["global_step"]


def test_plain_run_resumes_a_full_batch_member_checkpoint(tmp_path):
    ov = ("norm=batchnorm", "batching=full", "batching.chunk_size=500", "optimizer=momentum", "optimizer.lr=0.5",
          "scheduler=constant")
    dirs = [tmp_path / "s0", tmp_path / "s1"]
    train_stacked([_cfg(d, s, *ov) for s, d in enumerate(dirs)], dirs)
    got = train(_cfg(tmp_path / "resumed", 1, *ov, "trainer.max_epochs=3",
                     f"ckpt_path={dirs[1] / 'checkpoints' / 'last.ckpt'}"))
    want = train(_cfg(tmp_path / "plain", 1, *ov, "trainer.max_epochs=3"))
    assert got["val/loss"] == pytest.approx(want["val/loss"], rel=RTOL, abs=ATOL)
    assert (got["epochs_run"], got["global_step"]) == (want["epochs_run"], want["global_step"]) == (3, 3)


@pytest.mark.parametrize("overrides,reason", [
    (["norm=batchnorm"], None),
    (["norm=batchnorm", "batching=full", "batching.grad_norm_penalty=0.1"], None),
    (["norm=ghost_bn"], None),  # tests/test_stacked_bn_variants.py
    (["norm=batch_renorm"], None),
    (["norm=noisy_bn"], None),
    (["norm=triton_bn"], "not the BatchNorm variants"),
    (["norm=weight_std"], "not the BatchNorm variants"),
    (["norm=batchnorm", "norm.sync=true"], "norm.sync=true"),
    (["norm=batchnorm", "norm.momentum=null"], "norm.momentum=null"),
])
def test_grouping_accepts_bn_and_full_batch_and_names_the_rest(overrides, reason):
    why = why_not_stacked(compose_cfg(SMALL + overrides))
    assert why == reason if reason is None else (why is not None and reason in why)


def test_clipping_is_per_member():
    """Member k's gradients are clipped by member k's norm only, as ``clip_grad_norm_`` clips its plain run."""
    torch.manual_seed(0)
    params = {"w": torch.zeros(3, 4, 5), "b": torch.zeros(3, 4)}
    for p, scale in ((params["w"], (0.01, 1.0, 30.0)), (params["b"], (0.02, 2.0, 10.0))):
        p.grad = torch.randn_like(p) * torch.tensor(scale).view(-1, *([1] * (p.dim() - 1)))
    before = {n: p.grad.clone() for n, p in params.items()}
    want = []
    for k in range(3):
        member = [params["w"].grad[k].clone().requires_grad_(), params["b"].grad[k].clone().requires_grad_()]
        for m in member:
            m.grad = m.detach().clone()
        torch.nn.utils.clip_grad_norm_(member, 0.5)
        want.append([m.grad for m in member])
    StackedGroup._clip_per_member(SimpleNamespace(params=params), 0.5)
    for k in range(3):
        torch.testing.assert_close(params["w"].grad[k], want[k][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(params["b"].grad[k], want[k][1], rtol=1e-6, atol=1e-7)
    assert torch.equal(params["w"].grad[0], before["w"][0])  # member 0 is below the bound: untouched
    norm2 = torch.sqrt(params["w"].grad[2].square().sum() + params["b"].grad[2].square().sum())
    assert float(norm2) == pytest.approx(0.5, rel=1e-5)
