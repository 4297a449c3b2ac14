"""``launcher=stacked``: a Hydra launcher that trains the jobs differing only in their seed as one stacked
model and runs every other job as Hydra's basic launcher does, saying which and why.

Hydra instantiates launchers only from the ``hydra_plugins`` namespace (``Plugins._instantiate``); the
class is registered there under :data:`PLUGIN_NAME` by :func:`register` (called when
``shiftlab.trainers.train`` is imported) instead of shipping a ``hydra_plugins`` package.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from shiftlab.trainers.stacked.grouping import plan

log = logging.getLogger("shiftlab")
PLUGIN_NAME = "hydra_plugins.shiftlab_stacked.StackedLauncher"


class StackedLauncher(Launcher):
    def __init__(self) -> None:
        super().__init__()
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        self._composed: dict[tuple[str, ...], DictConfig] = {}
        self._remember_compositions(hydra_context.config_loader)

    def _remember_compositions(self, loader) -> None:
        """Hydra's basic sweeper composes every job of a batch to check it (``validate_batch_is_legal``)
        and throws the configs away; the launcher would compose each job again (~0.1 s of CPU per job).
        The loader is wrapped so the sweeper's configs for this launcher's sweep config are kept, and
        :meth:`_job_config` takes each one once (it is the same call, so the same config)."""
        compose = loader.load_sweep_config

        def load_sweep_config(master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
            cfg = compose(master_config, sweep_overrides)
            if master_config is self.config:
                self._composed[tuple(sweep_overrides)] = cfg
            return cfg

        loader.load_sweep_config = load_sweep_config

    def _job_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        cfg = self._composed.pop(tuple(overrides), None)
        if cfg is None:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = idx
            cfg.hydra.job.num = idx
        return cfg

    def _run(self, cfg: DictConfig, task) -> JobReturn:
        ret = run_job(hydra_context=self.hydra_context, task_function=task, config=cfg,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = [self._job_config(o, initial_job_idx + i) for i, o in enumerate(job_overrides)]
        bare = []
        for c in configs:
            node = OmegaConf.to_container(c, resolve=False)
            node.pop("hydra", None)
            bare.append(OmegaConf.create(node))
        groups, alone = plan(bare)
        returns: dict[int, JobReturn] = {}
        for members in groups:
            jobs = " ".join(f"#{initial_job_idx + i}" for i in members)
            print(f"shiftlab: stacked: jobs {jobs} train as one stacked model ({len(members)} members)", flush=True)
            returns.update(self._run_group(members, configs))
        for i in sorted(alone):
            lst = " ".join(filter_overrides(job_overrides[i]))
            print(f"shiftlab: stacked: job #{initial_job_idx + i} ({lst}) runs alone: {alone[i]}", flush=True)
            HydraConfig.instance().set_config(configs[i])
            returns[i] = self._run(configs[i], self.task_function)
        return [returns[i] for i in range(len(configs))]

    def _run_group(self, members: list[int], configs: list[DictConfig]) -> dict[int, JobReturn]:
        """Each member's job directory (``.hydra/``) is made by ``run_job`` with a task that only records
        the resolved config; then the group trains once and each job's return value is filled in."""
        from shiftlab.callbacks.run_contract import EXIT_CODES
        from shiftlab.trainers.stacked.run import train_stacked
        from shiftlab.trainers.train import final_line, metric_value

        resolved: dict[int, DictConfig] = {}
        returns: dict[int, JobReturn] = {}
        for i in members:
            def record(cfg: DictConfig, i: int = i) -> None:
                OmegaConf.resolve(cfg)  # ${hydra:runtime.output_dir} resolves only while HydraConfig is set
                resolved[i] = cfg
            HydraConfig.instance().set_config(configs[i])
            returns[i] = self._run(configs[i], record)
        cfgs = [resolved[i] for i in members]
        try:
            summaries = train_stacked(cfgs, [Path(c.paths.output_dir) for c in cfgs])
        except Exception as e:  # noqa: BLE001 - a crashed group must not stop the rest of the sweep
            log.exception("stacked group failed")
            for i in members:
                returns[i].status, returns[i]._return_value = JobStatus.FAILED, e
            return returns
        for i, s, c in zip(members, summaries, cfgs):
            print(final_line(s, c.paths.output_dir), flush=True)
            value = metric_value(s, c.get("optimized_metric")) if s.get("status") == "completed" else math.nan
            returns[i].status, returns[i]._return_value = JobStatus.COMPLETED, value
        stopped = next((s["status"] for s in summaries if s.get("status") in EXIT_CODES), None)
        if stopped:  # a signal stops the whole sweep, as under the basic launcher
            raise SystemExit(EXIT_CODES[stopped])
        return returns


def register() -> None:
    """Make ``hydra.launcher._target_: hydra_plugins.shiftlab_stacked.StackedLauncher`` instantiable."""
    from hydra.core.plugins import Plugins

    Plugins.instance().class_name_to_class.setdefault(PLUGIN_NAME, StackedLauncher)
