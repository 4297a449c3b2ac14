"""Epoch probes of stacked members: each member's configured probes run on that member's weights.

Why not vmap: a probe is a plain function of one network and its data (``Probe.measure``), often with
its own random draws (probe vectors, probe batches); running it on member ``i``'s weights loaded into
the member's plain module gives exactly the values its plain run logs at the same epoch. The probe
objects are the configured callbacks themselves, driven through their own epoch-end hook by a small
stand-in for the Trainer, so schedule, cost, history, ``probes/<name>.json``, plots, summary items and
checkpoint state come from the same code as in a plain run.

What is stacked: probes that run at epoch ends only (``every_n_steps: 0``) and cannot stop training
(:func:`why_not_hosted`); the run-wide ``probes.max_overhead`` budget is not (such jobs run alone).
A probe's own ``max_overhead`` compares its seconds with the member's share of the group's training
time (the group's training seconds / K), the time its plain run would have trained.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from shiftlab.callbacks.probe import Probe
from shiftlab.trainers.build import build_callbacks

# a probe that may set trainer.should_stop needs per-member stopping (the keys that arm it)
STOPPING_KEYS = ("stop_rule", "max_top_eigenvalue")


def why_not_hosted(name: str, node: DictConfig) -> str | None:
    """None when callback ``name`` (its config ``node``) is an epoch probe a stacked group can run per
    member, else a one-line reason."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    try:
        cls = get_class(target) if target else None
    except Exception:  # noqa: BLE001 - an unimportable target is reported when the job runs alone
        cls = None
    if cls is None or not issubclass(cls, Probe):
        return f"callbacks.{name}: a callback that needs its own Trainer"
    if int(node.get("every_n_steps") or 0) > 0:
        return f"callbacks.{name}.every_n_steps={node.get('every_n_steps')}: step probes are not stacked"
    for key in STOPPING_KEYS:
        if node.get(key):
            return f"callbacks.{name}.{key}: a probe that stops training is not stacked yet"
    return None


@dataclass
class _TrainerView:
    """What a Probe reads from the Trainer, for one member (single process, rank 0, one logger)."""

    datamodule: Any
    default_root_dir: str
    max_epochs: int
    current_epoch: int = 0
    global_step: int = 0
    should_stop: bool = False
    is_global_zero: bool = True
    world_size: int = 1
    strategy: Any = None
    loggers: tuple = (True,)  # a Probe writes its JSON and plot only when the run has a logger
    callbacks: list = field(default_factory=list)  # no run-wide ProbeBudget (such jobs run alone)


class _ModuleView:
    """The member's plain LightningModule, with ``log`` recording into a dict (no Trainer attached)."""

    def __init__(self, module: Any) -> None:
        self._module = module
        self.logged: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def log(self, name: str, value: Any, **_: Any) -> None:
        self.logged[name] = float(value)


class MemberProbes:
    """The configured epoch probes of one stacked member."""

    def __init__(self, member: Any, out: Path, max_epochs: int, group_size: int) -> None:
        self.member, self.group_size = member, group_size
        self.probes: list[Probe] = [cb for cb in build_callbacks(member.cfg) if isinstance(cb, Probe)]
        self.trainer = _TrainerView(member.dm, str(out), max_epochs)
        self.module = _ModuleView(member.module)
        for p in self.probes:
            p.on_train_start(self.trainer, self.module)

    def epoch_end(self, epoch: int, steps: int, weights: dict[str, torch.Tensor], device: torch.device,
                  group_train_s: float) -> dict[str, float]:
        """Run the probes due at the end of ``epoch`` on ``weights``; the values they log (to be added to
        the member's epoch row, as a plain run's CSV logger puts them on its train row)."""
        if not self.probes:
            return {}
        model = self.member.module.model
        model.load_state_dict(weights)
        model.to(device).train()
        t, mv = self.trainer, self.module
        t.current_epoch, t.global_step = epoch, steps
        mv.logged = {}
        share = group_train_s / self.group_size  # the member's training time
        for p in self.probes:
            p._fit_start = time.perf_counter() - share - p.seconds  # see the module docstring
            p.on_train_epoch_end(t, mv)
        return dict(mv.logged)

    def states(self) -> dict[str, Any]:
        """Checkpoint entries of the probes, keyed as Lightning keys callback states."""
        return {p.state_key: p.state_dict() for p in self.probes}

    def finish(self) -> list[Probe]:
        """Write ``probes/<name>.json`` and plots; the probes (reporters for summary.json)."""
        for p in self.probes:
            p.on_train_end(self.trainer, self.module)
        return list(self.probes)

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.probes)
