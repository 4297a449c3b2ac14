"""Train one stacked group end to end: build the members, fit, test, write each run directory."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from shiftlab.callbacks.run_contract import RunContract
from shiftlab.trainers.config_checks import check_config
from shiftlab.trainers.stacked.engine import StackedGroup, build_member, pick_device
from shiftlab.trainers.stacked.outputs import epoch_writer, finish_member, write_members
from shiftlab.trainers.stacked.probes import MemberProbes


def train_stacked(cfgs: list[DictConfig], out_dirs: list[Path]) -> list[dict[str, Any]]:
    """Like ``[train(c) for c in cfgs]`` for configs that differ only in their seed (see
    :func:`shiftlab.trainers.stacked.grouping.why_not_stacked`); returns the members' summaries."""
    start = time.perf_counter()
    for cfg in cfgs:
        check_config(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchmetrics' "no samples" etc. on tiny splits
        members = [build_member(cfg) for cfg in cfgs]
        group = StackedGroup(members, pick_device(cfgs[0]))
        dirs = [Path(d) for d in out_dirs]
        # the configured epoch probes; the memorization probe a label-noise run adds is the group's
        # (members.py: one vmap forward for all members)
        probes = [MemberProbes(m, dirs[i], group.max_epochs, group.k) for i, m in enumerate(members)]
        write = epoch_writer(members, group, dirs, extra_states=lambda i: probes[i].states())
        fit_start = time.perf_counter()

        def on_epoch_end(i: int, epoch: int, improved: bool) -> None:
            # the member's probes first (their values join its epoch row and its checkpoint, as in a plain
            # run, where ModelCheckpoint saves after the other callbacks' epoch-end hooks)
            if probes[i].probes:
                train_s = time.perf_counter() - fit_start - sum(p.seconds for p in probes)
                members[i].history[-1].update(probes[i].epoch_end(
                    epoch, (epoch + 1) * group.batches, group.member_weights(i), group.device, train_s))
            write(i, epoch, improved)

        contract = RunContract(dirs[0] / "checkpoints")  # its signal handlers only: the group has no Trainer
        with contract.signals():
            group.fit(on_epoch_end, signalled=lambda: contract.received)
        for i, m in enumerate(members):
            finish_member(m, group, i, dirs[i])
        reporters = [p.finish() for p in probes]
    wall = time.perf_counter() - start
    return write_members(members, group, [Path(out) for out in out_dirs], wall, probes=reporters)
