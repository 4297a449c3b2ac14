"""Range checks run on the composed config before anything is built.

Why here and not in constructors: a bad value must stop the run before data is loaded or a
process is spawned, with one line naming the key and what is allowed.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is out of range; the message names the key and the allowed values."""


def show(v: Any) -> str:
    """A value as it would be typed on the command line."""
    if isinstance(v, (DictConfig, ListConfig)):
        v = OmegaConf.to_container(v, resolve=False)
    if isinstance(v, str):
        return v
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v).replace(" ", "")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ints(v: Any, low: int) -> bool:
    return isinstance(v, (list, tuple, ListConfig)) and all(_int(i) and i >= low for i in v)


def _pos(v: Any) -> bool:
    return _num(v) and v > 0


def _nonneg(v: Any) -> bool:
    return _num(v) and v >= 0


def _pos_int(v: Any) -> bool:
    return _int(v) and v >= 1


def _nonneg_int(v: Any) -> bool:
    return _int(v) and v >= 0


def _unit(v: Any) -> bool:
    return _num(v) and 0 <= v < 1


POS, NONNEG = (_pos, "a number > 0"), (_nonneg, "a number >= 0")
POS_INT, NONNEG_INT = (_pos_int, "an integer >= 1"), (_nonneg_int, "an integer >= 0")
OPT_POS_INT = (lambda v: v is None or _pos_int(v), "null or an integer >= 1")
LIMIT = (lambda v: v is None or (_int(v) and v >= 0) or (_num(v) and 0 <= v <= 1),
         "null, a fraction in [0, 1] or an integer number of batches >= 0")

# key -> (predicate, description of what is allowed). Missing keys are skipped; ``*`` matches any
# key of a mapping (every configured callback).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "torch_threads": (lambda v: _int(v) and v >= 1, "null or an integer >= 1"),
    "optimizer.lr": POS,
    "optimizer.weight_decay": NONNEG,
    "optimizer.momentum": (_unit, "0 <= momentum < 1"),
    "optimizer.dampening": (_unit, "0 <= dampening < 1"),
    "optimizer.eps": POS,
    "optimizer.betas": (lambda v: isinstance(v, (list, ListConfig)) and len(v) == 2 and all(_unit(b) for b in v),
                        "[beta1, beta2], each 0 <= beta < 1"),
    "optimizer.max_iter": POS_INT,
    "optimizer.history_size": POS_INT,
    "scheduler.warmup_epochs": NONNEG_INT,
    "scheduler.step_size": POS_INT,
    "scheduler.gamma": POS,
    "scheduler.min_factor": (lambda v: _num(v) and 0 <= v <= 1, "0 <= min_factor <= 1"),
    "data.label_noise": (lambda v: _num(v) and 0 <= v < 1, "0 <= label_noise < 1"),
    "data.val_fraction": (lambda v: _num(v) and 0 < v < 1, "0 < val_fraction < 1"),
    "data.test_fraction": (lambda v: _num(v) and 0 <= v < 1, "0 <= test_fraction < 1"),
    "data.train_fraction": (lambda v: _num(v) and 0 < v <= 1, "0 < train_fraction <= 1"),
    "data.num_workers": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "data.num_samples": (lambda v: _int(v) and v >= 10, "an integer >= 10"),
    "data.num_sequences": (lambda v: _int(v) and v >= 10, "an integer >= 10"),
    "data.dim": POS_INT,
    "data.num_classes": (lambda v: _int(v) and v >= 2, "an integer >= 2"),
    "data.separation": NONNEG,
    "data.teacher_width": POS_INT,
    "data.length": POS_INT,
    "data.min_length": OPT_POS_INT,
    "data.num_states": POS_INT,
    "data.num_symbols": (lambda v: _int(v) and v >= 2, "an integer >= 2"),
    "data.stickiness": (_unit, "0 <= stickiness < 1"),
    "data.emission_noise": (lambda v: _num(v) and 0 <= v <= 1, "0 <= emission_noise <= 1"),
    "batching.batch_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "batching.chunk_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "batching.clip_grad_norm": (lambda v: v is None or (_num(v) and v > 0), "null or a number > 0"),
    "batching.grad_norm_penalty": (lambda v: _num(v) and v >= 0, "a number >= 0"),
    "batching.grad_penalty_eps": (lambda v: _num(v) and v > 0, "a number > 0"),
    "probes.max_overhead": (lambda v: v is None or (_num(v) and v > 0), "null or a number > 0"),
    "trainer.max_epochs": (lambda v: _int(v) and (v >= 1 or v == -1), "an integer >= 1 (or -1)"),
    "trainer.min_epochs": (lambda v: v is None or _nonneg_int(v), "null or an integer >= 0"),
    "trainer.max_steps": (lambda v: _int(v) and (v >= 1 or v == -1), "an integer >= 1 (or -1)"),
    "trainer.devices": (lambda v: v == "auto" or (_int(v) and (v >= 1 or v == -1)) or isinstance(v, str)
                        or (_ints(v, 0) and len(v) >= 1),
                        "an integer >= 1, -1, 'auto' or a list of ids"),
    "trainer.num_nodes": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "trainer.check_val_every_n_epoch": OPT_POS_INT,
    "trainer.log_every_n_steps": POS_INT,
    "trainer.accumulate_grad_batches": POS_INT,
    "trainer.gradient_clip_val": (lambda v: v is None or _nonneg(v), "null or a finite number >= 0"),
    "trainer.val_check_interval": (lambda v: v is None or _pos_int(v) or (_num(v) and 0 < v <= 1),
                                   "null, a fraction in (0, 1] or an integer >= 1"),
    "trainer.limit_train_batches": LIMIT,
    "trainer.limit_val_batches": LIMIT,
    "trainer.limit_test_batches": LIMIT,
    "trainer.overfit_batches": LIMIT,
    "model.dropout": (lambda v: _num(v) and 0 <= v < 1, "0 <= dropout < 1"),
    "model.hidden": (lambda v: _pos_int(v) or _ints(v, 1), "an integer or a list of integers, each >= 1"),
    "model.channels": (lambda v: _ints(v, 1) and len(v) >= 1, "a non-empty list of integers >= 1"),
    "model.kernel_size": POS_INT,
    "model.stride": POS_INT,
    "model.padding": (lambda v: v is None or _nonneg_int(v), "null or an integer >= 0"),
    "model.pool_every": NONNEG_INT,
    "model.head_hidden": NONNEG_INT,
    "model.classifier_hidden": NONNEG_INT,
    "model.base_width": POS_INT,
    "model.width_mult": POS,
    "model.embed_dim": POS_INT,
    "model.layers": POS_INT,
    "model.init_scale": POS,
    "model.depth": (lambda v: _int(v) and (v == 18 or (v >= 8 and (v - 2) % 6 == 0)), "18 or 6n+2 (8, 14, 20, ...)"),
    "norm.eps": POS,
    "norm.momentum": (lambda v: v is None or (_num(v) and 0 < v <= 1), "null or 0 < momentum <= 1"),
    "norm.num_groups": POS_INT,
    "norm.virtual_batch_size": POS_INT,
    "norm.r_max": (lambda v: _num(v) and v >= 1, "a finite number >= 1"),
    "norm.d_max": NONNEG,
    "norm.warmup_steps": NONNEG_INT,
    "norm.r_max_steps": NONNEG_INT,
    "norm.d_max_steps": NONNEG_INT,
    "norm.n_mu": NONNEG,
    "norm.n_sigma": (lambda v: _num(v) and v >= 1, "a finite number >= 1"),
    "norm.r_mu": NONNEG,
    "norm.r_sigma": NONNEG,
    "module.steps_per_call": POS_INT,
    "divergence.max_loss_ratio": (lambda v: v is None or (_num(v) and v > 1), "null or a number > 1"),
    "divergence.check_every": POS_INT,
    "callbacks.*.every_n_epochs": POS_INT,
    "callbacks.*.every_n_steps": NONNEG_INT,
    "callbacks.*.patience": NONNEG_INT,
    "callbacks.*.min_delta": (lambda v: v is None or _nonneg(v), "null or a finite number >= 0"),
    "callbacks.*.warmup": (lambda v: v is None or _nonneg_int(v), "null or an integer >= 0"),
    "callbacks.*.alpha": POS,
    "callbacks.*.k": POS_INT,
    "callbacks.*.s": POS_INT,
    "callbacks.*.probe_size": POS_INT,
    "callbacks.*.num_samples": POS_INT,
    "callbacks.*.subset_size": POS_INT,
    "callbacks.*.power_iters": POS_INT,
    "callbacks.*.trace_samples": NONNEG_INT,
    "callbacks.*.num_batches": (lambda v: _int(v) and v >= 2, "an integer >= 2"),
    "callbacks.*.save_top_k": (lambda v: _int(v) and v >= -1, "an integer >= -1"),
}

CHOICES: dict[str, tuple[str, ...]] = {
    "cluster_env": ("auto", "kubeflow", "none"),
    "test_ckpt": ("best", "last"),
    "optimized_metric_mode": ("min", "max"),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda", "mps"),
    "optimizer.line_search_fn": ("strong_wolfe",),
    "callbacks.*.mode": ("min", "max"),
    "callbacks.*.labels": ("given", "true"),
    "callbacks.*.split": ("train", "val"),
}


def _expand(cfg: DictConfig, key: str) -> list[str]:
    """``key`` with each ``*`` replaced by the keys present there."""
    if "*" not in key:
        return [key]
    head, _, tail = key.partition(".*.")
    node = OmegaConf.select(cfg, head, default=None)
    if not isinstance(node, DictConfig):
        return []
    return [f"{head}.{k}.{tail}" for k, v in node.items_ex(resolve=False)
            if isinstance(v, DictConfig) and tail in v]


def _non_finite(node: Any, key: str = "") -> tuple[str, Any] | None:
    """The key and value holding the first inf / nan number of the (unresolved) config."""
    if isinstance(node, dict):
        for k, v in node.items():
            if not (key == "" and k == "hydra"):
                hit = _non_finite(v, f"{key}.{k}" if key else str(k))
                if hit:
                    return hit
    elif isinstance(node, list):
        if any(_non_finite(v, key) for v in node):
            return key, node
    elif isinstance(node, float) and not math.isfinite(node):
        return key, node
    return None


def _fractions(cfg: DictConfig) -> None:
    val = OmegaConf.select(cfg, "data.val_fraction", default=None)
    test = OmegaConf.select(cfg, "data.test_fraction", default=None) or 0.0
    if _num(val) and _num(test) and val + test >= 1:
        raise ConfigError(f"data.val_fraction={show(val)} + data.test_fraction={show(test)} is not allowed; "
                          "allowed: val_fraction + test_fraction < 1 (they leave no training data)")


def _sync_batchnorm_fits_norm(cfg: DictConfig) -> None:
    """Lightning's ``sync_batchnorm`` swaps BatchNorm layers for torch's SyncBatchNorm: only norms
    that declare ``lightning_sync`` (plain torch BatchNorm) survive that unchanged."""
    node = cfg.get("norm")
    if not isinstance(node, DictConfig):
        return
    from shiftlab.trainers.config_targets import registry_entry

    entry = registry_entry("norm", node)
    if not entry.caps.get("lightning_sync"):
        raise ConfigError(f"trainer.sync_batchnorm=true is not allowed with norm={entry.name} (Lightning would "
                          "replace the variant by a plain SyncBatchNorm); allowed: false, and norm.sync=true for "
                          "the variant's own in-layer sync")


# Trainer options ``module.steps_per_call > 1`` needs at these values (clipping and accumulation run in
# Lightning's automatic loop only; the rest count loader items, which are then groups): checked on the
# config here and on the built trainer by shiftlab.trainers.modules.grouped.check_grouped_fit.
GROUPED_TRAINER_OPTIONS: dict[str, Callable[[Any], bool]] = {
    "gradient_clip_val": lambda v: v in (None, 0),
    "accumulate_grad_batches": lambda v: v in (None, 1),
    "overfit_batches": lambda v: not v,
    "limit_train_batches": lambda v: v in (None, 1.0),
    "val_check_interval": lambda v: v in (None, 1.0),
    "check_val_every_n_epoch": lambda v: v is not None,
}


def _steps_per_call_fits(cfg: DictConfig) -> None:
    """``module.steps_per_call > 1`` runs several mini-batch steps per Lightning call: refuse what
    needs one call per step or its own loop (DDP is refused when the trainer starts, and callbacks
    added in code: :func:`shiftlab.trainers.modules.grouped.check_grouped_fit`)."""
    n = OmegaConf.select(cfg, "module.steps_per_call", default=1)
    if not _int(n) or n <= 1:
        return
    head = f"module.steps_per_call={n} is not allowed"
    target = str(OmegaConf.select(cfg, "batching._target_", default="") or "")
    if target.endswith("FullBatch"):
        raise ConfigError(f"{head} with full batch (its own loop takes one step per epoch); allowed: 1")
    select = lambda key, default=None: OmegaConf.select(cfg, key, default=default)  # noqa: E731
    refused = [("data.num_workers", lambda v: v in (None, 0))] + [
        (f"trainer.{key}", ok) for key, ok in GROUPED_TRAINER_OPTIONS.items()]
    for key, ok in refused:
        value = select(key, default=1 if key == "trainer.check_val_every_n_epoch" else None)
        if not ok(value):
            raise ConfigError(f"{head} with {key}={show(value)} (clipping and accumulation run in Lightning's "
                              f"automatic loop; workers, DDP and the batch limits need one loader item per "
                              f"batch); allowed: 1")
    devices, nodes = select("trainer.devices", "auto"), select("trainer.num_nodes", 1)
    if (_int(devices) and devices > 1) or (isinstance(devices, (list, ListConfig)) and len(devices) > 1) or \
            (_int(nodes) and nodes > 1):
        raise ConfigError(f"{head} with trainer.devices={show(devices)} trainer.num_nodes={show(nodes)} (DDP: "
                          "each rank would step its own groups); allowed: 1")
    for name, node in (select("callbacks") or {}).items():
        if not isinstance(node, DictConfig):
            continue
        if str(node.get("_target_", "")).endswith("GradientTests"):
            raise ConfigError(f"{head} with callbacks.{name} (the gradient tests read each training batch); "
                              "allowed: 1")
        for key in ("every_n_steps", "every_n_train_steps", "train_time_interval"):
            value = node.get(key)
            if value:
                raise ConfigError(f"{head} with callbacks.{name}.{key}={show(value)} (a per-step callback "
                                  f"sees only each group's first or last batch); allowed: 1, or "
                                  f"callbacks.{name}.{key}={'0' if key == 'every_n_steps' else 'null'}")


def check_config(cfg: DictConfig, machine: bool = True) -> None:
    """Raise :class:`ConfigError` for the first out-of-range value (then the checks of
    :mod:`shiftlab.trainers.config_targets`, which import what the config names).

    ``machine=False`` skips what depends on this machine (a visible GPU, CIFAR-10 on disk or
    reachable): for checking a config meant for another machine.
    """
    bad = _non_finite(OmegaConf.to_container(cfg, resolve=False))
    if bad:
        raise ConfigError(f"{bad[0]}={show(bad[1])} is not allowed; allowed: finite numbers")
    for pattern, (ok, allowed) in RULES.items():
        for key in _expand(cfg, pattern):
            value = OmegaConf.select(cfg, key, default=None)
            if value is None:
                continue
            if not ok(value):
                raise ConfigError(f"{key}={show(value)} is not allowed; allowed: {allowed}")
    for pattern, allowed in CHOICES.items():
        for key in _expand(cfg, pattern):
            value = OmegaConf.select(cfg, key, default=None)
            if value is not None and value not in allowed:
                raise ConfigError(f"{key}={show(value)} is not allowed; allowed: {', '.join(allowed)}")
    _fractions(cfg)
    _steps_per_call_fits(cfg)
    if OmegaConf.select(cfg, "trainer.sync_batchnorm", default=False):
        _sync_batchnorm_fits_norm(cfg)
    if OmegaConf.select(cfg, "trainer.sync_batchnorm", default=False) and \
            OmegaConf.select(cfg, "trainer.accelerator", default="auto") == "cpu":
        raise ConfigError("trainer.sync_batchnorm=true is not allowed on CPU (torch's SyncBatchNorm refuses "
                          "CPU tensors); allowed: false, with norm.sync=true for shiftlab's in-layer sync")
    from shiftlab.trainers.config_targets import check_machine, check_targets

    check_targets(cfg)
    if machine:
        check_machine(cfg)
