"""Console output through rich: a compact view of the run's config.

Why compact: the whole config tree (~130 lines with unresolved ``${...}``) buried the few lines that matter.
The console shows the option chosen in each config group, the values the command line overrode (resolved)
and the run directory; the full resolved tree stays in ``<run>/.hydra/config.yaml``.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

GROUPS = ("data", "model", "module", "norm", "optimizer", "scheduler", "batching", "trainer", "callbacks",
          "logger", "experiment", "debug")


def _hydra_runtime() -> tuple[dict[str, Any], list[str]]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}, []
    hc = HydraConfig.get()
    return dict(hc.runtime.choices), list(hc.overrides.task)


def config_rows(cfg: DictConfig, choices: dict[str, Any] | None = None,
                overrides: list[str] | None = None) -> list[tuple[str, str, str]]:
    """``(kind, key, value)`` rows: the chosen option of each group, then each overridden value, resolved."""
    if choices is None or overrides is None:
        choices, overrides = _hydra_runtime()
    rows = []
    for group in GROUPS:
        choice = choices.get(group)
        if choice is None and isinstance(cfg.get(group), DictConfig) and "_target_" in cfg[group]:
            choice = str(cfg[group]._target_).rsplit(".", 1)[-1]
        if choice not in (None, "null"):
            rows.append(("group", group, str(choice)))
    for line in overrides:
        key = line.lstrip("+~").split("=", 1)[0]
        if key.startswith("hydra") or key in choices:
            continue
        value = OmegaConf.select(cfg, key, default=None)
        shown = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        rows.append(("override", key, str(shown)))
    rows.append(("run", "directory", str(cfg.paths.output_dir)))
    return rows


def print_config(cfg: DictConfig, console: Console | None = None) -> None:
    """Print :func:`config_rows` as one rich table."""
    table = Table(title="shiftlab run", show_header=False, box=None, pad_edge=False)
    for col in ("kind", "key", "value"):
        table.add_column(col, style="dim" if col == "kind" else None)
    for row in config_rows(cfg):
        table.add_row(*row)
    (console or Console()).print(table)


# Warnings that say nothing about the user's run, each with the reason it is safe to hide. Everything else
# still reaches the console.
KNOWN_NOISE: tuple[tuple[str, str], ...] = (
    (".*does not have many workers.*", "in-memory tensors: worker processes would only add start-up time"),
    (".*LitLogger.*", "a tip to install another logger"),
    (".*resuming from a checkpoint that ended before the epoch.*",
     "mid-epoch resumes are exact: the sampler skips the batches already seen (callbacks/run_contract.py)"),
    (r".*isinstance\(treespec, LeafSpec\).*", "Lightning's own use of a deprecated torch pytree API"),
)


def quiet_known_noise() -> None:
    """Install the :data:`KNOWN_NOISE` filters (call inside ``warnings.catch_warnings()``)."""
    import warnings

    for pattern, _why in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
