"""Checks that need the built data module and LightningModule, run right before ``trainer.fit``.

Why a second stage: whether the splits leave training data, whether the model's arguments give a
working network, which layer indices a probe may name and whether ``ckpt_path`` fits this model
are only known once these objects exist. Each failure is one :class:`ConfigError` line instead of a
traceback after the sanity check or an epoch of training.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from shiftlab.trainers.checkpoint_io import CheckpointLoadError, load_checkpoint
from shiftlab.trainers.config_checks import ConfigError, show


def check_ckpt_path(path: str | None, module: nn.Module) -> dict | None:
    """``path`` exists, loads weights-only and holds a state_dict with exactly ``module``'s keys
    and shapes; returns the loaded checkpoint (None without a path)."""
    if not path:
        return None
    p = Path(str(path))

    def fail(reason: str) -> ConfigError:
        return ConfigError(f"ckpt_path={path} is not a checkpoint of this model: {reason}; allowed: a .ckpt "
                           "written by a run of the same model config (e.g. <run>/checkpoints/last.ckpt)")

    if not p.is_file():
        raise fail("no such file" if not p.exists() else "not a file")
    if p.stat().st_size == 0:
        raise fail("the file is empty")
    try:  # weights-only with shiftlab's allow-list: a checkpoint from elsewhere must not run code
        ckpt = load_checkpoint(p)
    except CheckpointLoadError as e:
        raise fail(str(e).splitlines()[0]) from None
    state = ckpt["state_dict"]
    if not isinstance(state, dict):
        raise fail("its state_dict is not a mapping")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise fail(", ".join(parts))
    for k, v in own.items():
        w = state[k]
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(v.shape):
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise fail(f"{k} has shape {got}, this model {tuple(v.shape)}")
    return ckpt


def check_training_data(cfg: DictConfig, dm: Any) -> None:
    n = len(dm.train_set) if getattr(dm, "train_set", None) is not None else None
    if n == 0:
        fr = {k: OmegaConf.select(cfg, f"data.{k}", default=None)
              for k in ("val_fraction", "test_fraction", "train_fraction")}
        shown = " ".join(f"data.{k}={show(v)}" for k, v in fr.items() if v is not None)
        raise ConfigError(f"{shown} is not allowed; allowed: fractions that leave at least one training sample "
                          "(these leave 0)")


def _reason(e: BaseException) -> str:
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _sample(dm: Any) -> torch.Tensor | None:
    split = getattr(dm, "train_set", None)
    return split.x[:2] if split is not None and len(split) else None


def check_model_runs(cfg: DictConfig, model: nn.Module, x: torch.Tensor | None) -> None:
    """One forward pass of a copy on two training samples: arguments that build a broken network
    (a zero-width layer, a kernel larger than the input) fail here, not inside the sanity check."""
    if x is None:
        return
    shadow = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            shadow(x)
    except Exception as e:  # noqa: BLE001 - any failure means the arguments do not fit the data
        args = {k: v for k, v in cfg.model.items() if not str(k).startswith("_")}
        shown = " ".join(f"model.{k}={show(v)}" for k, v in args.items()) or f"model={cfg.model._target_}"
        raise ConfigError(f"{shown} is not allowed; allowed: arguments that build a network for inputs of shape "
                          f"{tuple(x.shape[1:])} ({_reason(e)})") from None


def check_probe_layers(cfg: DictConfig, model: nn.Module, x: torch.Tensor | None) -> None:
    """``callbacks.<probe>.layers`` against the layers the model has."""
    from shiftlab.callbacks.covariate_shift import norm_layers, weight_layers

    for name, node in (cfg.get("callbacks") or {}).items():
        if not isinstance(node, DictConfig) or node.get("layers") is None:
            continue
        target = str(node.get("_target_", ""))
        layers = list(node.layers)
        if target.endswith("GradientICSMonitor") and x is not None:
            n = len(weight_layers(model, x))
            bad = [i for i in layers if not isinstance(i, int) or not 1 <= i <= n]
            if bad:
                raise ConfigError(f"callbacks.{name}.layers={show(node.layers)} is not allowed; allowed: indices "
                                  f"1..{n} (the model's Linear/Conv layers in forward order)")
        elif target.endswith("ActivationDriftMonitor"):
            known = [n for n, _ in norm_layers(model)]
            bad = [n for n in layers if n not in known]
            if bad:
                raise ConfigError(f"callbacks.{name}.layers={show(node.layers)} is not allowed; allowed: norm layer "
                                  f"names {', '.join(known)}")


def check_built(cfg: DictConfig, dm: Any, module: nn.Module) -> None:
    """Raise :class:`ConfigError` for the first problem only the built objects reveal."""
    check_training_data(cfg, dm)
    model = getattr(module, "model", module)
    x = _sample(dm)
    check_model_runs(cfg, model, x)
    check_probe_layers(cfg, model, x)
    check_ckpt_path(cfg.get("ckpt_path"), module)
