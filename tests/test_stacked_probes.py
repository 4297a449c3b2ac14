"""Epoch probes under launcher=stacked: each member's probes (memorization with label noise, gradient noise
scale, sharpness) log what its plain run logs, into the same files, and resume under a plain run."""
from __future__ import annotations

import json

import pytest
import torch

from shiftlab.trainers.checkpoint_io import load_weights_only
from shiftlab.trainers.stacked.grouping import why_not_stacked
from shiftlab.trainers.stacked.run import train_stacked
from shiftlab.trainers.train import train
from test_stacked import ATOL, RTOL, SMALL, _cfg

from conftest import compose_cfg

PROBED = ("norm=none", "optimizer=sgd", "scheduler=constant", "callbacks=batch_noise", "data.label_noise=0.3",
          "callbacks.noise_scale.every_n_epochs=1", "callbacks.sharpness.every_n_epochs=2",
          "callbacks.sharpness.max_overhead=null", "callbacks.sharpness.subset_size=128",
          "callbacks.memorization.max_samples=256")
PROBE_KEYS = ("mem/clean_acc", "mem/corrupt_acc_given", "mem/corrupt_loss_true", "noise/b_simple",
              "sharpness/top_eigenvalue", "sharpness/trace")


def test_stacked_members_probe_what_their_plain_runs_probe(tmp_path):
    seeds = (0, 1)
    dirs = [tmp_path / f"s{s}" for s in seeds]
    got = train_stacked([_cfg(d, s, *PROBED) for d, s in zip(dirs, seeds)], dirs)
    for seed, d, g in zip(seeds, dirs, got):
        plain_dir = tmp_path / f"plain{seed}"
        want = train(_cfg(plain_dir, seed, *PROBED))
        for key in PROBE_KEYS:
            assert g[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), f"seed {seed}: {key}"
        assert (d / "metrics.csv").read_text().splitlines()[0] == (plain_dir / "metrics.csv").read_text().splitlines()[0]
        for name in ("memorization", "noise_scale", "sharpness"):
            mine = json.loads((d / "probes" / f"{name}.json").read_text())["history"]
            plain = json.loads((plain_dir / "probes" / f"{name}.json").read_text())["history"]
            assert [(h["step"], h["epoch"]) for h in mine] == [(h["step"], h["epoch"]) for h in plain], name
        ck = load_weights_only(d / "checkpoints" / "last.ckpt")["callbacks"]
        plain_ck = load_weights_only(plain_dir / "checkpoints" / "last.ckpt")["callbacks"]
        assert set(ck) == set(plain_ck) - {"RunContract"}
        for a, b in zip(ck["EpochHistory"]["history"], plain_ck["EpochHistory"]["history"], strict=True):
            assert a.keys() == b.keys()
            assert {k: v for k, v in a.items() if "seconds" not in k and "cost" not in k} == pytest.approx(
                {k: v for k, v in b.items() if "seconds" not in k and "cost" not in k}, rel=1e-4, abs=1e-6)


def test_a_plain_run_resumes_a_probed_member(tmp_path):
    ov = (*PROBED, "trainer.max_epochs=2")
    dirs = [tmp_path / "s0", tmp_path / "s1"]
    train_stacked([_cfg(d, s, *ov) for s, d in enumerate(dirs)], dirs)
    resumed = train(_cfg(tmp_path / "resumed", 1, *PROBED, "trainer.max_epochs=3",
                         f"ckpt_path={dirs[1] / 'checkpoints' / 'last.ckpt'}"))
    want = train(_cfg(tmp_path / "plain", 1, *PROBED, "trainer.max_epochs=3"))
    assert resumed["status"] == "completed"
    hist = json.loads((tmp_path / "resumed" / "probes" / "memorization.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]  # the stacked epochs' history carried on
    assert resumed["mem/clean_acc"] == pytest.approx(want["mem/clean_acc"], rel=1e-4)
    a = load_weights_only(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_weights_only(tmp_path / "plain" / "checkpoints" / "last.ckpt")["state_dict"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL)


def test_probes_that_cannot_be_stacked_say_why():
    base = SMALL + ["norm=none"]
    assert why_not_stacked(compose_cfg(base + ["callbacks=batch_noise"])) is None
    assert "stop_rule" in why_not_stacked(compose_cfg(base + ["callbacks=sharpness",
                                                            "callbacks.sharpness.stop_rule=patience"]))
    assert "probes.max_overhead" in why_not_stacked(compose_cfg(base + ["callbacks=batch_noise",
                                                                      "probes.max_overhead=0.2"]))
