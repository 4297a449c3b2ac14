"""Bad input: every config group, one line naming the key, before anything is trained.

The table runs in-process the way ``shiftlab-train`` does (compose the overrides with Hydra,
check the composed config, build data and module, check the built objects) without training; a
few of the same cases then go through the command line end to end.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shiftlab.trainers.built_checks import check_built
from shiftlab.trainers.cli_checks import compose_checked
from shiftlab.trainers.compose import CONFIG_DIR as _CONFIG_DIR
from shiftlab.trainers.compose import hydra_context as _hydra
from shiftlab.trainers.config_checks import ConfigError, check_config

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(_CONFIG_DIR)
QUIET = ["print_config=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "callbacks=none", "trainer.accelerator=cpu"]
NO_GPU = not torch.cuda.is_available()


def validate(overrides: list[str], out: Path) -> None:
    """What ``shiftlab-train`` does before ``trainer.fit``, minus the trainer."""
    from omegaconf import open_dict

    from shiftlab.trainers.build import build_datamodule, build_module

    with _hydra(CONFIG_DIR):
        cfg = compose_checked("train", QUIET + overrides + [f"paths.output_dir={out}"])
    with open_dict(cfg):
        cfg.pop("hydra", None)
    check_config(cfg)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    check_built(cfg, dm, build_module(cfg, dm))


def state_of(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The state_dict a LightningModule built from ``overrides`` would checkpoint."""
    from shiftlab.trainers.build import build_datamodule, build_module

    with _hydra(CONFIG_DIR):
        cfg = compose_checked("train", QUIET + overrides + ["paths.output_dir=/tmp/unused"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    return build_module(cfg, dm).state_dict()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint files: this model's, another model's, truncated, random bytes, empty."""
    root = tmp_path_factory.mktemp("ckpts")
    files = {"good": root / "good.ckpt", "other": root / "other.ckpt", "truncated": root / "truncated.ckpt",
             "random": root / "random.ckpt", "empty": root / "empty.ckpt", "pickle": root / "pickle.ckpt"}
    torch.save({"epoch": 0, "state_dict": state_of([])}, files["good"])
    torch.save({"epoch": 0, "state_dict": state_of(["model.hidden=[64]"])}, files["other"])
    data = files["good"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["random"].write_bytes(random.Random(0).randbytes(4096))
    files["empty"].write_bytes(b"")
    torch.save({"state_dict": {}, "hook": os.system}, files["pickle"])  # a global outside the allow-list
    return files


# (overrides, text the one-line message must contain: the key as typed)
CASES: list[tuple[str, str]] = [
    # unknown group options, every group
    ("optimizer=foo", "optimizer=foo"),
    ("scheduler=linear", "scheduler=linear"),
    ("model=transformer", "model=transformer"),
    ("data=imagenet", "data=imagenet"),
    ("norm=rmsnorm", "norm=rmsnorm"),
    ("batching=micro", "batching=micro"),
    ("trainer=tpu", "trainer=tpu"),
    ("callbacks=nope", "callbacks=nope"),
    ("logger=mlflow", "logger=mlflow"),
    ("debug=verbose", "debug=verbose"),
    ("experiment=nope", "experiment=nope"),
    ("module=regression", "module=regression"),
    ("launcher=ray", "launcher=ray"),
    ("hparams_search=nope", "hparams_search=nope"),
    ("+optimizer=sgd", "+optimizer=sgd"),
    # unknown keys and typos, with and without +
    ("optimizer.lrr=0.1", "optimizer.lrr=0.1"),
    ("trainer.max_epoch=3", "trainer.max_epoch=3"),
    ("optimzer.lr=0.1", "optimzer.lr=0.1"),
    ("+optimzer.lr=0.1", "+optimzer.lr=0.1"),
    ("+trainer.max_epoch=3", "+trainer.max_epoch=3"),
    ("+experimnt=label_noise", "+experimnt=label_noise"),
    ("data.val_frac=0.2", "data.val_frac=0.2"),
    ("paths.dataa_dir=/tmp", "paths.dataa_dir=/tmp"),
    ("callbacks=gl_stop callbacks.gl_stop.alpah=1", "callbacks.gl_stop.alpah=1"),
    ("+trainer.bogus_flag=1", "trainer.bogus_flag=1"),
    ("+model.width=3", "model.width=3"),
    ("+logger.csv.flush_every=3", "logger.csv.flush_every=3"),
    ("optimizer.lr=0.1,0.2", "optimizer.lr=0.1,0.2"),
    ("optimizer.lr=[1", "optimizer.lr=[1"),
    ("norm.name=bogus", "norm.name=bogus"),  # configs name the builder in _target_; there is no name key
    ("norm._target_=shiftlab.trainers.norms.bogus.build", "norm._target_=shiftlab.trainers.norms.bogus.build"),
    ("optimizer._target_=torch.optim.Adamax", "optimizer._target_=torch.optim.Adamax"),
    # optimizer
    ("optimizer.lr=inf", "optimizer.lr=inf"),
    ("optimizer.lr=nan", "optimizer.lr=nan"),
    ("optimizer.lr=0", "optimizer.lr=0"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1"),
    ("optimizer=momentum optimizer.momentum=1.0", "optimizer.momentum=1.0"),
    ("optimizer.betas=[2,3]", "optimizer.betas=[2,3]"),
    ("optimizer.eps=-1", "optimizer.eps=-1"),
    ("optimizer=lbfgs optimizer.max_iter=0", "optimizer.max_iter=0"),
    ("optimizer=lbfgs optimizer.history_size=0", "optimizer.history_size=0"),
    ("optimizer=lbfgs optimizer.line_search_fn=armijo", "optimizer.line_search_fn=armijo"),
    ("optimizer=lbfgs +optimizer.weight_decay=0.1", "optimizer.weight_decay=0.1"),
    # scheduler
    ("scheduler=step scheduler.step_size=0", "scheduler.step_size=0"),
    ("scheduler=step scheduler.gamma=-0.5", "scheduler.gamma=-0.5"),
    ("scheduler.warmup_epochs=-1", "scheduler.warmup_epochs=-1"),
    ("scheduler.min_factor=2", "scheduler.min_factor=2"),
    # data
    ("data.val_fraction=0.5 data.test_fraction=0.5", "data.val_fraction=0.5"),
    ("data.val_fraction=0", "data.val_fraction=0"),
    ("data.train_fraction=0", "data.train_fraction=0"),
    ("data.label_noise=1.0", "data.label_noise=1.0"),
    ("data.test_fraction=-0.1", "data.test_fraction=-0.1"),
    ("data.num_workers=-1", "data.num_workers=-1"),
    ("data=synthetic data.num_classes=1", "data.num_classes=1"),
    ("data=synthetic data.dim=0", "data.dim=0"),
    ("data=synthetic data.kind=spiral", "data.kind"),
    ("data=hmm_sequences model=hmm data.stickiness=1.0", "data.stickiness=1.0"),
    ("data=cifar10 data.download=false data.root=/nonexistent/cifar", "data.root=/nonexistent/cifar"),
    ("data=cifar10 data.root=/nonexistent/cifar data.url=file:///nonexistent/c.tar.gz", "data.url="),
    ("data.val_fraction=0.7 data.test_fraction=0.2999", "data.val_fraction=0.7 data.test_fraction=0.2999"),
    # batching
    ("batching.batch_size=0", "batching.batch_size=0"),
    ("batching=full batching.chunk_size=0", "batching.chunk_size=0"),
    ("batching=full batching.clip_grad_norm=-1", "batching.clip_grad_norm=-1"),
    ("batching=full batching.grad_norm_penalty=-1", "batching.grad_norm_penalty=-1"),
    # trainer
    ("trainer.max_epochs=0", "trainer.max_epochs=0"),
    ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0"),
    ("trainer.limit_train_batches=-1", "trainer.limit_train_batches=-1"),
    ("trainer.num_nodes=0", "trainer.num_nodes=0"),
    ("trainer.accelerator=tpu", "trainer.accelerator=tpu"),
    ("trainer.precision=16-true", "trainer.precision=16-true"),
    ("trainer.precision=bf16-true", "trainer.precision=bf16-true"),
    ("trainer.precision=8-mixed", "trainer.precision=8-mixed"),
    ("trainer.precision=64-true callbacks=batch_noise", "trainer.precision=64-true"),
    ("trainer.sync_batchnorm=true", "trainer.sync_batchnorm=true"),
    # model
    ("model.hidden=[0]", "model.hidden=[0]"),
    ("model.hidden=[-5]", "model.hidden=[-5]"),
    ("model.dropout=1.0", "model.dropout=1.0"),
    ("model.activation=swishy", "model.activation"),
    ("model=cnn model.channels=[]", "model.channels=[]"),
    ("model=cnn model.kernel_size=0", "model.kernel_size=0"),
    ("model=cnn data.as_images=true model.kernel_size=9 model.padding=0", "model.kernel_size=9"),
    ("model=resnet model.depth=21", "model.depth=21"),
    ("model=vgg model.width_mult=0", "model.width_mult=0"),
    # norm
    ("norm=groupnorm norm.num_groups=0", "norm.num_groups=0"),
    ("norm.eps=0", "norm.eps=0"),
    ("norm.momentum=1.5", "norm.momentum=1.5"),
    ("norm=ghost_bn norm.virtual_batch_size=0", "norm.virtual_batch_size=0"),
    ("norm=batch_renorm norm.r_max=0.5", "norm.r_max=0.5"),
    # callbacks
    ("callbacks=patience_stop callbacks.patience_stop.monitor=val/accuracy", "callbacks.patience_stop.monitor=val/accuracy"),
    ("callbacks=gl_stop callbacks.gl_stop.monitor=val/los", "callbacks.gl_stop.monitor=val/los"),
    ("callbacks=pq_stop callbacks.pq_stop.train_monitor=train/loss_epoch", "callbacks.pq_stop.train_monitor="),
    ("callbacks=default callbacks.model_checkpoint.monitor=val/f1", "callbacks.model_checkpoint.monitor=val/f1"),
    ("callbacks=gl_stop callbacks.gl_stop.mode=maximum", "callbacks.gl_stop.mode=maximum"),
    ("callbacks=patience_stop callbacks.patience_stop.patience=-1", "callbacks.patience_stop.patience=-1"),
    ("callbacks=up_stop callbacks.up_stop.k=0", "callbacks.up_stop.k=0"),
    ("callbacks=sharpness callbacks.sharpness.every_n_epochs=0", "callbacks.sharpness.every_n_epochs=0"),
    ("callbacks=batch_noise callbacks.noise_scale.num_batches=1", "callbacks.noise_scale.num_batches=1"),
    ("callbacks=batch_noise callbacks.noise_scale.labels=noisy", "callbacks.noise_scale.labels=noisy"),
    ("callbacks=gradient_ics callbacks.gradient_ics.layers=[99]", "callbacks.gradient_ics.layers=[99]"),
    ("callbacks=activation_drift callbacks.activation_drift.layers=[net.99]", "callbacks.activation_drift.layers="),
    ("callbacks=activation_drift callbacks.activation_drift.split=test", "callbacks.activation_drift.split=test"),
    # divergence guard
    ("divergence.max_loss_ratio=0.5", "divergence.max_loss_ratio=0.5"),
    ("divergence.check_every=0", "divergence.check_every=0"),
    ("+divergence.patience=3", "divergence.patience=3"),
    # top level
    ("optimized_metric=val/accuracy", "optimized_metric=val/accuracy"),
    ("optimized_metric=test/acc test=false", "optimized_metric=test/acc"),
    ("optimized_metric_mode=maximize", "optimized_metric_mode=maximize"),
    ("seed=-1", "seed=-1"),
    ("torch_threads=0", "torch_threads=0"),
    ("cluster_env=slurm", "cluster_env=slurm"),
    ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path=/nonexistent/last.ckpt is not a checkpoint of this model"),
]
CKPT_CASES = ["other", "truncated", "random", "empty", "pickle"]
if NO_GPU:
    CASES += [("trainer.accelerator=gpu", "trainer.accelerator=gpu"),
              ("trainer.precision=16-mixed", "trainer.precision=16-mixed")]


def _one_line(err: ConfigError, expect: str) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    assert expect in msg, msg
    assert "allowed" in msg, msg
    return msg


@pytest.mark.parametrize("overrides,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_value_is_refused_in_one_line_naming_the_key(overrides, expect, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate(overrides.split(), tmp_path / "run")
    msg = _one_line(err.value, expect)
    assert msg.lstrip("+").startswith(expect.lstrip("+").split(".")[0].split("=")[0]), msg  # the key comes first


@pytest.mark.parametrize("kind", CKPT_CASES)
def test_damaged_or_foreign_checkpoint_is_refused(ckpts, kind, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate([f"ckpt_path={ckpts[kind]}"], tmp_path / "run")
    msg = _one_line(err.value, f"ckpt_path={ckpts[kind]} is not a checkpoint of this model: ")
    assert "weights_only=False" not in msg


def test_table_covers_every_group_and_at_least_sixty_values():
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()} - {"hydra", "sweep"}
    text = " ".join(o for o, _ in CASES)
    missing = {g for g in groups if f"{g}=" not in text and f"{g}." not in text}
    assert not missing, missing
    assert len(CASES) + len(CKPT_CASES) >= 60


def test_good_values_pass(ckpts, tmp_path):
    """Controls: the checks accept the defaults, this model's checkpoint and borderline values."""
    validate([], tmp_path / "a")
    validate([f"ckpt_path={ckpts['good']}"], tmp_path / "b")
    validate(["+trainer.max_steps=5", "+callbacks.extra._target_=lightning.pytorch.callbacks.Timer",
              "optimizer=lbfgs", "optimizer.line_search_fn=null", "scheduler=step", "scheduler.step_size=1",
              "data.val_fraction=0.5", "data.test_fraction=0.49", "callbacks=gradient_ics",
              "callbacks.gradient_ics.layers=[2,3]", "optimized_metric=mem/train_acc_noisy"], tmp_path / "c")


def test_declared_metric_names_match_what_a_run_logs(tmp_path):
    """The monitor / optimized_metric checks read ClassificationModule's declarations: a real run
    must log and summarize exactly those names."""
    import csv
    import json

    from conftest import compose_cfg

    from shiftlab.trainers.modules.classification import ClassificationModule
    from shiftlab.trainers.train import train

    summary = train(compose_cfg(QUIET + ["trainer.max_epochs=1", "data.label_noise=0.2"], tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert set(ClassificationModule.logged_metrics) <= columns, columns
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(ClassificationModule.summary_metrics) <= set(saved), set(saved)
    assert summary["status"] == "completed"


# ------------------------------------------------------------------------------ command line
def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + str(REPO / "tests"), WANDB_MODE="offline")
    return subprocess.run([sys.executable, "-m", "shiftlab.trainers.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


CLI_CASES = ["optimizer=foo", "+optimzer.lr=0.1", "optimizer.lr=inf",
             "callbacks=gl_stop callbacks.gl_stop.monitor=val/los", "-m optimizer=sgd,adm"] + (["trainer.accelerator=gpu"] if NO_GPU else [])


@pytest.mark.parametrize("args", CLI_CASES)
def test_cli_bad_value_exits_2_with_one_line(args, tmp_path):
    run_dir = tmp_path / "run"
    res = cli(*args.split(), f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}", "print_config=false")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr + res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("shiftlab: error: "), res.stderr
    key = args.split()[-1].split("=")[0].lstrip("+")
    assert key in lines[0] or "adm" in lines[0], lines[0]
    assert not run_dir.exists()  # refused before Hydra made the run directory


def test_cli_damaged_checkpoint_exits_2_with_one_line(ckpts, tmp_path):
    res = cli(f"ckpt_path={ckpts['random']}", f"hydra.run.dir={tmp_path / 'run'}", "print_config=false",
              "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr + res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "shiftlab: error:" in ln]
    assert len(lines) == 1 and "is not a checkpoint of this model" in lines[0], res.stderr[-2000:]


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a GPU")
def test_machine_checks_can_be_skipped_for_a_config_meant_elsewhere(tmp_path):
    """check_config(machine=False) validates a GPU / CIFAR-10 config on a machine without either."""
    with _hydra(CONFIG_DIR):
        cfg = compose_checked("train", ["trainer=gpu", "data=cifar10", "data.root=/nonexistent/cifar",
                                        "data.download=false", "model=resnet", f"paths.output_dir={tmp_path}"])
    check_config(cfg, machine=False)
    with pytest.raises(ConfigError, match="^trainer.accelerator=gpu is not allowed"):
        check_config(cfg)


def test_sweep_check_composes_group_choices_but_not_every_value() -> None:
    """The multirun pre-check composes what composition can tell apart: each group choice, and a value-only
    key's first value (a seed sweep composes alike); a typo'd key or group option is still caught."""
    from shiftlab.trainers.cli_checks import preflight, sweep_jobs

    with _hydra(CONFIG_DIR):
        jobs = sweep_jobs(["seed=0,1,2", "norm=none,batchnorm", "optimizer.lr=0.1,0.2", "+x=1,2"],
                          collapse_values=True)
        full = sweep_jobs(["seed=0,1,2", "norm=none,batchnorm"])
    assert sorted(map(tuple, jobs)) == sorted([("seed=0", f"norm={n}", "optimizer.lr=0.1", f"+x={x}")
                                               for n in ("none", "batchnorm") for x in (1, 2)])
    assert len(full) == 6
    for argv, key in ((["-m", "seed=0,1", "sed=3,4"], "sed"), (["-m", "seed=0,1", "norm=none,batchnrm"], "batchnrm")):
        with pytest.raises(ConfigError, match=key):
            preflight(argv, CONFIG_DIR)
