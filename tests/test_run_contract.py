"""The run directory contract: last.ckpt is the last epoch, signals stop at a step boundary with a
resumable checkpoint, divergence is caught before NaN, writes are atomic, directories unique."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shiftlab.trainers.checkpoint_io import CheckpointLoadError, RunWriteError, atomic_save, load_checkpoint
from shiftlab.trainers.run_dir import claim_unique_dir
from shiftlab.trainers.train import train

REPO = Path(__file__).resolve().parent.parent
COMMON = ["trainer.max_epochs=3", "trainer.deterministic=true", "callbacks=default", "optimizer=momentum",
          "data.label_noise=0.2", "callbacks.diagnosis=null"]


def _ckpt(path: Path) -> dict:
    return load_checkpoint(path)


def _cfg(tmp_path: Path, name: str, *overrides: str):
    from conftest import QUIET, compose_cfg

    return compose_cfg(QUIET + COMMON + list(overrides), tmp_path / name)


def test_last_ckpt_is_the_last_finished_epoch_even_when_best_is_earlier(tmp_path):
    # mode=min on val/acc makes the "best" checkpoint an early epoch: last.ckpt must not follow it.
    s = train(_cfg(tmp_path, "run", "callbacks.model_checkpoint.mode=min"))
    last, best = _ckpt(tmp_path / "run/checkpoints/last.ckpt"), _ckpt(tmp_path / "run/checkpoints/best.ckpt")
    assert last["epoch"] == 2 and last["global_step"] == s["global_step"]
    assert best["epoch"] < last["epoch"]
    accs = [h["val/acc"] for h in s and last["callbacks"]["EpochHistory"]["history"]]
    assert best["epoch"] == accs.index(min(accs))


@pytest.mark.parametrize("batching", ["mini", "full", "mini_dropout"])
def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(tmp_path, batching):
    extra = {"full": ["batching=full", "optimizer.lr=0.05"], "mini": [],
             "mini_dropout": ["model.dropout=0.2"]}[batching]
    batching = batching.split("_")[0]
    full = train(_cfg(tmp_path, "full", *extra))
    stop = ["+callbacks.sig._target_=helpers_callbacks.SignalAt", "+callbacks.sig.epoch=1",
            f"+callbacks.sig.batch={0 if batching == 'full' else 5}", f"+callbacks.sig.signum={int(signal.SIGTERM)}"]
    part = train(_cfg(tmp_path, "part", *extra, *stop))
    # mini: stops inside epoch 1; full: epoch 1's only step ends it, so the stop comes at epoch 2's start
    assert part["status"] == "preempted" and part["epoch"] == (1 if batching == "mini" else 2)
    saved = json.loads((tmp_path / "part/summary.json").read_text())
    assert saved["status"] == "preempted" and saved["resume_from"] == part["resume_from"]
    resume = Path(part["resume_from"])
    if batching == "mini":  # a mid-epoch checkpoint after the 6th step of epoch 1
        assert resume.name == "interrupted.ckpt"
        assert part["step"] == full["global_step"] // 3 + 6
    else:  # one step per epoch: the epoch's checkpoint is the boundary
        assert resume.name == "last.ckpt"
    resumed = train(_cfg(tmp_path, "resumed", *extra, f"ckpt_path={resume}"))
    assert resumed["status"] == "completed" and resumed["epochs_run"] == 3
    for key in ("val/loss", "val/acc", "train/loss", "train/loss_epoch_mean", "test/loss", "test/acc"):
        assert resumed[key] == full[key], key
    a = _ckpt(tmp_path / "full/checkpoints/last.ckpt")["state_dict"]
    b = _ckpt(tmp_path / "resumed/checkpoints/last.ckpt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_writes_an_interrupted_summary(tmp_path):
    stop = ["+callbacks.sig._target_=helpers_callbacks.SignalAt", "+callbacks.sig.epoch=0",
            "+callbacks.sig.batch=2", f"+callbacks.sig.signum={int(signal.SIGINT)}"]
    # what the process had (Python's default handler; SIG_IGN when a shell started it in the background)
    before = signal.getsignal(signal.SIGINT)
    s = train(_cfg(tmp_path, "run", *stop))
    assert s["status"] == "interrupted" and s["step"] == 3
    assert "SIGINT" in s["stop_reason"] and "interrupted.ckpt" in s["stop_reason"]
    assert _ckpt(Path(s["resume_from"]))["global_step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def _cli(*args: str, cwd: Path = REPO) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + str(REPO / "tests"), WANDB_MODE="offline")
    return subprocess.Popen([sys.executable, "-m", "shiftlab.trainers.train", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("signum,code,status", [(signal.SIGTERM, 143, "preempted"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_cli_signal_exit_codes_and_summary(tmp_path, signum, code, status):
    # A slow run (one sample per batch); the signal arrives once the first epoch is checkpointed.
    proc = _cli("print_config=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                "trainer.max_epochs=50", "batching.batch_size=2", "norm=none", "trainer.accelerator=cpu",
                f"hydra.run.dir={tmp_path}")
    deadline = time.time() + 120
    while not (tmp_path / "checkpoints/last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == status and summary["resume_from"]
    assert _ckpt(Path(summary["resume_from"]))  # loadable
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"shiftlab: {status}") and last.endswith(f"; run directory: {tmp_path}"), last
    assert "Traceback" not in err


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_blow_up_is_caught_before_nan_and_names_the_real_checkpoint(tmp_path, optimizer):
    s = train(_cfg(tmp_path, "run", f"optimizer={optimizer}", "optimizer.lr=1e6"))
    assert s["status"] == "diverged", s["stop_reason"]
    ckpts = sorted(p.name for p in (tmp_path / "run/checkpoints").glob("*.ckpt"))
    if ckpts:
        assert str(tmp_path / "run/checkpoints" / "last.ckpt") in s["stop_reason"]
        w = _ckpt(tmp_path / "run/checkpoints/last.ckpt")["state_dict"]
        assert all(torch.isfinite(v).all() and v.abs().max() < 1e6 for v in w.values() if v.is_floating_point())
    else:
        assert "no checkpoint was written" in s["stop_reason"]


def test_divergence_rule_functions():
    from shiftlab.callbacks.divergence import blew_up

    assert blew_up(float("nan"), 2.0, 100) and blew_up(float("inf"), None, None)
    assert blew_up(201.0, 2.0, 100) and not blew_up(199.0, 2.0, 100)
    assert not blew_up(1e9, 2.0, None) and not blew_up(5.0, -1.0, 100)


def test_guard_is_configurable(tmp_path):
    s = train(_cfg(tmp_path, "run", "optimizer=adam", "optimizer.lr=1e6", "divergence.max_loss_ratio=null",
                   "divergence.check_grad_norm=false", "trainer.max_epochs=1"))
    assert s["status"] in ("completed", "diverged")  # only NaN/inf would stop it now
    if s["status"] == "diverged":
        assert "became" in s["stop_reason"]


def test_failed_checkpoint_write_keeps_previous_file_and_fails_in_one_line(tmp_path, monkeypatch):
    import shiftlab.trainers.checkpoint_io as cio

    real_save, calls = torch.save, {"n": 0}

    def save_then_fill_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 4:  # epoch 0: last + best; epoch 1: the 4th write hits a full disk
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(cio.torch, "save", save_then_fill_disk)
    s = train(_cfg(tmp_path, "run"))
    assert s["status"] == "failed" and "No space left on device" in s["stop_reason"]
    assert "\n" not in s["stop_reason"]
    assert json.loads((tmp_path / "run/summary.json").read_text())["status"] == "failed"
    left = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert left == ["best.ckpt", "last.ckpt"] or left == ["last.ckpt"] or "best.ckpt" in left
    assert not [n for n in left if n.endswith(".tmp")]
    for name in left:
        assert _ckpt(tmp_path / "run/checkpoints" / name)["epoch"] <= 1


KILL_SCRIPT = r'''
import os, sys, time, torch
sys.path[:0] = [{repo!r}, {tests!r}]
import shiftlab.trainers.checkpoint_io as cio
real = torch.save
state = {{"n": 0}}
def slow_save(obj, f, *a, **k):
    state["n"] += 1
    if state["n"] == 3:  # the third checkpoint write: start it, then hang until killed
        f.write(b"x" * 4096); f.flush()
        open({marker!r}, "w").close()
        time.sleep(600)
    return real(obj, f, *a, **k)
cio.torch.save = slow_save
from conftest import QUIET, compose_cfg
from shiftlab.trainers.train import train
train(compose_cfg(QUIET + {common!r}, {out!r}))
'''


def test_kill_during_checkpoint_write_leaves_previous_checkpoint_loadable(tmp_path):
    marker = tmp_path / "writing"
    script = KILL_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), marker=str(marker),
                                common=COMMON, out=str(tmp_path / "run"))
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, WANDB_MODE="offline"))
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), "the child never reached the checkpoint write"
    proc.kill()
    proc.wait(timeout=30)
    ckpts = tmp_path / "run/checkpoints"
    assert _ckpt(ckpts / "last.ckpt")["epoch"] == 0  # epoch 0's checkpoint, intact
    assert _ckpt(ckpts / "best.ckpt")["epoch"] == 0


def test_damaged_checkpoints_are_refused_in_one_line(tmp_path):
    good = tmp_path / "good.ckpt"
    atomic_save({"state_dict": {"w": torch.ones(2)}, "epoch": 0}, good)
    assert load_checkpoint(good)["epoch"] == 0
    data = good.read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.ckpt").write_bytes(os.urandom(4096))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    torch.save({"state_dict": {}, "x": Evil()}, tmp_path / "evil.ckpt")
    for name in ("trunc", "noise", "evil", "missing"):
        with pytest.raises(CheckpointLoadError) as e:
            load_checkpoint(tmp_path / f"{name}.ckpt")
        assert "\n" not in str(e.value)
    assert not (tmp_path / "owned").exists()


def test_atomic_save_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.ckpt"
    atomic_save({"v": 1}, path)

    def broken(obj, f, *a, **k):
        f.write(b"junk")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RunWriteError, match="x.ckpt"):
        atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert list(tmp_path.iterdir()) == [path]


def test_unique_dirs_across_processes(tmp_path):
    base = str(tmp_path / "runs" / "same-second")
    code = f"from shiftlab.trainers.run_dir import claim_unique_dir; print(claim_unique_dir({base!r}))"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    got = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert len(set(got)) == 4 and all(Path(g).is_dir() for g in got), got
    assert claim_unique_dir(str(tmp_path / "x")) == claim_unique_dir(str(tmp_path / "x"))  # idempotent


def test_two_cli_runs_in_the_same_second_get_two_directories(tmp_path):
    args = ["print_config=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "trainer.max_epochs=1", "trainer.accelerator=cpu", "callbacks=none", f"paths.log_dir={tmp_path}",
            "hydra.run.dir=${shiftlab_unique_dir:" + str(tmp_path) + "/runs/fixed}"]
    procs = [_cli(*args), _cli(*args)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-1500:]
    dirs = sorted(o[0].strip().splitlines()[-1].split("run directory: ")[1] for o in outs)
    assert dirs == [f"{tmp_path}/runs/fixed", f"{tmp_path}/runs/fixed_1"]
    assert all(json.loads((Path(d) / "summary.json").read_text())["status"] == "completed" for d in dirs)
