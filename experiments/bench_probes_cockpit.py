"""The Cockpit side of :mod:`shiftlab.experiments.bench_probes` (optional; needs cockpit-for-pytorch
and backpack-for-pytorch importable).

How it is found: ``cockpit`` and ``backpack`` must be importable (e.g. ``pip install --target <dir>
cockpit-for-pytorch==1.0.2 backpack-for-pytorch`` and that directory on ``PYTHONPATH``; cockpit 1.0.2
imports ``pkg_resources`` for its version string only, so without setuptools a one-line stand-in
module on the path does). Why a separate module: Cockpit is an optional peer, not a dependency; when it cannot be imported
the benchmark reports the published figures of issue 17 instead. Only the plain MLP is run:
BackPACK's individual gradients do not support BatchNorm in train mode.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from shiftlab.callbacks import gradient_histograms as gh
from shiftlab.callbacks import gradient_stats as gs
from shiftlab.callbacks import tic
from shiftlab.callbacks.gradient_tests import GradientTests
from shiftlab.callbacks.curvature_estimates import lanczos_eigenvalues
from shiftlab.callbacks.per_example_layers import ggn_trace
from shiftlab.experiments import bench_probes as bp

SINGLE = ("NormTest", "InnerTest", "OrthoTest", "MeanGSNR", "EarlyStopping", "Alpha", "HessTrace",
          "HessMaxEV", "TICDiag", "TICTrace", "GradHist1d", "GradHist2d", "Distance", "UpdateSize")
# Cockpit quantity -> shiftlab's further quantity (gradient_extras) for the same number
SHARED_EXTRAS = {"TICDiag": "tic_diag", "TICTrace": "tic_trace", "GradHist1d": "grad_hist_1d",
                 "GradHist2d": "grad_hist_2d"}
# Cockpit quantity -> shiftlab's name for the same number
SHARED = {"NormTest": "norm_test", "InnerTest": "inner_product_test", "OrthoTest": "orthogonality_test",
          "MeanGSNR": "gsnr", "EarlyStopping": "eb_criterion"}


def _import() -> tuple[Any, str | None]:
    try:
        import backpack  # noqa: F401
        import cockpit
        return cockpit, None
    except Exception as e:  # ImportError, or a broken install (e.g. missing pkg_resources)
        return None, f"{type(e).__name__}: {e}"


def _run(x, y, steps: int, quantities: list | None) -> tuple[float, float]:
    """Wall time of ``steps`` SGD steps with Cockpit tracking ``quantities`` (None: no Cockpit) and the
    milliseconds added per probe from its step times (:func:`bench_probes.added_ms_per_probe`)."""
    from backpack import extend
    from cockpit import Cockpit

    model = extend(bp.make_model(False))
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=bp.LR)
    ck = Cockpit(model.parameters(), quantities=quantities) if quantities is not None else None
    t0 = time.perf_counter()
    ticks = [t0]
    for step, (xb, yb) in enumerate(bp.batches(x, y, steps, seed=1)):
        out = model(xb)
        loss = loss_fn(out, yb)
        opt.zero_grad()
        if ck is None:
            loss.backward()
        else:
            losses = F.cross_entropy(out, yb, reduction="none")
            with ck(step, info={"batch_size": len(xb), "individual_losses": losses, "loss": loss,
                                "optimizer": opt}):
                loss.backward(create_graph=ck.create_graph(step))
        opt.step()
        ticks.append(time.perf_counter())
    return time.perf_counter() - t0, bp.added_ms_per_probe(ticks)


def _extras(model, xb, yb, exact: bool) -> dict[str, Any]:
    """shiftlab's TIC (the callback's default path) and histograms on one batch; with ``exact``, TIC from
    the ``torch.func`` exact Hessian diagonal too (one product per parameter: ~45 s here)."""
    cb = GradientTests(every_n_steps=1, quantities=["tic_diag", "tic_trace"], max_overhead=None)
    out: dict[str, Any] = dict(cb.measure(model, xb, yb)[0])
    out["tic_hessian_diagonal"] = cb.extras.hessian_used
    G = gs.batch_moments(model, xb, yb, gradients=True).gradients
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    out["grad_hist_1d"] = gh.histogram_1d(G).tolist()
    out["grad_hist_2d"] = gh.histogram_2d(G, flat).tolist()
    if exact:
        c = gs.batch_moments(model, xb, yb).moments.coord_sq_mean
        h = tic.hessian_diagonal_exact(model, xb, yb, chunk_size=1024).diag
        out["tic_diag_exact_reference"], out["tic_trace_exact_reference"] = tic.tic_diag(c, h), tic.tic_trace(c, h)
    return out


def _values_at(state: dict, xb, yb, exact: bool = False) -> dict[str, Any]:
    """Cockpit's and shiftlab's numbers on one batch at one checkpoint."""
    from backpack import extend
    from cockpit import Cockpit, quantities

    model = extend(bp.make_model(False))
    model.load_state_dict(state)
    once = lambda s: s == 0  # noqa: E731
    qs = [getattr(quantities, q)(track_schedule=once) for q in (*SHARED, "HessMaxEV", "HessTrace", *SHARED_EXTRAS)]
    ck = Cockpit(model.parameters(), quantities=qs)
    opt = torch.optim.SGD(model.parameters(), lr=bp.LR)
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    out = model(xb)
    loss = loss_fn(out, yb)
    with ck(0, info={"batch_size": len(xb), "individual_losses": F.cross_entropy(out, yb, reduction="none"),
                     "loss": loss, "optimizer": opt}):
        loss.backward(create_graph=ck.create_graph(0))
    theirs = ck.get_output()[0]
    plain = bp.make_model(False)
    plain.load_state_dict(state)
    m = gs.batch_moments(plain, xb, yb, path="layers").moments  # the probes' path on this model
    fn, params = bp._loss_params(plain, xb, yb)
    ref = lanczos_eigenvalues(fn, params, tol=1e-6, ncv=40, max_hvps=4000)
    ours = {v: gs.STATISTICS[v](m) for v in SHARED.values()}
    ours["top_eigenvalue_lanczos"] = lanczos_eigenvalues(fn, params, tol=1e-3).values[0]
    ours["reference_top_eigenvalue"] = ref.values[0]
    ours["exact_trace"] = bp.exact_trace_piecewise_linear(plain, xb, yb)
    ours["trace_layer_factors"] = ggn_trace(plain, xb, yb).trace
    ours.update(_extras(plain, xb, yb, exact))
    cockpit = {k: float(theirs[k]) for k in (*SHARED, "TICDiag", "TICTrace")}
    for k in ("GradHist1d", "GradHist2d"):
        cockpit[k] = torch.as_tensor(theirs[k]["hist"]).double().tolist()
    cockpit["HessMaxEV"] = float(theirs["HessMaxEV"])
    ht = theirs["HessTrace"]
    cockpit["HessTrace"] = float(sum(ht)) if isinstance(ht, (list, tuple)) else float(ht)
    return {"cockpit": cockpit, "shiftlab": ours}


def compare(x, y, steps: int, unprobed_seconds: float, checkpoints: list[int]) -> dict[str, Any]:
    ck, why = _import()
    if ck is None:
        return {"available": False, "reason": why}
    from cockpit import quantities
    from cockpit.utils.configuration import configuration
    from cockpit.utils.schedules import linear

    sched = linear(bp.EVERY)
    n_probes = len(range(0, steps, bp.EVERY))
    base = min(_run(x, y, steps, None)[0] for _ in range(2))
    ratios, ms, added = {}, {}, {}
    for c in ("economy", "business", "full"):
        t, added[c] = _run(x, y, steps, configuration(c, track_schedule=sched))
        ratios[c] = t / base
    runs: dict[str, list[float]] = {}
    for q in SINGLE:  # as shiftlab's single quantities: bp.REPEATS runs, the median run
        rs = sorted((_run(x, y, steps, [getattr(quantities, q)(track_schedule=sched)]) for _ in range(bp.REPEATS)),
                    key=lambda r: r[1])
        t, added[q] = rs[len(rs) // 2]
        runs[q] = [r[1] for r in rs]
        ms[q] = 1e3 * max(t - base, 0.0) / n_probes
    states = bp.train_checkpoints(False, x, y, checkpoints)
    xb, yb = x[: bp.BATCH], y[: bp.BATCH]
    values = {step: _values_at(state, xb, yb, exact=step == min(states)) for step, state in states.items()}
    for v in values.values():
        ref = v["shiftlab"]["reference_top_eigenvalue"]
        v["cockpit_eig_rel_err"] = abs(v["cockpit"]["HessMaxEV"] - ref) / abs(ref)
        v["shiftlab_eig_rel_err"] = abs(v["shiftlab"]["top_eigenvalue_lanczos"] - ref) / abs(ref)
        exact = v["shiftlab"]["exact_trace"]
        v["trace_rel_err"] = {"cockpit": abs(v["cockpit"]["HessTrace"] - exact) / abs(exact),
                              "shiftlab": abs(v["shiftlab"]["trace_layer_factors"] - exact) / abs(exact)}
    extras = extras_agreement(values)
    return {"available": True, "extras_agreement": extras, "version": getattr(ck, "__version__", "1.0.2?"),
            "unprobed_seconds_backpack_model": base, "unprobed_seconds_shiftlab_loop": unprobed_seconds,
            "ratios": ratios, "ms_per_probe": ms, "added_ms_per_probe": added, "added_ms_runs": runs,
            "probes": n_probes,
            "values_on_first_batch": values,
            "max_rel_diff_shared": max(abs(v["cockpit"][k] - v["shiftlab"][s]) / max(abs(v["shiftlab"][s]), 1e-12)
                                       for v in values.values() for k, s in SHARED.items()),
            "max_trace_rel_err": {k: max(v["trace_rel_err"][k] for v in values.values())
                                  for k in ("cockpit", "shiftlab")},
            "median_eig_rel_err": {"cockpit": statistics.median(v["cockpit_eig_rel_err"] for v in values.values()),
                                   "shiftlab_lanczos": statistics.median(v["shiftlab_eig_rel_err"]
                                                                         for v in values.values())}}


def extras_agreement(values: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Over the checkpoints: the largest relative difference of TIC diag / trace, shiftlab vs Cockpit (and
    vs the exact ``torch.func`` diagonal where measured), and of the histograms the largest count
    difference and the fraction of elements in a different bin."""
    out: dict[str, Any] = {"tic_hessian_diagonal": sorted({v["shiftlab"]["tic_hessian_diagonal"]
                                                           for v in values.values()})}
    for theirs, ours in (("TICDiag", "tic_diag"), ("TICTrace", "tic_trace")):
        out[f"{ours}_max_rel_diff_cockpit"] = max(abs(v["cockpit"][theirs] - v["shiftlab"][ours])
                                                  / abs(v["shiftlab"][ours]) for v in values.values())
        exact = [v["shiftlab"][ours] - v["shiftlab"][f"{ours}_exact_reference"] for v in values.values()
                 if f"{ours}_exact_reference" in v["shiftlab"]]
        ref = [v["shiftlab"][f"{ours}_exact_reference"] for v in values.values()
               if f"{ours}_exact_reference" in v["shiftlab"]]
        if ref:
            out[f"{ours}_max_rel_diff_exact"] = max(abs(d) / abs(r) for d, r in zip(exact, ref))
    for theirs, ours in (("GradHist1d", "grad_hist_1d"), ("GradHist2d", "grad_hist_2d")):
        diffs = [torch.tensor(v["cockpit"][theirs]) - torch.tensor(v["shiftlab"][ours]) for v in values.values()]
        totals = [sum(torch.tensor(v["shiftlab"][ours]).reshape(-1).tolist()) for v in values.values()]
        out[f"{ours}_max_count_diff"] = max(float(d.abs().max()) for d in diffs)
        out[f"{ours}_moved_fraction"] = max(float(d.abs().sum()) / 2 / t for d, t in zip(diffs, totals))
        out[f"{ours}_count_totals"] = [float(torch.tensor(v["cockpit"][theirs]).sum()) for v in values.values()]
    return out
