"""Checks of the composed config that import what it names (still nothing is trained or loaded).

Why separate from the range table in :mod:`shiftlab.trainers.config_checks`: these look at the classes and
functions behind ``_target_`` (their arguments), build the optimizer and scheduler on a dummy
parameter, and compare metric names with what the module logs: each needs imports the plain
range table does not.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import socket
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from shiftlab.trainers.config_checks import ConfigError, show

# Supported trainer.precision values and where they run; anything else is refused.
PRECISIONS = ("64-true", "32-true", "bf16-mixed", "16-mixed")
# Callbacks that read the data module's float32 tensors straight into the model: under
# precision=64-true (a float64 model) they would fail at their first probe.
FLOAT32_PROBE_MODULES = ("shiftlab.callbacks.memorization", "shiftlab.callbacks.gradient_noise",
                         "shiftlab.callbacks.sharpness", "shiftlab.callbacks.activation_drift",
                         "shiftlab.callbacks.gradient_ics", "shiftlab.callbacks.landscape")
# summary.json keys every run writes (trainers/summary.py build_summary), besides the module's own.
SUMMARY_CORE = ("epochs_run", "global_step", "wall_time_s", "train/loss_epoch_mean", "train/acc_epoch_mean",
                "val/loss", "val/acc")
# Nodes whose ``_target_`` arguments are checked: group -> arguments the build passes itself.
BUILD_ARGS = {"model": ("input_shape", "num_classes", "norm"), "module": ("model", "optimizer", "scheduler",
              "batching", "num_classes"), "trainer": ("callbacks", "logger")}  # trainer.plugins: kept, see build


def _nearest(word: str, choices: list[str]) -> str:
    hit = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {hit[0]}?" if hit else ""


def _locate(target: str) -> Any:
    """The object ``target`` names, or None (quietly: Hydra logs its own multi-line error)."""
    import logging

    from hydra.utils import get_method

    log = logging.getLogger("hydra.utils")
    level, log.disabled = log.disabled, True
    try:
        return get_method(target)
    except Exception:  # noqa: BLE001 - hydra wraps import errors in several types
        return None
    finally:
        log.disabled = level


def _params(fn: Callable) -> tuple[set[str], bool]:
    """Argument names of ``fn`` (for a class: its ``__init__`` and the bases it forwards
    ``**kwargs`` to) and whether it still accepts any keyword."""
    names: set[str] = set()
    chain = [c for c in inspect.getmro(fn) if "__init__" in vars(c)] if inspect.isclass(fn) else [fn]
    for f in chain:
        try:
            sig = inspect.signature(f.__init__ if inspect.isclass(f) else f)
        except (TypeError, ValueError):
            return names, True
        names |= {n for n, p in sig.parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return names - {"self"}, False
    return names - {"self"}, True


def _registries() -> dict[str, Any]:
    """Config group -> the registry that knows its builders (see :mod:`shiftlab.trainers.registry`)."""
    from shiftlab.trainers.norms import norm_registry
    from shiftlab.trainers.optim import OPTIMIZERS, SCHEDULERS

    return {"norm": norm_registry(), "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS}


def registry_entry(group: str, node: DictConfig) -> Any:
    """The registry entry a norm / optimizer / scheduler node builds, from its ``_target_`` (or,
    for a saved config in the old ``factory + name`` form, from ``name``). ConfigError when the
    target is not registered for the group; None for other groups."""
    reg = _registries().get(group)
    if reg is None:
        return None
    target = str(node.get("_target_", ""))
    if target == reg.legacy_target or (not target and "name" in node):
        name = node.get("name")
        if name not in reg:
            raise ConfigError(f"{reg.key}={show(name)} is not allowed; allowed: known {reg.kind} names: "
                              f"{', '.join(reg.names())}{_nearest(str(name), reg.names())}")
        from shiftlab.trainers.registry import warn_legacy

        warn_legacy(target or reg.legacy_target, name, reg.entry(name).target)
        return reg.entry(name)
    options = {k: v for k, v in node.items() if not str(k).startswith("_")}
    entry = reg.find(_locate(target), options)
    if entry is None:
        targets = reg.targets()
        raise ConfigError(f"{group}._target_={target} is not allowed; allowed: a registered {reg.kind} builder: "
                          f"{', '.join(targets)}{_nearest(target, targets)} (register yours with register_{reg.kind} "
                          f"from shiftlab.trainers.{'norms' if group == 'norm' else 'optim'})")
    return entry


def check_target_arguments(cfg: DictConfig) -> None:
    """Every key of a ``_target_`` node must be an argument of what it builds (``+trainer.bogus=1``)."""
    nodes: list[tuple[str, DictConfig]] = [(g, cfg[g]) for g in ("model", "data", "norm", "optimizer", "scheduler",
                                                                  "batching", "module", "trainer")
                                            if isinstance(cfg.get(g), DictConfig) and "_target_" in cfg[g]]
    if isinstance(cfg.get("divergence"), DictConfig):  # DivergenceGuard(**cfg.divergence) in train()
        node = OmegaConf.to_container(cfg.divergence, resolve=False)
        nodes.append(("divergence", OmegaConf.create({**node, "_target_": "shiftlab.callbacks.divergence.DivergenceGuard"})))
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            if isinstance(node, DictConfig) and "_target_" in node:
                nodes.append((f"{group}.{name}", node))
    for key, node in nodes:
        target = str(node["_target_"])
        entry = registry_entry(key, node)
        if entry is None:  # not a registry: the target itself; the build passes some arguments itself
            fn = _locate(target)
            if fn is None:
                raise ConfigError(f"{key}._target_={target} is not allowed; allowed: an importable class or "
                                  "function")
            passed = set(BUILD_ARGS.get(key, ()))
        else:  # a registered builder: the framework supplies these
            fn, passed = entry.builder, set(_registries()[key].supplied)
        accepted, open_kwargs = _params(fn)
        if open_kwargs:
            continue
        accepted -= passed
        if entry is not None and target == _registries()[key].legacy_target:
            accepted.add("name")  # the old factory + name form
        raw = OmegaConf.to_container(node, resolve=False)
        for k, v in raw.items():
            if not str(k).startswith("_") and k not in accepted:
                allowed = sorted(accepted)
                raise ConfigError(f"{key}.{k}={show(v)} is not allowed; allowed: arguments of "
                                  f"{getattr(fn, '__qualname__', target)}: {', '.join(allowed)}"
                                  f"{_nearest(str(k), allowed).replace('mean ', f'mean {key}.')}")


def _blame(node: DictConfig, group: str, message: str) -> str:
    """The key of ``node`` an error message is about (torch names betas/eps/lr in words)."""
    low = message.lower()
    words = {"beta": "betas", "epsilon": "eps", "learning rate": "lr", "weight_decay": "weight_decay",
             "weight decay": "weight_decay", "momentum": "momentum", "dampening": "dampening",
             "history": "history_size", "line search": "line_search_fn", "line_search": "line_search_fn"}
    for word, key in words.items():
        if word in low and key in node:
            return key
    return next((str(k) for k in node if not str(k).startswith("_") and str(k) in message), "_target_")


def _entry_name(group: str, node: DictConfig) -> str:
    """The registry name the node's builder and preset arguments match, else its ``_target_``
    (``optimizer=nesterov optimizer.momentum=0`` is no longer any entry's presets)."""
    try:
        entry = registry_entry(group, node)
    except ConfigError:
        entry = None
    if entry is None or not entry.preset_matches({k: v for k, v in node.items() if not str(k).startswith("_")}):
        return str(node.get("_target_"))
    return f"{group}={entry.name}"


def check_optimizer_and_scheduler(cfg: DictConfig) -> None:
    """Build the optimizer (and scheduler) on a dummy parameter now, so arguments torch refuses
    (``betas=[2,3]``, ``eps=-1``) fail before the data is loaded, not inside ``fit``."""
    from hydra.utils import instantiate

    if not isinstance(cfg.get("optimizer"), DictConfig) or "_target_" not in cfg.optimizer:
        return  # a partial config (tests, notebooks): nothing to build
    param = torch.nn.Parameter(torch.zeros(2))
    try:
        opt = instantiate(cfg.optimizer)([param])
    except Exception as e:  # noqa: BLE001 - whatever torch raises is a bad argument
        msg = str(e.__cause__ or e).splitlines()[0]
        key = _blame(cfg.optimizer, "optimizer", msg)
        raise ConfigError(f"optimizer.{key}={show(cfg.optimizer.get(key))} is not allowed; allowed: values "
                          f"{_entry_name('optimizer', cfg.optimizer)} accepts ({msg})") from None
    if not isinstance(cfg.get("scheduler"), DictConfig) or "_target_" not in cfg.scheduler:
        return
    epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=10)
    epochs = epochs if isinstance(epochs, int) and epochs > 0 else 10
    try:
        sch = instantiate(cfg.scheduler)(opt, max_epochs=epochs)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no step is taken here
            warnings.simplefilter("ignore")
            for _ in range(min(epochs, 3)):
                sch.step()
    except Exception as e:  # noqa: BLE001
        msg = str(e.__cause__ or e).splitlines()[0] or type(e).__name__
        key = _blame(cfg.scheduler, "scheduler", msg)
        raise ConfigError(f"scheduler.{key}={show(cfg.scheduler.get(key))} is not allowed; allowed: values "
                          f"{_entry_name('scheduler', cfg.scheduler)} accepts ({msg})") from None


def check_accelerator_available(cfg: DictConfig) -> None:
    accel = OmegaConf.select(cfg, "trainer.accelerator", default="auto")
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accel} is not allowed; allowed: auto, cpu (no GPU is visible "
                          "here: torch.cuda.is_available() is False)")
    if accel == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps is not allowed; allowed: auto, cpu (MPS is not available)")


def check_precision(cfg: DictConfig) -> None:
    accel = OmegaConf.select(cfg, "trainer.accelerator", default="auto")
    gpu = torch.cuda.is_available()
    precision = OmegaConf.select(cfg, "trainer.precision", default="32-true")
    if precision is None:
        return
    if str(precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={show(precision)} is not allowed; allowed: {', '.join(PRECISIONS)}")
    on_cpu = accel == "cpu" or (accel == "auto" and not gpu)
    if precision == "16-mixed" and on_cpu:
        raise ConfigError("trainer.precision=16-mixed is not allowed on CPU; allowed: 64-true, 32-true, bf16-mixed "
                          "(Lightning would silently run bf16-mixed instead: fp16 autocast needs a GPU)")
    if precision == "64-true":
        for name, node in (cfg.get("callbacks") or {}).items():
            target = str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""
            if target.startswith(FLOAT32_PROBE_MODULES):
                raise ConfigError(f"trainer.precision=64-true is not allowed with callbacks.{name} (it feeds "
                                  "float32 data to the model); allowed: 32-true, bf16-mixed")


def _module_class(cfg: DictConfig) -> type | None:
    target = OmegaConf.select(cfg, "module._target_", default=None)
    cls = _locate(str(target)) if target else None
    return cls if inspect.isclass(cls) else None


def check_metric_names(cfg: DictConfig) -> None:
    """Callbacks' ``monitor`` keys against what the module logs; ``optimized_metric`` against the
    keys summary.json will hold."""
    cls = _module_class(cfg)
    logged = list(getattr(cls, "logged_metrics", ()) or ())
    for name, node in (cfg.get("callbacks") or {}).items():
        if not isinstance(node, DictConfig) or not logged:
            continue
        for attr in ("monitor", "train_monitor"):
            value = node.get(attr) if attr in node else None
            if value is not None and value not in logged:
                raise ConfigError(f"callbacks.{name}.{attr}={show(value)} is not allowed; allowed: "
                                  f"{', '.join(logged)} (what {cls.__name__} logs){_nearest(str(value), logged)}")
    metric = cfg.get("optimized_metric")
    if not metric or cls is None or not hasattr(cls, "summary_metrics"):
        return
    known = list(dict.fromkeys(SUMMARY_CORE + tuple(cls.summary_metrics)))
    if not cfg.get("test", True):
        known = [k for k in known if not k.startswith("test/")]
    # Callbacks add their own namespaces (mem/, noise/, probe prefixes); those are not checked.
    if metric in known or str(metric).split("/")[0] not in ("train", "val", "test") and "/" in str(metric):
        return
    raise ConfigError(f"optimized_metric={show(metric)} is not allowed; allowed: {', '.join(known)} or a key a "
                      f"callback adds to summary.json{_nearest(str(metric), known)}")


@functools.lru_cache(maxsize=8)
def _reachable(host: str, port: int) -> str | None:
    try:
        socket.create_connection((host, port), timeout=3).close()
        return None
    except OSError as e:
        return str(e) or type(e).__name__


def check_cifar10_available(cfg: DictConfig) -> None:
    """CIFAR-10 must be on disk, or its URL reachable, before the run starts downloading."""
    if OmegaConf.select(cfg, "data._target_", default="") != "shiftlab.trainers.data.CIFAR10DataModule":
        return
    from shiftlab.trainers.data.cifar10 import ARCHIVE, FOLDER, TEST_FILES

    root = Path(str(OmegaConf.select(cfg, "data.root")))
    if (root / FOLDER / TEST_FILES[0]).exists() or (root / ARCHIVE).exists():
        return
    if not cfg.data.get("download", True):
        raise ConfigError(f"data.root={root} is not allowed; allowed: a folder holding {FOLDER}/ or {ARCHIVE} "
                          "(data.download=false and neither is there)")
    url = str(cfg.data.get("url"))
    parts = urllib.parse.urlparse(url)
    if parts.scheme == "file":
        if not Path(urllib.parse.unquote(parts.path)).exists():
            raise ConfigError(f"data.url={url} is not allowed; allowed: an existing file:// archive or a "
                              f"reachable URL (no CIFAR-10 under data.root={root} either)")
        return
    if parts.scheme in ("http", "https") and parts.hostname:
        why = _reachable(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        if why is not None:
            raise ConfigError(f"data.root={root} is not allowed; allowed: a folder holding {FOLDER}/ or {ARCHIVE}, "
                              f"or a reachable data.url ({parts.hostname}: {why})")


def check_named_choices(cfg: DictConfig) -> None:
    """Names the built objects look up: synthetic data kinds, activations."""
    from shiftlab.trainers.data.synthetic import KINDS
    from shiftlab.trainers.models import ACTIVATIONS

    if OmegaConf.select(cfg, "data._target_", default="") == "shiftlab.trainers.data.SyntheticDataModule":
        kind = OmegaConf.select(cfg, "data.kind", default="clusters")
        if kind not in KINDS:
            raise ConfigError(f"data.kind={show(kind)} is not allowed; allowed: {', '.join(KINDS)}")
    act = OmegaConf.select(cfg, "model.activation", default=None)
    if act is not None:
        ACTIVATIONS.get(str(act)) if str(act) in ACTIVATIONS else _raise(ACTIVATIONS, act)


def _raise(registry: Any, name: Any) -> None:
    try:
        registry.get(str(name))
    except KeyError as e:
        raise ConfigError(e.args[0] + _nearest(str(name), registry.names())) from None


def check_targets(cfg: DictConfig) -> None:
    check_precision(cfg)
    check_named_choices(cfg)
    check_target_arguments(cfg)
    check_optimizer_and_scheduler(cfg)
    check_metric_names(cfg)


def check_machine(cfg: DictConfig) -> None:
    """What this machine must offer: the accelerator, and CIFAR-10 on disk or reachable."""
    check_accelerator_available(cfg)
    check_cifar10_available(cfg)

