"""The one place that finds shiftlab's configs and composes them outside ``shiftlab-train``.

Sweeps, pre-flight checks, experiment drivers, benchmarks and tests all need "the config that
``shiftlab-train <overrides>`` would build"; they get it here, so the config directory is resolved one way
(next to the installed package: site-packages/shiftlab/configs, or the checkout's configs/ in an editable
install) and Hydra's global state is always cleared before and after.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@contextlib.contextmanager
def hydra_context(config_dir: str | Path = CONFIG_DIR, job_name: str = "train") -> Iterator[None]:
    """Hydra initialised on ``config_dir`` for the duration of the block, and cleared afterwards.

    ``job_name`` is given, not guessed: Hydra's guess reads the caller's stack frame, which is this helper."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name=job_name):
            yield
    finally:
        GlobalHydra.instance().clear()


def compose(overrides: Sequence[str] = (), config_name: str = "train", config_dir: str | Path = CONFIG_DIR,
            job_name: str = "train", return_hydra_config: bool = False) -> DictConfig:
    """The config ``shiftlab-train <overrides>`` would compose (without running it)."""
    from hydra import compose as hydra_compose

    from shiftlab.trainers.run_dir import register_resolvers

    register_resolvers()
    with hydra_context(config_dir, job_name):
        return hydra_compose(config_name=config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)
