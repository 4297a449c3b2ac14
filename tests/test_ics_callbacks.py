"""The covariate-shift callbacks in real training runs: no effect on training, logging, state."""
from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch

from shiftlab.callbacks.activation_drift import ActivationDriftMonitor
from shiftlab.callbacks.gradient_ics import GradientICSMonitor
from shiftlab.callbacks.landscape import LandscapeSmoothnessMonitor


class LossRecorder(L.Callback):
    """Keeps every training step's loss tensor, per run tag (referenced from the config)."""

    runs: dict[str, list[torch.Tensor]] = {}

    def __init__(self, tag: str) -> None:
        self.tag = tag
        LossRecorder.runs[tag] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        LossRecorder.runs[self.tag].append(outputs["loss"].detach().clone())


BASE = ["norm=noisy_bn", "model.dropout=0.2", "optimizer=adam", "trainer.max_epochs=2",
        "+trainer.limit_train_batches=6", "+trainer.limit_val_batches=2", "test=false", "scheduler=constant",
        "trainer.deterministic=true"]
PROBES = ["callbacks=covariate_shift", "callbacks.activation_drift.every_n_steps=2",
          "callbacks.gradient_ics.every_n_steps=3", "callbacks.landscape.every_n_steps=3",
          "callbacks.landscape.num_etas=2", "callbacks.activation_drift.split=train"]


@pytest.mark.timeout(120)
def test_probes_leave_training_bit_identical(tmp_path):
    from conftest import QUIET, compose_cfg
    from shiftlab.trainers.train import train

    quiet = [o for o in QUIET if not o.startswith("callbacks=")]
    runs = {}
    for tag, extra in (("off", ["callbacks=default"]), ("on", PROBES)):
        out = tmp_path / tag
        cfg = compose_cfg(quiet + BASE + extra + ["+callbacks.recorder._target_=test_ics_callbacks.LossRecorder",
                                                   f"+callbacks.recorder.tag={tag}"], out)
        summary = train(cfg)
        runs[tag] = (summary, out)
    off, on = LossRecorder.runs["off"], LossRecorder.runs["on"]
    assert len(off) == len(on) == 12
    for a, b in zip(off, on):
        assert torch.equal(a, b), (off, on)
    w_off = torch.load(runs["off"][1] / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    w_on = torch.load(runs["on"][1] / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for k in w_off:
        assert torch.equal(w_off[k], w_on[k]), k

    summary, out = runs["on"]
    assert "gradient_ics/net.5/cos" in summary and "landscape/beta_smoothness" in summary
    hist = json.loads((out / "probes" / "gradient_ics.json").read_text())["history"]
    assert [h["step"] for h in hist] == [0, 3, 6, 9]
    drift = json.loads((out / "probes" / "activation_drift.json").read_text())["history"]
    assert [h["step"] for h in drift] == [0, 2, 4, 6, 8, 10]
    for name in ("activation_drift", "gradient_ics", "landscape"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    with open(out / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert "activation_drift/net.2/in/p50" in header and "landscape/loss_range" in header
    assert all(summary[f"probe_cost/{name}_s"] > 0 for name in ("activation_drift", "gradient_ics", "landscape"))


def test_callback_state_round_trip_and_off_switch():
    cb = GradientICSMonitor(every_n_steps=0)

    class T:
        global_step = 0

    assert not cb.due(T())
    cb2 = LandscapeSmoothnessMonitor(every_n_steps=5)
    assert cb2.due(T())
    cb2.history = [{"step": 0, "epoch": 0, "loss_range": 0.5}]
    cb2.seconds = 1.5
    assert not cb2.due(T())  # once per step
    fresh = LandscapeSmoothnessMonitor(every_n_steps=5)
    fresh.load_state_dict(cb2.state_dict())
    assert fresh.history == cb2.history and fresh.summary_items()["landscape/loss_range"] == 0.5
    assert fresh.summary_items()["probe_cost/landscape_s"] == 1.5
    assert LandscapeSmoothnessMonitor(eta_range=(1.0, 2.0), num_etas=3).etas(0.1) == pytest.approx([0.1, 0.15, 0.2])


def test_callbacks_reject_bad_values():
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientICSMonitor(every_n_steps=-1)
    with pytest.raises(ValueError, match="callbacks.activation_drift.split"):
        ActivationDriftMonitor(split="test")
    with pytest.raises(ValueError, match="callbacks.landscape.eta_range"):
        LandscapeSmoothnessMonitor(eta_range=(0.0, 1.0))


SHARPNESS = ["callbacks=[covariate_shift,sharpness]", "callbacks.sharpness.subset_size=64",
             "callbacks.sharpness.power_iters=3", "callbacks.sharpness.trace_samples=1"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_probes_under_two_process_cpu_ddp_with_synced_bn(tmp_path):
    """Lightning ddp_spawn (gloo, 2 CPU ranks), norm=batch_renorm syncing in-layer, all probes (and the
    sharpness callback) on:
    no deadlock (every rank runs the probes' forwards), probe files written by rank 0."""
    from conftest import QUIET, compose_cfg
    from shiftlab.trainers.train import train

    quiet = [o for o in QUIET if not o.startswith("callbacks=")]
    out = tmp_path / "ddp"
    cfg = compose_cfg(quiet + ["trainer=ddp_sim", "trainer.strategy=ddp_spawn", "norm=batch_renorm", "norm.warmup_steps=1", "norm.r_max_steps=3",
                               "norm.d_max_steps=3", "trainer.max_epochs=1", "+trainer.limit_train_batches=4",
                               "+trainer.limit_val_batches=1", "test=false"] + PROBES + SHARPNESS, out)
    summary = train(cfg)
    assert summary["status"] == "completed", summary
    sharp = json.loads((out / "probes" / "sharpness.json").read_text())["history"]  # an epoch probe too
    assert [h["epoch"] for h in sharp] == [0] and sharp[0]["top_eigenvalue"] > 0
    hist = json.loads((out / "probes" / "gradient_ics.json").read_text())["history"]
    assert [h["step"] for h in hist] == [0, 3]
    assert all(0 < h["net.4/grad_norm"] for h in hist)
