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
        contract = RunContract(dirs[0] / "checkpoints")  # its signal handlers only: the group has no Trainer
        with contract.signals():
            group.fit(epoch_writer(members, group, dirs), signalled=lambda: contract.received)
        for i, m in enumerate(members):
            finish_member(m, group, i, dirs[i])
    wall = time.perf_counter() - start
    return write_members(members, group, [Path(out) for out in out_dirs], wall)
