"""Summary, performance targets, table and figure of a ``shiftlab.kernels.bench`` run.

Split from the runner so that ``--report`` (and the tests) rebuild everything from
``bench.json`` alone. A run on CPU (the Triton interpreter or the torch fallback) only checks
the script: its ratios say nothing about the kernels' speed, so it is marked as not meaningful
in the printed rows, in ``bench.md`` (its targets are "not meaningful", neither met nor missed)
and on the figure. Speedups are ratios, drawn on a log axis around 1.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

BASES = ("eager", "compile", "liger")
SMOKE_BACKENDS = ("triton-interpreter", "torch")
SMOKE_NOTE = "CPU smoke run (Triton interpreter / torch fallback): checks the script; the ratios are not meaningful"


def is_smoke(meta: dict) -> bool:
    """True for a run whose times are not a speed measurement of the kernels (no CUDA)."""
    return meta.get("device") == "cpu" or meta.get("backend") in SMOKE_BACKENDS


def fmt_row(row: dict, smoke: bool = False) -> str:
    """One printed line per measured shape; a smoke run's line says its ratios mean nothing."""
    shape = "x".join(map(str, row["shape"]))
    parts = [f"{row['op']:<11} {row['dtype']:<4} {row['layout']:<4} {shape:<18}"]
    o = row["ours"]
    parts.append(f"ours fwd/bwd/fb {o['fwd']:.4f}/{o['bwd']:.4f}/{o['fwd_bwd']:.4f} ms "
                 f"({o['fwd_bwd_pct_copy']:.0f}% copy)")
    for base in BASES:
        if base in row:
            parts.append(f"x{row[base]['fwd_bwd'] / o['fwd_bwd']:.2f} vs {base}")
    parts.append(f"[eager={row['eager_backend']}]")
    if smoke:
        parts.append("(CPU smoke: not meaningful)")
    return "  ".join(parts)


def geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize(rows: list[dict]) -> dict:
    """Geomean speedups of ours (fwd+bwd) per op and dtype, plus the targets from the issue."""
    out: dict = {}
    for op in sorted({r["op"] for r in rows}):
        for dt in sorted({r["dtype"] for r in rows}):
            sel = [r for r in rows if r["op"] == op and r["dtype"] == dt]
            if not sel:
                continue
            key = f"{op}/{dt}"
            out[key] = {}
            for base in BASES:
                for phase in ("fwd", "bwd", "fwd_bwd"):
                    g = geomean([r[base][phase] / r["ours"][phase] for r in sel if base in r])
                    if g is not None:
                        out[key][f"{phase}_speedup_vs_{base}"] = g
            big = [r for r in sel if math.prod(r["shape"]) >= 2**24]
            if big:
                out[key]["fwd_bwd_pct_copy_large_min"] = min(r["ours"]["fwd_bwd_pct_copy"] for r in big)
            if op == "ln":
                for cond, name in ((lambda n: n >= 4096, "N>=4096"), (lambda n: n == 1024, "N=1024")):
                    s2 = [r for r in sel if cond(r["shape"][1])]
                    if s2:
                        out[key][f"fwd_bwd_speedup_vs_eager_{name}_geomean"] = geomean(
                            [r["eager"]["fwd_bwd"] / r["ours"]["fwd_bwd"] for r in s2])
                        out[key][f"fwd_bwd_speedup_vs_eager_{name}_min"] = min(
                            r["eager"]["fwd_bwd"] / r["ours"]["fwd_bwd"] for r in s2)
    return out



# (summary key, metric, threshold, label): the performance targets, all fwd+bwd.
TARGETS = [
    ("bn/bf16", "fwd_bwd_speedup_vs_eager", 1.3, "BN bf16 >= 1.3x eager"),
    ("bn/bf16", "fwd_bwd_speedup_vs_compile", 1.0, "BN bf16 >= 1.0x torch.compile"),
    ("bn/bf16", "fwd_bwd_pct_copy_large_min", 80.0, "BN bf16 >= 80% of copy bandwidth (large shapes)"),
    ("bn_relu/bf16", "fwd_bwd_speedup_vs_compile", 1.15, "BN+ReLU bf16 >= 1.15x torch.compile"),
    ("ln/bf16", "fwd_bwd_speedup_vs_eager_N>=4096_min", 1.2, "LN bf16 >= 1.2x eager at N >= 4096"),
    ("ln/bf16", "fwd_bwd_speedup_vs_eager_N=1024_min", 1.0, "LN bf16 >= 1.0x eager at N = 1024"),
    ("ln/fp32", "fwd_bwd_speedup_vs_eager_N>=4096_min", 1.2, "LN fp32 >= 1.2x eager at N >= 4096"),
    ("ln/fp32", "fwd_bwd_speedup_vs_eager_N=1024_min", 1.0, "LN fp32 >= 1.0x eager at N = 1024"),
]


def check_targets(summary: dict, smoke: bool = False) -> list[dict]:
    """Each target with its measured value and whether it is met (None: not measured, or a
    smoke run, which can neither meet nor miss a GPU target)."""
    out = []
    for key, metric, thr, label in TARGETS:
        v = summary.get(key, {}).get(metric)
        out.append({"target": label, "key": key, "metric": metric, "threshold": thr, "value": v,
                    "met": None if v is None or smoke else bool(v >= thr),
                    **({"note": "not meaningful (CPU smoke run)"} if smoke else {})})
    return out




def markdown(meta: dict, summary: dict, targets: list[dict]) -> str:
    """The README table: per op/dtype geomean fwd+bwd speedups, then the targets."""
    copy = meta.get("copy_peak", {})
    smoke = is_smoke(meta)
    lines = [f"**{SMOKE_NOTE}.**", ""] if smoke else []
    lines += [f"Device: {meta.get('device')} (torch {meta.get('torch')}, triton {meta.get('triton')}); "
             f"copy_ peak {copy.get('gbs', float('nan')):.0f} GB/s (read+write, same run).", "",
             "| op/dtype | vs eager | vs torch.compile | vs Liger | min % of copy (large) |",
             "| --- | --- | --- | --- | --- |"]

    def f(v, suffix="x"):
        if v is None:
            return "-"
        return f"{v:.2f}{suffix}" if abs(v) >= 0.01 else f"{v:.2g}{suffix}"  # a smoke run's 1e-4 stays visible

    for key, s in summary.items():
        lines.append(f"| {key} | {f(s.get('fwd_bwd_speedup_vs_eager'))} | "
                     f"{f(s.get('fwd_bwd_speedup_vs_compile'))} | {f(s.get('fwd_bwd_speedup_vs_liger'))} | "
                     f"{f(s.get('fwd_bwd_pct_copy_large_min'), '%')} |")
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for t in targets:
        met = t.get("note") or {None: "not measured", True: "yes", False: "**no**"}[t["met"]]
        lines.append(f"| {t['target']} | {f(t['value'], '')} | {met} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, meta: dict, rows: list[dict], final: bool) -> dict:
    """bench.json always; bench.md and bench.png when ``final``. Returns the summary."""
    summary = summarize(rows)
    targets = check_targets(summary, is_smoke(meta))
    (out / "bench.json").write_text(json.dumps({"meta": meta, "summary": summary, "targets": targets,
                                                "rows": rows}, indent=1))
    if final and rows:
        (out / "bench.md").write_text(markdown(meta, summary, targets))
        plot(rows, out / "bench.png", smoke=is_smoke(meta))
    return summary



def _bar_limits(vals: list[float]) -> tuple[float, float]:
    """Log-axis limits symmetric around 1 that hold every ratio (at least 0.5x .. 2x)."""
    span = max([abs(math.log10(v)) for v in vals if v > 0] + [math.log10(2.0)]) * 1.25
    return 10 ** -span, 10 ** span


def _ratio_ticks(lo: float, hi: float) -> list[float]:
    """1x, its halvings/doublings when the range is narrow, decades when it is wide."""
    fine = [t for t in (0.25, 0.5, 1.0, 2.0, 4.0) if lo <= t <= hi]
    decades = [10.0 ** k for k in range(-6, 7) if lo <= 10.0 ** k <= hi]
    return fine if len(decades) <= 1 else decades


def plot(rows: list[dict], path: Path, smoke: bool = False) -> None:
    """fwd+bwd speedup of ours per shape and baseline: bars from 1 on a log axis (up = ours
    faster); a smoke run is greyed, hatched and labelled as not meaningful."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ops = sorted({(r["op"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(8, 0.45 * len(rows) / max(len(ops), 1) + 4),
                                                  3.2 * len(ops) + (0.6 if smoke else 0)), squeeze=False)
    colors = {"eager": "C0", "compile": "C1", "liger": "C2"}
    for ax, (op, dt) in zip(axes[:, 0], ops):
        sel = [r for r in rows if r["op"] == op and r["dtype"] == dt]
        labels = [f"{'x'.join(map(str, r['shape']))} {r['layout']}" for r in sel]
        seen: list[float] = []
        for base, off in (("eager", -0.27), ("compile", 0.0), ("liger", 0.27)):
            pts = [(i + off, r[base]["fwd_bwd"] / r["ours"]["fwd_bwd"]) for i, r in enumerate(sel)
                   if base in r and r["ours"]["fwd_bwd"] > 0 and r[base]["fwd_bwd"] > 0]
            if not pts:
                continue
            xs, vals = zip(*pts)
            seen += vals
            ax.bar(xs, [v - 1.0 for v in vals], bottom=1.0, width=0.27, label=f"vs {base}",
                   color="0.6" if smoke else colors[base], edgecolor=colors[base],
                   hatch="//" if smoke else None)
        ax.set_yscale("log")
        lo, hi = _bar_limits(seen)
        ax.set_ylim(lo, hi)
        ax.set_yticks(_ratio_ticks(lo, hi))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlim(-0.6, len(sel) - 0.4)
        ax.set_xticks(list(range(len(sel))))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("shape (N x C x H x W, or M x N) and layout")
        ax.set_ylabel("fwd+bwd speedup of ours (log)")
        ax.set_title(f"{op} {dt}: ours vs eager / torch.compile / Liger (>1x = ours faster)")
        ax.legend(fontsize=8)
        if smoke:
            ax.text(0.5, 0.5, "CPU smoke run: not meaningful", transform=ax.transAxes, ha="center",
                    va="center", fontsize=16, color="red", alpha=0.35, rotation=12)
    if smoke:
        fig.suptitle(SMOKE_NOTE, color="red", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98 if smoke else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
