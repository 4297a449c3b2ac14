"""The report's figure: the metric against one swept parameter, one point per run.

Numbers go on a log axis when they were searched on one or span a factor of 10 (all positive),
otherwise on a linear one; anything else is shown as categories. When runs repeat seeds, the mean
and sample standard deviation over seeds are drawn at each value and no single run is starred.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

STYLE = {"complete": ("o", "tab:blue"), "pruned": ("x", "tab:orange"), "running": ("s", "tab:gray")}


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def plot_param(frame: pd.DataFrame, metric: str, param: str, best: pd.Series | None, path: Path,
               log_hint: bool = False, spread: pd.DataFrame | None = None) -> Path:
    """Write ``path``: ``metric`` against ``param`` for every run that has both.

    ``best`` (a row of ``frame``) is starred; ``spread`` (columns ``param``, ``mean``, ``std``, ``n``)
    adds mean +- std over seeds at each value of ``param``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=110)
    has = frame[frame[param].notna()]
    values = list(has[param])
    numeric = bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    categories = [] if numeric else sorted({str(v) for v in values})

    def x_of(v: Any) -> float:
        return float(v) if numeric else categories.index(str(v))

    for state, (marker, color) in STYLE.items():
        shown = has[(has["state"] == state) & has[metric].notna()]
        if len(shown):
            ax.scatter([x_of(v) for v in shown[param]], shown[metric].astype(float), marker=marker, color=color,
                       label=f"{state} ({len(shown)})")
    failed = int((frame["state"] == "failed").sum())
    if spread is not None and len(spread):
        ax.errorbar([x_of(v) for v in spread[param]], spread["mean"].astype(float),
                    yerr=spread["std"].astype(float).fillna(0.0), fmt="_", color="black", markersize=14,
                    capsize=4, label=f"mean ± std over seeds (n={int(spread['n'].min())}-{int(spread['n'].max())})"
                    if spread["n"].nunique() > 1 else f"mean ± std over seeds (n={int(spread['n'].iloc[0])})")
    if best is not None and best.get(param) is not None:
        ax.scatter([x_of(best[param])], [float(best[metric])], marker="*", s=220, facecolor="none",
                   edgecolor="crimson", linewidth=1.5, label="best")
    if numeric:
        pos = [float(v) for v in values if float(v) > 0]
        if len(pos) == len(values) and len(pos) > 1 and (log_hint or max(pos) / min(pos) >= 10):
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(categories)), categories, rotation=20 if len(categories) > 4 else 0)
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {param}" + (f"  ({failed} failed, not shown)" if failed else ""), fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
