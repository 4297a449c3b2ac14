"""End-to-end chain-model runs through the spine (tiny data, CPU): summary keys, ceilings,
plots, batching regimes, and the refusal to train a chain model as a plain classifier."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import QUIET, compose_cfg
from shiftlab.trainers.train import train

SMALL = ["data.num_sequences=240", "data.length=12", "data.min_length=6", "trainer.max_epochs=2"]


def test_hmm_run_reports_ceilings_and_plots(run_cfg, tmp_path):
    summary = train(run_cfg("experiment=pgm_hmm", *SMALL, "trainer.max_epochs=4"))
    out = tmp_path / "run"
    saved = json.loads((out / "summary.json").read_text())
    for key in ("test/acc", "test/seq_acc", "test/ll_per_token", "test/true_ll_per_token", "test/bayes_acc",
                "test/gap_to_bayes_acc", "test/ece", "test/bayes_ece", "train/loss", "train/acc",
                "val/bayes_acc", "val/true_ll_per_token"):
        assert isinstance(saved[key], float), key
    assert saved["model_kind"].startswith("unsupervised")
    assert 0.0 <= saved["train/acc"] <= 1.0  # the spine's classifier scoring is replaced
    assert saved["test/gap_to_bayes_acc"] == pytest.approx(saved["test/bayes_acc"] - saved["test/acc"])
    assert saved["test/bayes_acc"] >= saved["test/acc"] - 0.02
    assert saved["test/true_ll_per_token"] >= saved["test/ll_per_token"] - 0.02
    assert (out / "plots" / "reliability.png").stat().st_size > 1000
    assert (out / "plots" / "confusion_matrix.png").exists()
    curves = json.loads((out / "plots" / "reliability.json").read_text())
    assert set(curves) == {"model", "true model (Bayes)"}
    assert summary["test/loss"] == pytest.approx(-summary["test/ll_per_token"], rel=1e-4)


def test_crf_full_batch_with_label_noise(run_cfg):
    s = train(run_cfg("experiment=pgm_crf", *SMALL, "batching=full", "data.label_noise=0.2",
                      "optimizer.lr=0.05"))
    assert s["status"] == "completed" and s["global_step"] == 2  # one step per epoch
    assert s["model_kind"] == "supervised"
    assert "train/acc_vs_true_labels" in s and s["data"]["corrupted_tokens"] > 0
    assert s["test/true_ll_per_token"] <= 0.0 and s["test/ll_per_token"] <= 0.0


def test_full_batch_gradient_does_not_depend_on_chunking(tmp_path):
    """Exact full-batch GD: one SGD step from the whole-set per-token NLL, whatever the chunks."""
    weights = []
    for chunk in (7, 4096):
        out = tmp_path / f"chunk{chunk}"
        cfg = compose_cfg(QUIET + ["experiment=pgm_hmm", *SMALL, "trainer.max_epochs=1", "batching=full",
                                   f"batching.chunk_size={chunk}", "optimizer=sgd", "optimizer.lr=0.5",
                                   "test=false"], out)
        train(cfg)
        ckpt = torch.load(sorted(out.rglob("*.ckpt"))[-1], weights_only=False)
        assert ckpt["global_step"] == 1
        weights.append(ckpt["state_dict"])
    for k in weights[0]:
        assert torch.allclose(weights[0][k], weights[1][k], atol=1e-6), k


def test_softmax_baseline_runs_with_sgd(run_cfg):
    s = train(run_cfg("experiment=pgm_softmax", *SMALL, "optimizer=sgd", "optimizer.lr=0.5"))
    assert s["status"] == "completed" and 0.0 < s["test/acc"] <= 1.0


def test_chain_model_refuses_the_classifier_module(run_cfg):
    """The model declares its task; a module for another task is a config error (one line, before
    any training), in both directions."""
    from shiftlab.trainers.config_checks import ConfigError

    with pytest.raises(ConfigError, match="^module=classification is not allowed .*allowed: module=sequence$"):
        train(run_cfg("experiment=pgm_crf", *SMALL, "module=classification"))
    with pytest.raises(ConfigError, match="^module=sequence is not allowed .*allowed: module=classification$"):
        train(run_cfg("data=synthetic", "module=sequence"))
