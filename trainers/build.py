"""Turn a composed config into data module, model, LightningModule, callbacks, loggers, Trainer."""
from __future__ import annotations

import os

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from shiftlab.trainers.batching import FullBatch, MiniBatch
from shiftlab.trainers.config_checks import ConfigError, show
from shiftlab.trainers.data.base import TensorDataModule


def _instantiate(node: DictConfig, key: str, **kwargs):
    """``hydra.utils.instantiate`` that turns registry / range errors into one-line ConfigErrors."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, KeyError):
            raise ConfigError(cause.args[0] if cause.args else str(cause)) from None
        if isinstance(cause, (ValueError, TypeError, RuntimeError)):
            text = next((ln for ln in str(cause).splitlines() if ln.strip()), type(cause).__name__)
            if text.startswith((f"{key}.", f"{key}=")):  # already names the key
                raise ConfigError(text) from None
            args = " ".join(f"{key}.{k}={show(v)}" for k, v in node.items() if not str(k).startswith("_")) or key
            raise ConfigError(f"{args} is not allowed; allowed: arguments {node.get('_target_')} accepts "
                              f"({text})") from None
        raise


def build_batching(cfg: DictConfig) -> MiniBatch | FullBatch:
    return _instantiate(cfg.batching, "batching")


def build_datamodule(cfg: DictConfig) -> TensorDataModule:
    """The data module, configured for the batching regime (not yet set up)."""
    batching = build_batching(cfg)
    dm = _instantiate(cfg.data, "data")
    dm.batch_size = batching.loader_batch_size
    dm.full_batch = batching.kind == "full"
    return dm


def build_model(cfg: DictConfig, dm: TensorDataModule):
    """The network for ``dm``'s input shape and class count, with the configured norm layers."""
    if not dm.input_shape:
        dm.setup("fit")
    from shiftlab.trainers.norms import prepare_model

    norm = _instantiate(cfg.norm, "norm")  # a partial: the model calls norm(num_features, dims)
    model = _instantiate(cfg.model, "model", input_shape=dm.input_shape, num_classes=dm.num_classes, norm=norm)
    return prepare_model(norm, model)


def build_module(cfg: DictConfig, dm: TensorDataModule, model=None) -> L.LightningModule:
    model = model if model is not None else build_model(cfg, dm)
    optimizer = _instantiate(cfg.optimizer, "optimizer")
    scheduler = _instantiate(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None
    return _instantiate(cfg.module, "module", model=model, optimizer=optimizer, scheduler=scheduler,
                        batching=build_batching(cfg), num_classes=dm.num_classes)


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    node = cfg.get("callbacks") or {}
    return [_instantiate(c, f"callbacks.{name}") for name, c in node.items()
            if isinstance(c, DictConfig) and "_target_" in c]


def build_loggers(cfg: DictConfig) -> list:
    node = cfg.get("logger") or {}
    return [_instantiate(c, f"logger.{name}") for name, c in node.items()
            if isinstance(c, DictConfig) and "_target_" in c]


def kubeflow_env_present(env: os._Environ | dict = os.environ) -> bool:
    """PyTorchJob-style variables without torchrun / SLURM ones: Lightning cannot detect this
    environment by itself (``KubeflowEnvironment.detect`` is not implemented)."""
    needed = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
    others = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS")
    return all(k in env for k in needed) and not any(k in env for k in others)


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelSummary, ProgressBar

    # `trainer.enable_progress_bar=false` / `enable_model_summary=false` switch the configured
    # rich callbacks off instead of making Lightning refuse the combination.
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not cfg.trainer.get("enable_model_summary", True):
        callbacks = [c for c in callbacks if not isinstance(c, ModelSummary)]
    from shiftlab.trainers.checkpoint_io import AtomicCheckpointIO

    # Plugins from the config (e.g. Ray's environment) are kept; the atomic checkpoint IO is added.
    configured = cfg.trainer.get("plugins") or []
    plugins: list = [_instantiate(p, "trainer.plugins") if isinstance(p, DictConfig) else p for p in configured]
    plugins.append(AtomicCheckpointIO())
    mode = cfg.get("cluster_env", "auto")
    if mode == "kubeflow" or (mode == "auto" and kubeflow_env_present()):
        from lightning.pytorch.plugins.environments import KubeflowEnvironment

        plugins.append(KubeflowEnvironment())
    kwargs = {"callbacks": callbacks, "logger": loggers or False, "plugins": plugins}
    return _instantiate(cfg.trainer, "trainer", **kwargs)
