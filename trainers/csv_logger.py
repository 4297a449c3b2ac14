"""Lightning's CSVLogger with atomic writes of ``metrics.csv``.

Why: the stock writer appends rows in place, so a kill or a full disk mid-write leaves a torn
last line. Here every save rewrites the (small: one row per logged step) file next to itself
and moves it into place, so ``metrics.csv`` is always a complete, parseable table.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from shiftlab.trainers.checkpoint_io import atomic_write_text


class AtomicExperimentWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._rows: list[dict[str, Any]] = []

    def _check_log_dir_exists(self) -> None:
        """No warning: the log dir is the run directory, which holds .hydra/ and checkpoints/ by
        design (the stock warning said files "will be deleted", which was never true here)."""

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()
        self._rows.extend(self.metrics)
        self.metrics = []
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(self._rows)
        atomic_write_text(self.metrics_file_path, buf.getvalue())


class AtomicCSVLogger(CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` whose ``metrics.csv`` is replaced atomically."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AtomicExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AtomicExperimentWriter(log_dir=self.log_dir)
        return self._experiment
