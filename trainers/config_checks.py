"""Range checks run on the composed config before anything is built.

Why here and not in constructors: a bad value must stop the run before data is loaded or a
process is spawned, with one line naming the key and what is allowed.
"""
from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is out of range; the message names the key and the allowed values."""


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# key -> (predicate, description of what is allowed). Missing keys are skipped.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "torch_threads": (lambda v: _int(v) and v >= 1, "null or an integer >= 1"),
    "optimizer.lr": (lambda v: _num(v) and v > 0, "a number > 0"),
    "optimizer.weight_decay": (lambda v: _num(v) and v >= 0, "a number >= 0"),
    "optimizer.momentum": (lambda v: _num(v) and 0 <= v < 1, "0 <= momentum < 1"),
    "optimizer.max_iter": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "data.label_noise": (lambda v: _num(v) and 0 <= v < 1, "0 <= label_noise < 1"),
    "data.val_fraction": (lambda v: _num(v) and 0 < v < 1, "0 < val_fraction < 1"),
    "data.test_fraction": (lambda v: _num(v) and 0 <= v < 1, "0 <= test_fraction < 1"),
    "data.train_fraction": (lambda v: _num(v) and 0 < v <= 1, "0 < train_fraction <= 1"),
    "data.num_workers": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "batching.batch_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "batching.chunk_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "batching.clip_grad_norm": (lambda v: v is None or (_num(v) and v > 0), "null or a number > 0"),
    "batching.grad_norm_penalty": (lambda v: _num(v) and v >= 0, "a number >= 0"),
    "batching.grad_penalty_eps": (lambda v: _num(v) and v > 0, "a number > 0"),
    "trainer.max_epochs": (lambda v: _int(v) and (v >= 1 or v == -1), "an integer >= 1 (or -1)"),
    "trainer.devices": (lambda v: v == "auto" or (_int(v) and (v >= 1 or v == -1)) or isinstance(v, (list, str)),
                        "an integer >= 1, -1, 'auto' or a list of ids"),
    "trainer.num_nodes": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "model.dropout": (lambda v: _num(v) and 0 <= v < 1, "0 <= dropout < 1"),
}

CHOICES: dict[str, tuple[str, ...]] = {
    "batching.kind": ("mini", "full"),
    "cluster_env": ("auto", "kubeflow", "none"),
    "optimized_metric_mode": ("min", "max"),
}


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first out-of-range value."""
    for key, (ok, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and key not in ("batching.clip_grad_norm",):
            continue
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {allowed}")
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(allowed)}")
    norm = OmegaConf.select(cfg, "norm.name", default=None)
    if OmegaConf.select(cfg, "trainer.sync_batchnorm", default=False) and norm not in (None, "batchnorm"):
        raise ConfigError(f"trainer.sync_batchnorm=true is not allowed with norm={norm} (Lightning would replace "
                          "the variant by a plain SyncBatchNorm); allowed: false, and norm.sync=true for the "
                          "variant's own in-layer sync")
    if OmegaConf.select(cfg, "trainer.sync_batchnorm", default=False) and \
            OmegaConf.select(cfg, "trainer.accelerator", default="auto") == "cpu":
        raise ConfigError("trainer.sync_batchnorm=true is not allowed on CPU (torch's SyncBatchNorm refuses "
                          "CPU tensors); allowed: false, with norm.sync=true for shiftlab's in-layer sync")
