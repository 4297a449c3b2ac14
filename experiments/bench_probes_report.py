"""The tables and figure of :mod:`shiftlab.experiments.bench_probes` (``SUMMARY.md``, ``bench_probes.png``).

Why a module of its own: the benchmark's measuring code and its presentation each stay small.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from shiftlab.experiments.harness import plt

EVERY = 10  # probe period of the benchmark, when results.json does not say (bench_probes.EVERY)
# Cockpit 1.0.2, as published in issue 17 (same model and data, ratio to the unprobed run).
PUBLISHED_COCKPIT = {"economy": 7.9, "business": 8.7, "full": 20.1, "eigenvalue_ms": 36.0,
                     "shiftlab_old_set": 11.4, "shiftlab_old_eigenvalue_ms": 92.0}


def plot(res: dict[str, Any], path: Path) -> None:
    p = plt()
    fig, (a, b) = p.subplots(1, 2, figsize=(10, 3.6))
    acc = res["accuracy"]
    labels, pw, lz = [], [], []
    for variant, rows in acc.items():
        for step, r in rows.items():
            labels.append(f"{variant}\n@{step}")
            pw.append(100 * r["eig"]["power_max_rel_err"])
            lz.append(100 * r["eig"]["lanczos_max_rel_err"])
    idx = range(len(labels))
    a.bar([i - 0.2 for i in idx], pw, 0.4, label="power iteration (20, tol 1e-3)")
    a.bar([i + 0.2 for i in idx], lz, 0.4, label="Lanczos (tol 1e-3)")
    a.axhline(0.5, color="k", ls="--", lw=0.8, label="0.5% target")
    a.set_yscale("symlog", linthresh=0.1)
    a.set_xticks(list(idx), labels, fontsize=6)
    a.set_ylabel("worst |error| of 5 starts, % of reference")
    a.legend(fontsize=7)
    names, ratios = [], []
    for tag, rows in res["cost"].items():
        for k, v in rows.items():
            if isinstance(v, dict):
                names.append(f"{tag}\n{k}")
                ratios.append(v["ratio"])
    for k, v in (res.get("cockpit") or {}).get("ratios", {}).items():
        names.append(f"plain\ncockpit {k}")
        ratios.append(v)
    b.bar(range(len(names)), ratios, color=["C0" if "cockpit" not in n else "C3" for n in names])
    b.set_xticks(range(len(names)), names, fontsize=5, rotation=60)
    b.set_ylabel(f"wall time / unprobed (probe every {res.get('every', EVERY)} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    p.close(fig)


def tables(res: dict[str, Any]) -> str:
    """The accuracy and cost tables as markdown (also written to SUMMARY.md)."""
    lines = [f"Machine: {res['machine']} (shared with other jobs: timings are noisy)", "",
             "| model/mode | step | reference (lambda_min) | power worst err | Lanczos worst err | "
             "Lanczos HVPs | converged |", "|---|---|---|---|---|---|---|"]
    for variant, rows in res["accuracy"].items():
        for step, r in rows.items():
            e = r["eig"]
            lines.append(f"| {variant} | {step} | {e['reference']:.4g} ({e['lambda_min']:.3g}) | "
                         f"{100 * e['power_max_rel_err']:.2f}% | {100 * e['lanczos_max_rel_err']:.1e}% | "
                         f"{e['lanczos_hvps']:.0f} | {e['lanczos_converged']} |")
    lines += ["", "| model/mode | step | exact trace | layer-factor (GGN) err | Hutchinson-10 median err | "
              "adaptive (5% SE) median err | median probes | median SE | within 2 SE |",
              "|---|---|---|---|---|---|---|---|---|"]
    for variant, rows in res["accuracy"].items():
        for step, r in rows.items():
            t = r.get("trace")
            if not t:
                continue
            ex = "n/a" if t["exact"] is None else f"{t['exact']:.4g}"
            fmt = lambda k: f"{100 * t[k]:.1f}%" if k in t else "n/a"  # noqa: E731
            gg = f"{100 * t['ggn_rel_err']:.1e}%" if "ggn_rel_err" in t else "n/a (not exact here)"
            lines.append(f"| {variant} | {step} | {ex} | {gg} | {fmt('hutch10_median_rel_err')} | "
                         f"{fmt('adaptive_median_rel_err')} | {t['adaptive_median_samples']:.0f} | "
                         f"{100 * t['adaptive_median_rel_se']:.1f}% | {t.get('adaptive_within_2se', 'n/a')} |")
    lines += ["", f"Cost, {res['cost_steps']} SGD steps, a probe every {res.get('every', EVERY)} steps "
              "(ratio = wall time / unprobed run; ms = median per probe):", ""]
    probes = len(range(0, res["cost_steps"], res.get("every", EVERY)))
    for tag, rows in res["cost"].items():
        for k, v in rows.items():
            if isinstance(v, dict):
                ms = ", ".join(f"{a} {b:.1f}" for a, b in v["ms_per_probe"].items() if b >= 0.05)
                added = 1e3 * (v["seconds"] - rows["unprobed_seconds"]) / probes
                lines.append(f"- {tag} / {k}: ratio {v['ratio']:.2f}, {added:.0f} ms added per probe; ms: {ms}")
    ck = res.get("cockpit")
    lines += same_quantity_table(res, ck if ck and ck.get("available") else None)
    if ck and ck.get("available"):
        lines += ["", f"Cockpit measured here (plain model; its own loop's unprobed run "
                  f"{ck['unprobed_seconds_backpack_model']:.2f} s vs shiftlab's {ck['unprobed_seconds_shiftlab_loop']:.2f} s): "
                  + ", ".join(f"{k} {v:.2f}x ({1e3 * (v - 1) * ck['unprobed_seconds_backpack_model'] / ck['probes']:.0f} "
                              "ms added per probe)" for k, v in ck["ratios"].items()),
                  "Cockpit ms per probe (run time minus unprobed, per probe): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in ck["ms_per_probe"].items()),
                  f"Shared quantities, largest relative difference shiftlab vs Cockpit: {ck['max_rel_diff_shared']:.1e}; "
                  f"top eigenvalue median error vs reference: Cockpit {100 * ck['median_eig_rel_err']['cockpit']:.2f}%, "
                  f"shiftlab Lanczos {100 * ck['median_eig_rel_err']['shiftlab_lanczos']:.1e}%"]
        if "max_trace_rel_err" in ck:
            e = ck["max_trace_rel_err"]
            lines.append(f"Trace of the batch loss, largest error vs the exact trace: Cockpit HessTrace "
                         f"{100 * e['cockpit']:.1e}%, shiftlab layer factors {100 * e['shiftlab']:.1e}%")
        if "extras_agreement" in ck:
            lines.append(extras_line(ck["extras_agreement"]))
    else:
        lines += ["", f"Cockpit not importable here ({(ck or {}).get('reason', 'skipped')}); published in "
                  f"issue 17 (not measured here): {PUBLISHED_COCKPIT}"]
    return "\n".join(lines)




def same_quantity_table(res: dict[str, Any], ck: dict[str, Any] | None) -> list[str]:
    """Cost of one quantity alone, shiftlab against Cockpit, both as milliseconds added per probe from the
    step times of one run (``bench_probes.added_ms_per_probe``; plain model); Cockpit's figures only where
    it ran here."""
    rows = res["cost"]["plain"]

    def added(name: str) -> float | None:
        return rows.get(name, {}).get("added_ms_per_probe")

    def cockpit(name: str) -> float | None:
        return None if ck is None else ck.get("added_ms_per_probe", {}).get(name)

    def spread(runs: list[float] | None) -> str:
        return "" if not runs or len(runs) < 2 else f" [{min(runs):.1f}-{max(runs):.1f}]"

    def verdict(name: str, theirs_name: str, ours: float | None, theirs: float | None) -> str:
        if ours is None or theirs is None:
            return "n/a"
        if ours <= theirs:
            return "yes"
        a, b = rows.get(name, {}).get("added_ms_runs"), (ck or {}).get("added_ms_runs", {}).get(theirs_name)
        return "NO (within the runs' spread)" if a and b and min(a) <= max(b) else "NO"

    table = [  # (quantity, ours, ours before, Cockpit's name)
        ("norm test alone", ("layer factors", added("norm_test_layers")), ("vmap", added("norm_test_vmap")),
         "NormTest"),
        ("Hessian trace of the batch loss", ("exact, layer factors", added("trace_ggn")),
         ("Hutchinson to 5% SE", added("trace_hutchinson")), "HessTrace"),
        ("top eigenvalue of the batch loss", ("Lanczos tol 1e-3", added("eigenvalue")), None, "HessMaxEV"),
        ("economy-like set", ("7 gradient tests + alpha", added("gradient_tests")), None, "economy"),
        ("TIC, diagonal form", ("layer-factor GGN diagonal", added("tic_diag")),
         ("Hutchinson-20 diagonal", added("tic_diag_hutchinson")), "TICDiag"),
        ("TIC, trace form", ("layer-factor GGN diagonal", added("tic_trace")), None, "TICTrace"),
        ("gradient histogram 1d", ("row blocks, histc", added("grad_hist_1d")), None, "GradHist1d"),
        ("gradient histogram 2d", ("flat cell index, histc", added("grad_hist_2d")),
         ("histogramdd", added("grad_hist_2d_histogramdd")), "GradHist2d"),
        ("distance from initialization", ("per-layer norms", added("distance")), None, "Distance"),
        ("update size", ("per-layer norms", added("update_size")), None, "UpdateSize"),
    ]
    out = ["", "Same quantity alone, ms added per probe (per-phase median step times of one run, minus the "
           "probe-free phases; plain model; where repeated: the median run [smallest-largest run]):", "",
           "| quantity | shiftlab | shiftlab before | Cockpit | no higher than Cockpit |", "|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    keys = {"norm test alone": "norm_test_layers", "Hessian trace of the batch loss": "trace_ggn",
            "top eigenvalue of the batch loss": "eigenvalue", "economy-like set": "gradient_tests",
            "TIC, diagonal form": "tic_diag", "TIC, trace form": "tic_trace", "gradient histogram 1d": "grad_hist_1d",
            "gradient histogram 2d": "grad_hist_2d", "distance from initialization": "distance",
            "update size": "update_size"}
    for name, (how, ours), before, theirs_name in table:
        key, theirs = keys[name], cockpit(theirs_name)
        met = verdict(key, theirs_name, ours, theirs)
        prev = "" if before is None else f"{fmt(before[1])} ({before[0]})"
        ours_s = f"{fmt(ours)}{spread(rows.get(key, {}).get('added_ms_runs'))} ({how})"
        theirs_s = f"{fmt(theirs)}{spread((ck or {}).get('added_ms_runs', {}).get(theirs_name))} ({theirs_name})"
        out.append(f"| {name} | {ours_s} | {prev} | {theirs_s} | {met} |")
    return out


def extras_line(e: dict[str, Any]) -> str:
    """TIC and histograms, shiftlab against Cockpit on the same batches (bench_probes_cockpit.extras_agreement)."""
    exact = "".join(f", vs the exact torch.func diagonal {e[k]:.1e}" for k in ("tic_diag_max_rel_diff_exact",)
                    if k in e)
    return (f"TIC (Hessian diagonal path: {', '.join(e['tic_hessian_diagonal'])}), largest relative difference vs "
            f"Cockpit: diag {e['tic_diag_max_rel_diff_cockpit']:.1e}, trace {e['tic_trace_max_rel_diff_cockpit']:.1e}"
            f"{exact}; histograms vs Cockpit's (same bins and range): 1d largest count difference "
            f"{e['grad_hist_1d_max_count_diff']:.0f} ({100 * e['grad_hist_1d_moved_fraction']:.1e}% of elements in "
            f"another bin), 2d {e['grad_hist_2d_max_count_diff']:.0f} ({100 * e['grad_hist_2d_moved_fraction']:.1e}%)")
