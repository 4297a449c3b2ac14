"""Every logger gets the resolved config, the run's identity and its plots; tests use the best weights."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from shiftlab.trainers.train import train

QUIET_CB = ["print_config=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "trainer.accelerator=cpu"]


def _tb_hparams(tb_dir: Path) -> tuple[dict, list[str], list[str]]:
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = ea.EventAccumulator(str(tb_dir), size_guidance={ea.IMAGES: 0})
    acc.Reload()
    hparams, metrics = {}, []
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for k, v in data.session_start_info.hparams.items():
                hparams[k] = v.number_value if v.HasField("number_value") else v.string_value
        if data.HasField("experiment"):
            metrics = [m.name.tag for m in data.experiment.metric_infos]
    return hparams, metrics, acc.Tags()["images"]


@pytest.fixture(scope="module")
def many_run(tmp_path_factory):
    from tests.conftest import compose_cfg

    out = tmp_path_factory.mktemp("loggers") / "run_42"
    cfg = compose_cfg(QUIET_CB + ["logger=many", "trainer.max_epochs=3", "optimizer.lr=0.003",
                                  "task_name=logger_test"], out)
    return cfg, train(cfg), out


def test_tensorboard_gets_the_config_with_the_final_metrics_and_the_plots(many_run):
    cfg, summary, out = many_run
    hparams, metrics, images = _tb_hparams(out / "tensorboard")
    assert hparams["optimizer/lr"] == pytest.approx(0.003)
    assert hparams["model/_target_"] == cfg.model._target_
    assert hparams["run/name"] == "run_42" and hparams["run/group"] == "logger_test"
    assert {"final/test/acc", "final/val/loss"} <= set(metrics)
    assert {f"plots/{p.stem}" for p in (out / "plots").glob("*.png")} == set(images) and images


def test_csv_hparams_hold_the_resolved_config(many_run):
    cfg, _, out = many_run
    saved = yaml.safe_load((out / "hparams.yaml").read_text())
    assert saved["optimizer"]["lr"] == pytest.approx(0.003)
    assert saved["run"]["dir"] == str(out) and "${" not in (out / "hparams.yaml").read_text()
    assert "hydra" not in saved


def test_wandb_offline_run_has_name_group_config_and_images_and_can_be_synced_later(many_run):
    cfg, _, out = many_run
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record_log = next(runs[0].glob("run-*.wandb")).read_bytes()
    # wandb's record log stores the config as JSON values, the run's name and group as strings
    for needle in (b"run_42", b"logger_test", b"optimized_metric", b"test_ckpt", b"final/test/acc"):
        assert needle in record_log, needle
    media = {p.name.split("_")[0] for p in (runs[0] / "files" / "media" / "images" / "plots").glob("*.png")}
    assert {"learning", "confusion"} <= media
    # `wandb sync` (documented in the README) finds the offline run from the run directory, without network
    res = subprocess.run(["wandb", "sync", "--dry-run"], cwd=out, capture_output=True, text=True, timeout=120,
                         env={"PATH": str(Path(__import__("sys").executable).parent), "HOME": str(out),
                              "WANDB_MODE": "offline"})
    run_id = runs[0].name.rsplit("-", 1)[-1]
    assert res.returncode == 0 and f"run-{run_id}.wandb" in res.stdout + res.stderr


def _accuracy_of(ckpt: Path, cfg) -> float:
    from shiftlab.trainers.build import build_datamodule, build_module
    from shiftlab.trainers.checkpoint_io import load_weights_only
    from shiftlab.trainers.summary import evaluate_split

    dm = build_datamodule(cfg)
    dm.setup("test")
    module = build_module(cfg, dm)
    module.load_state_dict(load_weights_only(ckpt)["state_dict"])
    return evaluate_split(module.model, dm.test_set.x, dm.test_set.y, torch.device("cpu"))["acc"]


@pytest.mark.parametrize("which", ["best", "last"])
def test_test_figures_come_from_the_checkpoint_summary_names(run_cfg, which):
    # lr high enough that the last epoch is not the best one often; the check holds either way
    cfg = run_cfg("trainer.max_epochs=4", f"test_ckpt={which}", "callbacks=default",
                  "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")
    summary = train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / f"{which}.ckpt"
    assert summary["test/weights"].startswith(f"{which}: {which}.ckpt")
    assert summary["test/acc"] == pytest.approx(_accuracy_of(ckpt, cfg), abs=1e-6)
    assert summary["train/weights"].startswith("final")
    json.dumps(summary)


def test_without_checkpoints_the_summary_says_final_weights(run_cfg):
    summary = train(run_cfg("trainer.max_epochs=1"))  # QUIET has callbacks=none: no checkpoint callbacks
    assert summary["test/weights"].startswith("final:")


def test_label_noise_run_reports_clean_and_corrupted_accuracy_without_a_callbacks_option(run_cfg):
    cfg = run_cfg("trainer.max_epochs=2", "data.label_noise=0.4")  # QUIET: callbacks=none
    summary = train(cfg)
    for key in ("mem/clean_acc", "mem/corrupt_acc_given", "mem/corrupt_acc_true"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["mem/frac_corrupted"] == pytest.approx(0.4, abs=0.05)
    # per epoch too: the learning-curve plot draws these from the run history
    rows = [ln for ln in (Path(cfg.paths.output_dir) / "metrics.csv").read_text().splitlines()]
    assert "mem/clean_acc" in rows[0]
    clean = train(run_cfg("trainer.max_epochs=1"))
    assert "mem/clean_acc" not in clean
