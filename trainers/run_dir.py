"""Run directories that are never shared between processes.

Why: Hydra names the run directory after the launch time to the second, so two runs started in
the same second (a job array, two terminals) wrote into one directory and one run's results were
lost without a message. The ``shiftlab_unique_dir`` resolver claims the directory with an atomic
``os.mkdir``: the first process gets ``<base>``, the next ``<base>_1``, ``<base>_2``, ...
Within one process the same base resolves to the same directory (Hydra resolves it more than once).
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

_CLAIMED: dict[str, str] = {}


def claim_unique_dir(base: str) -> str:
    """Create and return ``base`` or the first free ``base_<n>``; idempotent per process."""
    if base in _CLAIMED:
        return _CLAIMED[base]
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        candidate = base if n == 0 else f"{base}_{n}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            n += 1
            continue
        _CLAIMED[base] = candidate
        return candidate


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("shiftlab_unique_dir"):
        OmegaConf.register_new_resolver("shiftlab_unique_dir", lambda base: claim_unique_dir(str(base)))
    if not OmegaConf.has_resolver("shiftlab_basename"):  # a run's name in the loggers: its directory's name
        OmegaConf.register_new_resolver("shiftlab_basename", lambda path: Path(str(path)).name)
