"""launcher=stacked with per-member values: each member's own learning rate / weight decay, label-noise rate
(with the memorization probe a plain label-noise run adds) and early stopping, checked member by member
against the plain runs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg
from shiftlab.trainers.checkpoint_io import load_weights_only
from shiftlab.trainers.stacked.grouping import plan, why_not_stacked
from shiftlab.trainers.stacked.run import train_stacked
from shiftlab.trainers.train import train
from test_stacked import ATOL, RTOL, SMALL, _close

# (seed, per-member overrides): three members that differ in more than their seed
LR_WD = [(0, ("optimizer.lr=0.05", "optimizer.weight_decay=0.0")),
         (1, ("optimizer.lr=0.01", "optimizer.weight_decay=0.01")),
         (2, ("optimizer.lr=0.1", "optimizer.weight_decay=0.001"))]


# patience=1 on val/loss with three learning rates: members that stop after different epochs
STOPPING = ("optimizer=sgd", "scheduler=constant", "callbacks=patience_stop", "callbacks.patience_stop.patience=1",
            "trainer.max_epochs=6", "data.train_fraction=0.3")
STOPPING_MEMBERS = [(0, ("optimizer.lr=2.0",)), (1, ("optimizer.lr=1.0",)), (2, ("optimizer.lr=0.05",))]


def _run_both(tmp_path: Path, members, *common: str) -> list[tuple[dict, dict, Path, Path]]:
    """Train ``members`` stacked and each alone; (stacked summary, plain summary, stacked dir, plain dir)."""
    cfg = lambda out, seed, own: compose_cfg(SMALL + [f"seed={seed}", *common, *own], out)  # noqa: E731
    dirs = [tmp_path / f"stacked{j}" for j in range(len(members))]
    got = train_stacked([cfg(d, s, own) for d, (s, own) in zip(dirs, members)], dirs)
    out = []
    for j, (seed, own) in enumerate(members):
        plain_dir = tmp_path / f"plain{j}"
        out.append((got[j], train(cfg(plain_dir, seed, own)), dirs[j], plain_dir))
    return out


def _ckpt(d: Path, name: str = "last.ckpt") -> dict:
    return load_weights_only(d / "checkpoints" / name)


def _assert_tensors_close(a, b, what: str) -> None:
    if torch.is_tensor(b):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=what)
    elif isinstance(b, dict):
        assert a.keys() == b.keys(), what
        for k in b:
            _assert_tensors_close(a[k], b[k], f"{what}.{k}")
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), what
        for n, (x, y) in enumerate(zip(a, b)):
            _assert_tensors_close(x, y, f"{what}[{n}]")
    elif isinstance(b, float):
        _close(a, b, what)
    else:
        assert a == b, what


def test_members_with_different_seeds_lr_weight_decay_and_label_noise_form_one_group():
    cfgs = [compose_cfg(SMALL + [f"seed={s}", "norm=none", *own]) for s, own in LR_WD]
    cfgs.append(compose_cfg(SMALL + ["seed=3", "norm=none", "data.label_noise=0.2"]))
    cfgs.append(compose_cfg(SMALL + ["seed=4", "norm=none", "optimizer.betas=[0.8,0.99]"]))
    # a value that interpolates the learning rate differs with it: such jobs are not one group
    cfgs += [compose_cfg(SMALL + [f"seed={s}", "norm=none", f"optimizer.lr={lr}", "+lr_copy=${optimizer.lr}"])
             for s, lr in ((5, 0.1), (6, 0.2))]
    groups, alone = plan(cfgs)
    assert groups == [[0, 1, 2, 3]] and sorted(alone) == [4, 5, 6]
    assert why_not_stacked(compose_cfg(SMALL + ["norm=none", "callbacks=patience_stop",
                                                "callbacks.patience_stop.monitor=mem/clean_acc"])) \
        .startswith("callbacks.patience_stop.monitor=mem/clean_acc")
    assert why_not_stacked(compose_cfg(SMALL + ["norm=none", "data.label_noise=0.2", "probes.max_overhead=0.1"])) \
        .startswith("probes.max_overhead")


@pytest.mark.parametrize("common", [("norm=none", "optimizer=momentum", "scheduler=cosine"),
                                    ("norm=layernorm", "optimizer=adamw")], ids=["momentum-cosine", "adamw"])
def test_per_member_lr_and_weight_decay_equal_their_plain_runs(tmp_path, common):
    for j, (got, want, d, p) in enumerate(_run_both(tmp_path, LR_WD, *common)):
        for key in ("val/loss", "val/acc", "train/loss", "test/loss", "test/acc"):
            _close(got[key], want[key], f"member {j}: {key}")
        mine, plain = _ckpt(d), _ckpt(p)
        _assert_tensors_close(mine["state_dict"], plain["state_dict"], f"member {j} weights")
        # the member's own param group (lr, initial_lr, weight_decay, ...) and state, and its scheduler
        _assert_tensors_close(mine["optimizer_states"], plain["optimizer_states"], f"member {j} optimizer")
        _assert_tensors_close(mine["lr_schedulers"], plain["lr_schedulers"], f"member {j} scheduler")


def test_plain_run_resumes_a_member_with_its_own_learning_rate(tmp_path):
    """The second member's last.ckpt (lr 0.01, weight decay 0.01) continues under a plain run to epoch 3 and
    ends where a plain 3-epoch run of that config ends."""
    common = ("norm=none", "optimizer=momentum", "scheduler=constant")
    own = LR_WD[1][1]
    dirs = [tmp_path / "s0", tmp_path / "s1"]
    train_stacked([compose_cfg(SMALL + [f"seed={s}", *common, *o], d) for (s, o), d in zip(LR_WD[:2], dirs)], dirs)
    resumed = compose_cfg(SMALL + ["seed=1", *common, *own, "trainer.max_epochs=3",
                                   f"ckpt_path={dirs[1] / 'checkpoints/last.ckpt'}"], tmp_path / "resumed")
    got = train(resumed)
    want = train(compose_cfg(SMALL + ["seed=1", *common, *own, "trainer.max_epochs=3"], tmp_path / "plain"))
    assert got["status"] == "completed" and got["global_step"] == want["global_step"]
    _assert_tensors_close(_ckpt(tmp_path / "resumed")["state_dict"], _ckpt(tmp_path / "plain")["state_dict"],
                          "resumed weights")


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_label_noise_members_log_their_plain_runs_memorization(tmp_path):
    """Per-member noise rates (0, 0.2, 0.4): each member's noisy labels come from its own data module, and
    its mem/* values (metrics.csv every epoch, summary.json, probes/memorization.json, checkpoint) equal its
    plain run's; the clean member logs none, as its plain run."""
    members = [(0, ("data.label_noise=0.0",)), (1, ("data.label_noise=0.2",)), (2, ("data.label_noise=0.4",))]
    for j, (got, want, d, p) in enumerate(_run_both(tmp_path, members, "norm=none", "optimizer=adam")):
        mem = sorted(k for k in want if k.startswith("mem/"))
        assert mem == sorted(k for k in got if k.startswith("mem/")) and (len(mem) == 7) == (j > 0)
        for key in mem + ["train/loss", "train/acc", "test/acc"] + (["train/acc_vs_true_labels"] if j else []):
            _close(got[key], want[key], f"member {j}: {key}")
        assert got["data"] == want["data"]
        mine_rows, plain_rows = _csv_rows(d / "metrics.csv"), _csv_rows(p / "metrics.csv")
        assert list(mine_rows[0]) == list(plain_rows[0])  # the same columns in the same order
        assert len(mine_rows) == len(plain_rows)
        for a, b in zip(mine_rows, plain_rows):
            for k in b:
                if k.startswith("mem/") and b[k]:
                    _close(float(a[k]), float(b[k]), f"member {j}: metrics.csv {k}")
                elif not k.startswith(("mem/", "probe_cost/")):
                    assert (a[k] == "") == (b[k] == ""), k
        if j:
            hist = lambda path: json.loads(path.read_text())["history"]  # noqa: E731
            for a, b in zip(hist(d / "probes" / "memorization.json"), hist(p / "probes" / "memorization.json"),
                            strict=True):
                assert a.keys() == b.keys() and a == pytest.approx(b, rel=RTOL, abs=ATOL)
        states_mine, states_plain = _ckpt(d)["callbacks"], _ckpt(p)["callbacks"]
        assert set(states_mine) == set(states_plain) - {"RunContract"}
        for a, b in zip(states_mine["EpochHistory"]["history"], states_plain["EpochHistory"]["history"], strict=True):
            a = {k: v for k, v in a.items() if not k.startswith("probe_cost/")}  # seconds differ
            b = {k: v for k, v in b.items() if not k.startswith("probe_cost/")}
            assert a.keys() == b.keys() and a == pytest.approx(b, rel=RTOL, abs=ATOL)


def test_members_stop_early_where_their_plain_runs_stop(tmp_path):
    """patience=1 on val/loss: the member at lr 2.0 stops after epoch 1, the one at lr 1.0 after epoch 3,
    the one at lr 0.05 runs all 6 epochs. Each stopped member freezes with its restored best weights;
    status, stop reason, steps, test report (on the restored weights), rule state and checkpoints equal the
    plain run's."""
    epochs = []
    for j, (got, want, d, p) in enumerate(_run_both(tmp_path, STOPPING_MEMBERS, "norm=none", *STOPPING)):
        epochs.append(want["epochs_run"])
        assert (got["status"], got["epochs_run"], got["global_step"], got["stop_reason"], got["test/weights"]) == \
            (want["status"], want["epochs_run"], want["global_step"], want["stop_reason"], want["test/weights"])
        _assert_tensors_close(got["early_stopping"], want["early_stopping"], f"member {j}: early_stopping")
        for key in ("val/loss", "train/loss", "train/acc", "test/loss", "test/acc"):
            _close(got[key], want[key], f"member {j}: {key}")
        mine, plain = _ckpt(d), _ckpt(p)
        assert (mine["epoch"], mine["global_step"]) == (plain["epoch"], plain["global_step"])
        _assert_tensors_close(mine["state_dict"], plain["state_dict"], f"member {j}: last.ckpt weights")
        key = next(k for k in plain["callbacks"] if k.startswith("PatienceStopping"))
        _assert_tensors_close(mine["callbacks"][key], plain["callbacks"][key], f"member {j}: rule state")
        mine, plain = _ckpt(d, "best.ckpt"), _ckpt(p, "best.ckpt")
        assert mine["epoch"] == plain["epoch"]
        _assert_tensors_close(mine["callbacks"][key], plain["callbacks"][key], f"member {j}: best.ckpt rule state")
        wait = lambda rows: [r["early_stop/wait"] for r in rows if r["early_stop/wait"]]  # noqa: E731
        assert wait(_csv_rows(d / "metrics.csv")) == wait(_csv_rows(p / "metrics.csv"))
    assert epochs == [2, 4, 6]


def test_a_diverging_member_freezes_and_the_others_end_where_their_plain_runs_end(tmp_path):
    """lr 1e3 blows member 0 up in its first epoch (diverged, at its plain run's step); member 1 (lr 0.05)
    trains on, unaffected, to its plain run's weights."""
    members = [(0, ("optimizer.lr=1e3",)), (1, ("optimizer.lr=0.05",))]
    (bad, bad_plain, _, _), (good, good_plain, d, p) = _run_both(
        tmp_path, members, "norm=none", "optimizer=sgd", "scheduler=constant", "divergence.max_loss_ratio=100")
    assert bad_plain["status"] == "diverged" and good_plain["status"] == "completed"
    for got, want in ((bad, bad_plain), (good, good_plain)):
        assert (got["status"], got["epochs_run"], got["global_step"]) == \
            (want["status"], want["epochs_run"], want["global_step"])
    assert bad["stop_reason"].split(" at epoch")[1].split(";")[0] == \
        bad_plain["stop_reason"].split(" at epoch")[1].split(";")[0]
    for key in ("val/loss", "train/loss", "test/acc"):
        _close(good[key], good_plain[key], key)
    _assert_tensors_close(_ckpt(d)["state_dict"], _ckpt(p)["state_dict"], "member 1 weights")


def test_the_group_ends_when_every_member_has_stopped(tmp_path, monkeypatch):
    """Members stopping after epochs 1 and 3 (of max 6): the group trains 4 epochs, not 6."""
    from shiftlab.trainers.stacked.engine import StackedGroup

    trained = []
    original = StackedGroup.train_epoch
    monkeypatch.setattr(StackedGroup, "train_epoch", lambda self, epoch: trained.append(epoch) or original(self, epoch))
    common = ["norm=none", "optimizer=sgd", "scheduler=constant", "callbacks=patience_stop",
              "callbacks.patience_stop.patience=1", "trainer.max_epochs=6", "data.train_fraction=0.3"]
    dirs = [tmp_path / "a", tmp_path / "b"]
    got = train_stacked([compose_cfg(SMALL + common + ["seed=0", "optimizer.lr=2.0"], dirs[0]),
                         compose_cfg(SMALL + common + ["seed=1", "optimizer.lr=1.0"], dirs[1])], dirs)
    assert [g["epochs_run"] for g in got] == [2, 4] and trained == [0, 1, 2, 3]
    assert all(g["early_stopping"]["stopped"] for g in got)


def test_curvature_rule_sees_the_members_standard_errors_and_logs_its_diagnostics(tmp_path):
    """callbacks=curvature_stop (reads val/loss, train/loss and val/loss_se, logs early_stop/* every epoch):
    each member's rule state, summary entry and logged diagnostics equal its plain run's."""
    members = [(0, ("optimizer.lr=0.05",)), (1, ("optimizer.lr=0.5",))]
    for j, (got, want, d, p) in enumerate(_run_both(tmp_path, members, "norm=none", "optimizer=sgd",
                                                    "callbacks=curvature_stop", "callbacks.curvature_stop.warmup=2",
                                                    "trainer.max_epochs=5")):
        assert (got["status"], got["epochs_run"], got["stop_reason"]) == \
            (want["status"], want["epochs_run"], want["stop_reason"])
        _assert_tensors_close(got["early_stopping"], want["early_stopping"], f"member {j}: early_stopping")
        rows = lambda d: [{k: v for k, v in r.items() if k.startswith("early_stop/")}  # noqa: E731
                          for r in _ckpt(d)["callbacks"]["EpochHistory"]["history"]]
        assert any(rows(p)) and [r.keys() for r in rows(d)] == [r.keys() for r in rows(p)]
        for a, b in zip(rows(d), rows(p)):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
        key = next(k for k in _ckpt(p)["callbacks"] if k.startswith("CurvatureEarlyStopping"))
        _assert_tensors_close(_ckpt(d)["callbacks"][key], _ckpt(p)["callbacks"][key], f"member {j}: rule state")


def _group(tmp_path: Path, *overrides: str, lrs=(None, None, None)):
    from shiftlab.trainers.stacked.engine import StackedGroup, build_member

    own = lambda lr: [f"optimizer.lr={lr}"] if lr is not None else []  # noqa: E731
    cfgs = [compose_cfg(SMALL + [f"seed={s}", *overrides, *own(lr)], tmp_path / f"m{s}") for s, lr in enumerate(lrs)]
    return StackedGroup([build_member(c) for c in cfgs], torch.device("cpu"))


@pytest.mark.parametrize("opt", ["adam", "momentum"])
def test_shared_optimizer_group_steps_like_per_member_groups_and_keeps_a_stopped_member_still(tmp_path, opt,
                                                                                             monkeypatch):
    """Members whose settings agree share one param group over the stacked tensors; each member's update and
    optimizer state equal those of per-member groups, and a stopped member's weights and state stay put."""
    import shiftlab.trainers.stacked.engine as engine

    common = ("norm=none", f"optimizer={opt}", "data.train_fraction=0.3")
    shared = _group(tmp_path / "a", *common)
    monkeypatch.setattr(engine, "same_settings", lambda a, b: False)
    per_member = _group(tmp_path / "b", *common)
    monkeypatch.undo()
    assert shared.shared and len(shared.optimizer.param_groups) == 1
    assert not per_member.shared and len(per_member.optimizer.param_groups) == 3
    assert not _group(tmp_path / "c", *common, lrs=(0.01, 0.02, 0.01)).shared
    for g in (shared, per_member):
        g.train_epoch(0)
        g.active[1] = False
    frozen = (shared.member_weights(1), shared.member_optimizer_state(1)["state"])
    for g in (shared, per_member):
        g.train_epoch(1)
    for i in range(3):
        _assert_tensors_close(shared.member_weights(i), per_member.member_weights(i), f"member {i} weights")
        if i != 1:
            _assert_tensors_close(shared.member_optimizer_state(i), per_member.member_optimizer_state(i),
                                  f"member {i} optimizer state")
    _assert_tensors_close(shared.member_weights(1), frozen[0], "stopped member's weights")
    state = shared.member_optimizer_state(1)["state"]
    for j, s in frozen[1].items():
        for k, v in s.items():
            if v.dim():  # the moments; a shared step count runs on with the active members
                assert torch.equal(state[j][k], v), f"stopped member's {k}"


def test_batchnorm_members_stop_early_where_their_plain_runs_stop(tmp_path):
    """A stopped BatchNorm member keeps its running statistics: the others' train-mode forwards go on updating
    every member's buffers, so they are put back after each epoch (without that, the stopped members' final
    train-split figures, taken in eval mode, drifted: train/loss 0.229 vs 0.258)."""
    epochs = []
    for j, (got, want, d, p) in enumerate(_run_both(tmp_path, STOPPING_MEMBERS, "norm=batchnorm", *STOPPING)):
        epochs.append(want["epochs_run"])
        assert (got["epochs_run"], got["global_step"]) == (want["epochs_run"], want["global_step"])
        for key in ("val/loss", "train/loss", "test/loss", "test/acc"):
            _close(got[key], want[key], f"member {j}: {key}")
        _assert_tensors_close(_ckpt(d)["state_dict"], _ckpt(p)["state_dict"], f"member {j}: last.ckpt")
    assert len(set(epochs)) > 1, epochs  # members stopped at different epochs
