"""``module.steps_per_call``: N optimizer steps per Lightning ``training_step`` call train exactly as one
step per call (weights, optimizer state, step count, metrics.csv, summary.json), checkpoints written
under any N resume exactly under any other (epoch ends and mid-epoch signals), and what cannot run
with N > 1 is refused in one line."""
from __future__ import annotations

import csv
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from conftest import QUIET, REPO, compose_cfg
from helpers_callbacks import SignalAt
from shiftlab.trainers.config_checks import ConfigError, check_config
from shiftlab.trainers.data import DigitsDataModule
from shiftlab.trainers.data.base import EpochSeededBatches
from shiftlab.trainers.modules.grouped import check_grouped_fit, groups_done, shift_batch_progress
from shiftlab.trainers.train import train

# digits: 1258 training samples, batch 64 -> 20 batches an epoch (the last one 42 samples);
# N = 3 leaves a last group of 2 batches, N = 64 is more than an epoch's batches
DIGITS = QUIET + ["data=digits", "model=mlp", "model.hidden=[32]", "norm=batchnorm", "optimizer=adam",
                  "batching.batch_size=64", "trainer.max_epochs=3", "trainer.deterministic=true",
                  "callbacks=default", "callbacks.diagnosis=null", "data.label_noise=0.1"]
# mnist1d CNN with SGD momentum and a cosine schedule: 900 training samples, batch 100 -> 9 batches
MNIST1D = QUIET + ["experiment=mnist1d_cnn", "model.channels=[8,8]", "optimizer=momentum", "scheduler=cosine",
                   "data.train_fraction=0.25", "trainer.max_epochs=2", "trainer.deterministic=true",
                   "callbacks=default", "callbacks.diagnosis=null"]
# module=sequence: an HMM on 300 sequences (210 training), batch 32 -> 7 batches an epoch
HMM = QUIET + ["experiment=pgm_hmm", "data.num_sequences=300", "batching.batch_size=32", "trainer.max_epochs=2",
               "trainer.deterministic=true", "callbacks=default", "callbacks.diagnosis=null"]
SUMMARY_KEYS = ("global_step", "epochs_run", "train/loss", "train/acc", "train/loss_epoch_mean", "val/loss",
                "val/acc", "test/loss", "test/acc", "test/f1_macro")


def _ckpt(run: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=False)


def _rows(run: Path) -> list[dict]:
    """metrics.csv's rows without the probes' measured seconds (``probe_cost/*``)."""
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if not k.startswith("probe_cost/")} for row in csv.DictReader(f)]


def _same_training(a: Path, b: Path, sa: dict, sb: dict, what: str) -> None:
    """Equal weights, optimizer state, loop counts, schedule, metrics.csv and summary metrics."""
    for key in SUMMARY_KEYS:
        if key in sa:
            assert sb[key] == sa[key], (what, key)
    ca, cb = _ckpt(a), _ckpt(b)
    assert (ca["epoch"], ca["global_step"]) == (cb["epoch"], cb["global_step"]), what
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"]), what
    oa, ob = ca["optimizer_states"][0], cb["optimizer_states"][0]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys(), what
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][k])), (what, i, k)
    assert ca["lr_schedulers"] == cb["lr_schedulers"], what
    fa, fb = ca["loops"]["fit_loop"], cb["loops"]["fit_loop"]
    for key in ("epoch_loop.batch_progress", "epoch_loop.state_dict", "epoch_progress"):
        assert fa[key] == fb[key], (what, key)  # the checkpoints count batches under every N
    assert ca["callbacks"]["DivergenceGuard"] == cb["callbacks"]["DivergenceGuard"], what


# ---------------------------------------------------------------------------------------- the loader
@pytest.mark.parametrize("group", [2, 3, 7, 64])
def test_groups_are_the_batches_in_order(group):
    dm = DigitsDataModule(batch_size=64, seed=3)
    dm.setup()
    n = len(dm.train_set)
    for skip in (None, (1, 5 * 64)):
        plain = EpochSeededBatches(n, 64, 3, skip=skip)
        grouped = EpochSeededBatches(n, 64, 3, skip=skip, group=group)
        plain.set_epoch(1), grouped.set_epoch(1)
        batches, groups = list(plain), list(grouped)
        assert all(1 <= len(g) <= group for g in groups) and all(len(g) == group for g in groups[:-1])
        flat = [b for g in groups for b in g]
        assert len(flat) == len(batches) and all(torch.equal(a, b) for a, b in zip(flat, batches))
        assert len(grouped) == -(-len(EpochSeededBatches(n, 64, 3)) // group)
    dm.trainer = SimpleNamespace(world_size=1, overfit_batches=0, lightning_module=SimpleNamespace(steps_per_call=3))
    items = list(dm.train_dataloader())
    assert len(items) == 7 and [len(g) for g in items] == [3] * 6 + [2]
    x, y = items[-1][-1]
    assert x.shape == (1258 - 19 * 64, 64) and y.shape == (1258 - 19 * 64,)


def test_batch_counts_convert_between_groups_and_batches():
    # 20 batches an epoch in groups of 3: 7 items; after 5 batches the rest (15) form 5 groups
    assert [groups_done(b, 20, 3) for b in (0, 3, 5, 18, 19, 20)] == [0, 1, 2, 6, 6, 7]
    assert groups_done(20, 20, 64) == 1 and groups_done(0, 20, 64) == 0
    four = lambda n: {"ready": n, "started": n, "processed": n, "completed": n}  # noqa: E731
    fit = {"epoch_loop.batch_progress": {"total": {**four(27), "completed": 26},
                                         "current": {**four(3), "completed": 2}, "is_last_batch": False}}
    shift_batch_progress(fit, 9, total_processed=49)  # written mid-group-end: completed one behind
    assert fit["epoch_loop.batch_progress"]["current"] == {**four(9), "completed": 8}
    assert fit["epoch_loop.batch_progress"]["total"] == {**four(49), "completed": 48}
    shift_batch_progress(fit, 3)
    assert fit["epoch_loop.batch_progress"]["current"] == {**four(3), "completed": 2}
    assert fit["epoch_loop.batch_progress"]["total"] == {**four(43), "completed": 42}
    shift_batch_progress({}, 3)  # no fit loop: left alone


# ---------------------------------------------------------------------------------------- same training
@pytest.mark.parametrize("setup,sizes", [("digits", (3, 64)), ("mnist1d", (4, 64)), ("hmm", (3,))],
                         ids=["digits-bn-adam", "mnist1d-cnn-momentum", "sequence-hmm"])
def test_steps_per_call_trains_exactly_as_one_step_per_call(tmp_path, setup, sizes):
    common = {"digits": DIGITS, "mnist1d": MNIST1D, "hmm": HMM}[setup]
    ref = train(compose_cfg(common, tmp_path / "n1"))
    assert ref["status"] == "completed" and ref["global_step"] > 3
    for n in sizes:
        got = train(compose_cfg(common + [f"module.steps_per_call={n}"], tmp_path / f"n{n}"))
        assert got["status"] == "completed", got.get("stop_reason")
        _same_training(tmp_path / "n1", tmp_path / f"n{n}", ref, got, f"N={n}")
        assert _rows(tmp_path / "n1") == _rows(tmp_path / f"n{n}")  # the logging step counts batches
        best_a, best_b = _ckpt(tmp_path / "n1", "best.ckpt"), _ckpt(tmp_path / f"n{n}", "best.ckpt")
        assert best_a["epoch"] == best_b["epoch"] and best_a["loops"]["fit_loop"]["epoch_loop.batch_progress"] == \
            best_b["loops"]["fit_loop"]["epoch_loop.batch_progress"]


def test_max_steps_inside_a_group_stops_at_the_same_step(tmp_path):
    common = DIGITS + ["+trainer.max_steps=25", "test=false"]
    one = train(compose_cfg(common, tmp_path / "n1"))
    three = train(compose_cfg(common + ["module.steps_per_call=3"], tmp_path / "n3"))
    assert one["global_step"] == three["global_step"] == 25  # batch 5 of epoch 1: group 1 cut after 2 steps
    assert three["val/loss"] == one["val/loss"] and three["train/loss"] == one["train/loss"]


# ---------------------------------------------------------------------------------------- resume
class GroupedSignalAt(SignalAt):
    """SignalAt counting loader items (groups): it declares that it reads them as they come."""

    grouped_steps_ok = True


STOPS = {"epoch": ["+callbacks.stop._target_=helpers_callbacks.StopAfterEpoch", "+callbacks.stop.epoch=0"],
         "signal": ["+callbacks.sig._target_=test_steps_per_call.GroupedSignalAt", "+callbacks.sig.epoch=1",
                    f"+callbacks.sig.signum={int(signal.SIGTERM)}"]}


@pytest.mark.parametrize("first,stop,then", [
    (3, "epoch", 1), (1, "epoch", 3),  # last.ckpt across N
    (3, "best", 1),  # best.ckpt (epoch 0's end)
    (3, "signal:2", 1),  # interrupted.ckpt after group 2 (batch 9) of epoch 1, resumed one batch per call
    (1, "signal:4", 3),  # after batch 5: the resumed epoch's groups start there (5-7, 8-10, ...)
    (3, "signal:1", 4),  # after batch 6, resumed in groups of 4
    (64, "signal:0", 3),  # a whole epoch per call: the signal lands on the epoch's only group (its end)
], ids=["last-3to1", "last-1to3", "best-3to1", "sig-3to1", "sig-1to3", "sig-3to4", "sig-64to3"])
def test_checkpoints_resume_exactly_under_another_steps_per_call(tmp_path, first, stop, then):
    full = train(compose_cfg(DIGITS, tmp_path / "full"))
    kind, _, at = stop.partition(":")
    stops = STOPS["epoch" if kind == "best" else kind] + ([f"+callbacks.sig.batch={at}"] if at else [])
    part = train(compose_cfg(DIGITS + [f"module.steps_per_call={first}"] + stops, tmp_path / "part"))
    assert part["global_step"] < full["global_step"]
    if kind == "signal" and first < 20:
        assert part["status"] == "preempted" and part["resume_from"].endswith("interrupted.ckpt")
        done = min((int(at) + 1) * first, 20)
        assert part["global_step"] == 20 + done  # stopped at the end of the signalled group
        assert torch.load(part["resume_from"], weights_only=False)["shiftlab_mid_epoch"]["batches_done"] == done
    ckpt = part.get("resume_from") or tmp_path / "part/checkpoints" / ("best.ckpt" if kind == "best" else "last.ckpt")
    resumed = train(compose_cfg(DIGITS + [f"module.steps_per_call={then}", f"ckpt_path={ckpt}"],
                                tmp_path / "resumed"))
    assert resumed["status"] == "completed", resumed.get("stop_reason")
    _same_training(tmp_path / "full", tmp_path / "resumed", full, resumed, f"{first}->{then} ({stop})")


# ---------------------------------------------------------------------------------------- refusals
REFUSED = [
    (["batching=full"], "with full batch"),
    (["+trainer.gradient_clip_val=0.5"], "trainer.gradient_clip_val=0.5"),
    (["+trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2"),
    (["data.num_workers=1"], "data.num_workers=1"),
    (["trainer.devices=2"], "trainer.devices=2"),
    (["+trainer.limit_train_batches=3"], "trainer.limit_train_batches=3"),
    (["+trainer.val_check_interval=0.5"], "trainer.val_check_interval=0.5"),
    (["trainer.check_val_every_n_epoch=null"], "trainer.check_val_every_n_epoch=null"),
    (["callbacks=gradient_tests", "callbacks.gradient_tests.every_n_steps=0"], "callbacks.gradient_tests (the"),
    (["callbacks=activation_drift"], "callbacks.activation_drift.every_n_steps=100"),
    (["callbacks=default", "+callbacks.model_checkpoint.every_n_train_steps=5"],
     "callbacks.model_checkpoint.every_n_train_steps=5"),
]


@pytest.mark.parametrize("overrides,names", REFUSED, ids=[r[1] for r in REFUSED])
def test_what_cannot_run_grouped_is_refused_in_one_line(overrides, names):
    cfg = compose_cfg(QUIET + ["module.steps_per_call=4"] + overrides)
    with pytest.raises(ConfigError) as e:
        check_config(cfg, machine=False)
    msg = str(e.value)
    assert msg.startswith("module.steps_per_call=4 is not allowed") and names in msg and "allowed: 1" in msg
    assert "\n" not in msg
    check_config(compose_cfg(QUIET + ["module.steps_per_call=1"] + overrides), machine=False)  # N = 1: fine


def test_epoch_probes_and_bad_values():
    check_config(compose_cfg(QUIET + ["module.steps_per_call=8", "callbacks=activation_drift",
                                      "callbacks.activation_drift.every_n_steps=0"]), machine=False)
    for bad in ("0", "1.5", "true"):
        with pytest.raises(ConfigError, match=rf"^module.steps_per_call={bad} is not allowed; allowed: an integer"):
            check_config(compose_cfg(QUIET + [f"module.steps_per_call={bad}"]), machine=False)


class _PerBatch(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pass


def test_fit_time_refusals(tmp_path):
    """What only the trainer knows: DDP's world size, callbacks added in code; a callback that reads
    each batch stops the run before its first step, in one line."""
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    from shiftlab.callbacks.divergence import DivergenceGuard
    from shiftlab.callbacks.run_contract import RunContract

    from shiftlab.callbacks.activation_drift import ActivationDriftMonitor
    from shiftlab.callbacks.gradient_tests import GradientTests

    ok = dict(gradient_clip_val=None, accumulate_grad_batches=1, limit_train_batches=1.0, overfit_batches=0.0,
              val_check_interval=1.0, check_val_every_n_epoch=1, world_size=1, datamodule=None,
              callbacks=[RunContract(tmp_path), DivergenceGuard(), ModelCheckpoint(), RichProgressBar(),
                         ActivationDriftMonitor(every_n_steps=0)])
    check_grouped_fit(SimpleNamespace(**ok), 4)
    for change, names in (({"world_size": 2}, "under DDP"), ({"callbacks": [_PerBatch()]}, "_PerBatch"),
                          ({"callbacks": [ModelCheckpoint(every_n_train_steps=3)]}, "every_n_train_steps"),
                          ({"accumulate_grad_batches": 2}, "trainer.accumulate_grad_batches=2"),
                          ({"callbacks": [GradientTests(every_n_steps=0)]}, "GradientTests"),
                          ({"callbacks": [ActivationDriftMonitor(every_n_steps=5)]}, "every_n_steps=5")):
        with pytest.raises(ConfigError, match=names):
            check_grouped_fit(SimpleNamespace(**{**ok, **change}), 4)
    with pytest.raises(ConfigError, match="^module.steps_per_call=2 is not allowed with callback _PerBatch"):
        train(compose_cfg(QUIET + ["module.steps_per_call=2", "trainer.max_epochs=1"], tmp_path / "run"),
              extra_callbacks=[_PerBatch()])


def test_cli_refuses_in_one_line_with_exit_code_2(tmp_path):
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "shiftlab.trainers.train", "module.steps_per_call=3",
                           "batching=full", f"paths.output_dir={tmp_path}"], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["shiftlab: error: module.steps_per_call=3 is not allowed with full batch (its own loop takes "
                     "one step per epoch); allowed: 1"]


# ---------------------------------------------------------------------------------------- divergence guard
def test_divergence_guard_checks_every_step_of_a_group():
    from shiftlab.callbacks.divergence import DivergenceError, DivergenceGuard

    trainer = SimpleNamespace(world_size=1, current_epoch=0, global_step=6, checkpoint_callbacks=[],
                              default_root_dir=".")
    good = [(i, torch.tensor(1.0)) for i in range(3)]
    guard = DivergenceGuard(check_every=2)
    guard.on_train_batch_end(trainer, SimpleNamespace(step_losses=good, last_loss=good[-1][1]), None, None, 0)
    assert guard._epoch_n == 2  # batches 0 and 2: check_every counts batches, not calls
    skipped = good[:1] + [(1, torch.tensor(float("nan")))] + good[2:]
    guard.on_train_batch_end(trainer, SimpleNamespace(step_losses=skipped, last_loss=good[-1][1]), None, None, 0)
    bad = good[:2] + [(2, torch.tensor(float("inf")))]
    with pytest.raises(DivergenceError):  # not the last step's loss: the middle one
        DivergenceGuard().on_train_batch_end(trainer, SimpleNamespace(step_losses=bad[::-1], last_loss=good[0][1]),
                                             None, None, 0)


@pytest.mark.parametrize("lr,ratio", [("1e3", "100"), ("5", "3")])
def test_a_diverging_run_stops_after_the_same_step(tmp_path, lr, ratio):
    """The guard checks each step's loss before the next update (its optimizer-step hook), so a group
    stops where one step per call stops: same step, same reason (steps 2 and 5: inside a group of 4)."""
    common = QUIET + ["model.hidden=[32,32]", "norm=none", "optimizer=sgd", "scheduler=constant",
                      f"optimizer.lr={lr}", "trainer.max_epochs=2", f"divergence.max_loss_ratio={ratio}"]
    one = train(compose_cfg(common, tmp_path / "n1"))
    four = train(compose_cfg(common + ["module.steps_per_call=4"], tmp_path / "n4"))
    assert one["status"] == four["status"] == "diverged" and one["global_step"] % 4 != 0
    assert (four["global_step"], four["stop_reason"]) == (one["global_step"], one["stop_reason"])


# ---------------------------------------------------------------------------------------- stacked
def test_stacked_groups_ignore_steps_per_call_and_members_resume_under_it(tmp_path):
    from omegaconf import open_dict

    from shiftlab.trainers.checkpoint_io import load_weights_only
    from shiftlab.trainers.stacked.grouping import plan
    from shiftlab.trainers.stacked.run import train_stacked

    small = QUIET + ["model.hidden=[32,32]", "trainer.max_epochs=2", "torch_threads=1", "norm=none",
                     "optimizer=momentum", "scheduler=constant", "callbacks=default"]
    jobs = [small + [f"seed={s}", f"module.steps_per_call={n}"] for s, n in ((0, 1), (1, 3))]
    planned = [compose_cfg(job) for job in jobs]
    for c in planned:
        with open_dict(c):
            c.pop("hydra", None)
    assert plan(planned) == ([[0, 1]], {})
    train_stacked([compose_cfg(job, tmp_path / f"s{i}") for i, job in enumerate(jobs)], [tmp_path / "s0", tmp_path / "s1"])
    got = train(compose_cfg(small + ["seed=1", "module.steps_per_call=3", "trainer.max_epochs=3",
                                     f"ckpt_path={tmp_path / 's1/checkpoints/last.ckpt'}"], tmp_path / "resumed"))
    want = train(compose_cfg(small + ["seed=1", "trainer.max_epochs=3"], tmp_path / "plain"))
    assert got["status"] == "completed" and got["global_step"] == want["global_step"] == 60
    a = load_weights_only(tmp_path / "resumed/checkpoints/last.ckpt")
    b = load_weights_only(tmp_path / "plain/checkpoints/last.ckpt")
    for k in b["state_dict"]:  # stacked and plain steps differ by float reassociation only
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-5, atol=1e-6)
    assert a["loops"]["fit_loop"]["epoch_loop.batch_progress"] == b["loops"]["fit_loop"]["epoch_loop.batch_progress"]
