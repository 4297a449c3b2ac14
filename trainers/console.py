"""Console output through rich: the resolved config as a tree."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from rich import print as rprint
from rich.syntax import Syntax
from rich.tree import Tree

ORDER = ("data", "model", "norm", "optimizer", "scheduler", "batching", "trainer", "callbacks", "logger", "paths")


def print_config_tree(cfg: DictConfig, resolve: bool = False) -> None:
    tree = Tree("config", guide_style="dim")
    keys = [k for k in ORDER if k in cfg] + [k for k in cfg if k not in ORDER and k != "hydra"]
    for key in keys:
        node = tree.add(f"[bold]{key}[/bold]")
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=resolve) if isinstance(value, DictConfig) else str(value)
        node.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    rprint(tree)
