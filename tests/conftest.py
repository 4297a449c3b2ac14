"""Shared test helpers: compose the real Hydra config with overrides, run it in a temp dir."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run in the interpreter on CPU-only machines. Set before any test module (or a
# norm registry lookup) first imports `kernels`, which reads the flag once.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One intra-op thread: CI has 2 cores and small models gain nothing from more (and lose a lot
# when the machine is shared).
torch.set_num_threads(1)

from shiftlab.trainers.compose import CONFIG_DIR as _CONFIG_DIR
from shiftlab.trainers.compose import compose

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(_CONFIG_DIR)


def compose_cfg(overrides: list[str], out: Path | None = None):
    """The composed ``train`` config, as Hydra would build it for ``shiftlab-train overrides``."""
    extra = [f"paths.output_dir={out}"] if out is not None else []
    return compose(list(overrides) + extra)


QUIET = ["print_config=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "callbacks=none", "trainer.accelerator=cpu"]


@pytest.fixture
def run_cfg(tmp_path):
    """``run_cfg(*overrides)`` -> composed config writing into a fresh temp run directory."""

    def make(*overrides: str, quiet: bool = True):
        return compose_cfg((QUIET if quiet else []) + list(overrides), tmp_path / "run")

    return make
