"""A stacked member's own callbacks: the plain run's early stopping and memorization probe, per member.

Why the plain objects: a member must stop, restore its weights and report exactly as its plain run does,
so each member gets the callback objects its plain run builds (``build_callbacks``, ``label_noise_probe``)
and the stacked engine calls their hooks with a stand-in for the few Trainer / LightningModule attributes
they read. Their ``state_dict``, ``summary_items`` and ``stop_reason`` then go into the member's
checkpoints and summary.json unchanged. The memorization probe's forward pass runs once for all members
(``vmap``); the metrics are computed per member by the plain
:func:`~shiftlab.callbacks.memorization.memorization_metrics`.
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from shiftlab.callbacks.early_stopping import RuleEarlyStopping
from shiftlab.callbacks.memorization import MemorizationMonitor, memorization_metrics
from shiftlab.callbacks.probe_budget import ProbeBudget
from shiftlab.callbacks.probe_utils import fixed_subset

if TYPE_CHECKING:
    from shiftlab.trainers.stacked.engine import Member, StackedGroup


class _SingleProcess:
    """``trainer.strategy`` of a single process: a broadcast returns what it is given."""

    @staticmethod
    def broadcast(obj: Any, src: int = 0) -> Any:
        return obj


def _trainer(metrics: dict[str, float], epoch: int, **extra: Any) -> SimpleNamespace:
    """The Trainer attributes RuleEarlyStopping reads, for one member at the end of ``epoch``."""
    return SimpleNamespace(sanity_checking=False, fast_dev_run=False, callback_metrics=metrics,
                           current_epoch=epoch, should_stop=False, is_global_zero=True,
                           strategy=_SingleProcess(), **extra)


class _MemberModule:
    """Member ``i`` as the plain callbacks see its LightningModule: weights under the module's keys
    (``model.*``), and ``log`` (collected into the member's history row)."""

    def __init__(self, group: StackedGroup, i: int) -> None:
        self.group, self.i = group, i
        self.logged: dict[str, float] = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v for k, v in self.group.member_weights(self.i).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.group.load_member_weights(self.i, {k.removeprefix("model."): v for k, v in state.items()})

    def log(self, name: str, value: Any, **_: Any) -> None:
        self.logged[name] = float(value)


class MemberCallbacks:
    """Member ``i``'s early-stopping callback, memorization probe and probe budget (each None / unused
    when its plain run has none)."""

    def __init__(self, member: Member, group: StackedGroup, i: int) -> None:
        from shiftlab.trainers.build import build_callbacks
        from shiftlab.trainers.train import label_noise_probe

        self.module = _MemberModule(group, i)
        built = build_callbacks(member.cfg)
        stops = [cb for cb in built if isinstance(cb, RuleEarlyStopping)]
        self.early_stopping: RuleEarlyStopping | None = stops[0] if stops else None
        probes = label_noise_probe(member.cfg, member.module, built)
        self.memorization: MemorizationMonitor | None = probes[0] if probes else None
        self.budget = ProbeBudget((member.cfg.get("probes") or {}).get("max_overhead"))
        self.budget.on_fit_start(SimpleNamespace(callbacks=probes), None)
        self.budget.on_train_start(None, None)
        self.has_logger = bool(member.cfg.get("logger"))

    def early_stop(self, epoch: int, row: dict[str, float]) -> bool:
        """The rule's decision after ``epoch`` on the member's metrics ``row`` (its validation end, then its
        epoch end, as in the plain run); the rule's logged diagnostics join ``row``."""
        es = self.early_stopping
        if es is None:
            return False
        trainer = _trainer(dict(row), epoch)
        es.on_validation_end(trainer, self.module)
        es.on_train_epoch_end(trainer, self.module)
        row.update(self.module.logged)
        self.module.logged.clear()
        return bool(trainer.should_stop)

    def end_training(self) -> None:
        """The plain run's ``on_train_end``: the rule's best weights go back into the member."""
        if self.early_stopping is not None:
            self.early_stopping.on_train_end(_trainer({}, -1), self.module)

    def reporters(self) -> list:
        """The member's reporting callbacks in a plain run's trainer order."""
        return [cb for cb in (self.early_stopping, self.memorization, self.budget) if cb is not None]

    def states(self) -> dict[str, Any]:
        """Checkpoint states keyed by ``state_key``, as Lightning stores them."""
        out = {cb.state_key: cb.state_dict() for cb in (self.early_stopping, self.memorization) if cb is not None}
        if self.memorization is not None:
            out[self.budget.state_key] = self.budget.state_dict()
        return out

    def restored_note(self) -> str | None:
        """``test/weights`` when the rule restored its best epoch (the test uses those weights)."""
        from shiftlab.trainers.checkpoint_io import test_weights

        if self.early_stopping is None or self.early_stopping.restored_epoch is None:
            return None
        return test_weights(SimpleNamespace(callbacks=[self.early_stopping]), "best")[1]

    def write_files(self, out: Path) -> None:
        """``probes/memorization.json``, as the plain probe writes it at the end of training."""
        if self.memorization is not None:
            self.memorization.on_train_end(
                SimpleNamespace(is_global_zero=True, loggers=[True] if self.has_logger else [],
                                default_root_dir=str(out)), None)


@torch.no_grad()
def measure_memorization(group: StackedGroup, rows: dict[int, dict[str, float]], epoch: int, step: int) -> None:
    """The memorization probe of every member in ``rows`` that has one: one vmap forward over the
    probed subset for all members, then the plain metrics per member, recorded as the plain probe records
    an epoch-end measurement (history, cost, ``mem/*`` and ``probe_cost/memorization_s`` in the row). The
    cost is shared equally between the members measured."""
    want = [i for i in rows if group.callbacks[i].memorization is not None]
    if not want:
        return
    monitors = [group.callbacks[i].memorization for i in want]
    first = monitors[0]
    if any((m.max_samples, m.seed, m.chunk_size) != (first.max_samples, first.seed, first.chunk_size)
           for m in monitors):
        raise ValueError("stacked memorization probes must share max_samples, seed and chunk_size")
    start = time.perf_counter()
    idx = fixed_subset(group.n_train, first.max_samples, first.seed)
    x = group.x_train if idx.numel() == group.n_train else group.x_train[:, idx.to(group.device)]
    logits = torch.cat([group.predict(x[:, s:s + first.chunk_size])
                        for s in range(0, idx.numel(), first.chunk_size)], dim=1).float().cpu()
    values = {}
    for i in want:
        split = group.members[i].dm.train_set
        values[i] = memorization_metrics(logits[i], split.y[idx].cpu(), split.y_true[idx].cpu(),
                                         split.corrupted[idx].cpu())
    cost = (time.perf_counter() - start) / len(want)
    for i, mon in zip(want, monitors):
        # what Probe._run records after an epoch-end measurement
        mon._last_cost = cost
        mon.seconds += cost
        mon.history.append({"step": step, "epoch": epoch, **values[i]})
        rows[i].update({f"{mon.log_prefix}/{k}": float(v) for k, v in values[i].items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        rows[i][f"probe_cost/{mon.name}_s"] = mon.seconds
