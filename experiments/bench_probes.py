"""Benchmark: how accurate and how costly the curvature and gradient probes are (issue 17).

``python -m shiftlab.experiments.bench_probes [--quick] [--out outputs/bench_probes]``

MLP 40-128-128-10 (ReLU, with and without BatchNorm) on mnist1d, SGD (lr 0.1, batch 128), one
process. Writes ``results.json`` and ``bench_probes.png`` under ``--out``.

* Accuracy, at several checkpoints, on a fixed 512-sample training subset: the top Hessian
  eigenvalue by power iteration at its defaults (20 products, tol 1e-3) and by Lanczos
  (:func:`~shiftlab.callbacks.hessian.lanczos_eigenvalues`, tol 1e-3) from 5 random starts each,
  against a converged reference (Lanczos, tol 1e-10), for the plain model, the BatchNorm model in
  eval mode and in train mode (on a copy). Hutchinson's trace (10 probes, and adaptive to a 5%
  relative SE) against the exact trace where affordable: ReLU nets with eval-mode BatchNorm are
  piecewise linear, so the diagonal of their Hessian equals that of the Gauss-Newton matrix
  ``J^T H_out J``, whose trace comes exactly from per-example output Jacobians
  (:func:`exact_trace_piecewise_linear`); a train-mode BatchNorm Hessian has extra terms and gets
  no exact trace. The probes' exact trace by layer factors (:func:`~shiftlab.callbacks.
  per_example_layers.ggn_trace`) is checked against it.
* Cost: training runs with a probe every 10 steps against the unprobed run (ratio of wall
  times), and the seconds per probe of each quantity; single quantities (norm test, trace on the
  batch, top eigenvalue, and TIC diag / trace, gradient histograms 1d / 2d, distance, update size
  through the gradient-tests callback) as Cockpit's: ms added per probe from one run's step times
  (:func:`added_ms_per_probe`).
* Cockpit (cockpit-for-pytorch + backpack-for-pytorch), when importable: the same runs with its
  economy / business / full configurations and single quantities, and its values on the same
  batches (:mod:`shiftlab.experiments.bench_probes_cockpit`). Otherwise the issue's published
  Cockpit figures are shown, labelled as such.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from shiftlab.callbacks import gradient_histograms as gh
from shiftlab.callbacks import gradient_stats as gs
from shiftlab.callbacks.gradient_extras import EXTRA_QUANTITIES
from shiftlab.callbacks.gradient_noise import gradient_noise_scale
from shiftlab.callbacks.gradient_tests import GradientTests
from shiftlab.callbacks.hessian import hutchinson_trace, top_hessian_eigenvalue
from shiftlab.callbacks.curvature_estimates import hutchinson_trace_se, lanczos_eigenvalues, probe_mode
from shiftlab.callbacks.per_example_layers import ggn_is_hessian_trace, ggn_trace
from shiftlab.experiments.bench_probes_report import PUBLISHED_COCKPIT, plot, tables
from shiftlab.experiments.harness import base_parser, machine, output_dir, setup_threads

LR, BATCH, SUBSET, EVERY = 0.1, 128, 512, 10


def load_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    return torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.long)


def make_model(bn: bool, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, o in ((40, 128), (128, 128)):
        layers += [nn.Linear(i, o)] + ([nn.BatchNorm1d(o)] if bn else []) + [nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(128, 10))


def batches(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0):
    g, i, perm = torch.Generator().manual_seed(seed), 0, None
    for _ in range(steps):
        if perm is None or i + BATCH > len(x):
            perm, i = torch.randperm(len(x), generator=g), 0
        idx = perm[i : i + BATCH]
        i += BATCH
        yield x[idx], y[idx]


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(xb), yb).backward()
    opt.step()


def train_checkpoints(bn: bool, x, y, checkpoints: list[int]) -> dict[int, dict]:
    model = make_model(bn)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = {}
    for step, (xb, yb) in enumerate(batches(x, y, max(checkpoints) + 1)):
        if step in checkpoints:
            out[step] = {k: v.clone() for k, v in model.state_dict().items()}
        sgd_step(model.train(), opt, xb, yb)
    return out


def _loss_params(m: nn.Module, x, y) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    return (lambda: F.cross_entropy(m(x), y)), [p for p in m.parameters() if p.requires_grad]


def exact_trace_piecewise_linear(model: nn.Module, x, y, chunk: int = 64) -> float:
    """Exact ``tr(H)`` of the mean cross-entropy of a piecewise-linear net (ReLU, eval-mode BN):
    its Hessian is ``mean_n J_n^T (diag p_n - p_n p_n^T) J_n``, so the trace is
    ``mean_n sum_ij A_n,ij <J_n,i, J_n,j>`` with the per-example output Jacobians ``J_n``."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def out(p, xi):
        return functional_call(model, {**p, **buffers}, (xi.unsqueeze(0),))[0]

    total = 0.0
    with torch.no_grad():
        for s in range(0, len(x), chunk):
            xc = x[s : s + chunk]
            jac = vmap(jacrev(out), in_dims=(None, 0))(params, xc)  # name -> (n, C, *shape)
            J = torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], 2).double()
            p = torch.softmax(model(xc).double(), 1)
            a = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
            total += float((a * (J @ J.transpose(1, 2))).sum())
    return total / len(x)


def eig_row(model: nn.Module, x, y, mode: str, seeds: int) -> dict[str, Any]:
    with probe_mode(model, mode) as m:
        fn, params = _loss_params(m, x, y)
        ref = lanczos_eigenvalues(fn, params, tol=1e-6, ncv=40, max_hvps=4000,
                                  generator=torch.Generator().manual_seed(99))
        low = lanczos_eigenvalues(fn, params, which="SA", tol=1e-6, ncv=40, max_hvps=4000)
        power, lan = [], []
        for s in range(seeds):
            t = time.perf_counter()
            power.append((top_hessian_eigenvalue(fn, params, generator=torch.Generator().manual_seed(s)),
                          time.perf_counter() - t))
            t = time.perf_counter()
            r = lanczos_eigenvalues(fn, params, tol=1e-3, generator=torch.Generator().manual_seed(s))
            lan.append((r, time.perf_counter() - t))
    top = ref.values[0]

    def rel(v: float) -> float:
        return abs(v - top) / abs(top)

    return {"reference": top, "reference_residual": ref.residuals[0], "reference_converged": ref.converged,
            "lambda_min": low.values[0],
            "power": [v for v, _ in power], "power_max_rel_err": max(rel(v) for v, _ in power),
            "power_ms": 1e3 * statistics.median(s for _, s in power),
            "lanczos": [r.values[0] for r, _ in lan], "lanczos_max_rel_err": max(rel(r.values[0]) for r, _ in lan),
            "lanczos_converged": all(r.converged for r, _ in lan),
            "lanczos_hvps": statistics.median(r.hvps for r, _ in lan),
            "lanczos_ms": 1e3 * statistics.median(s for _, s in lan)}


def trace_row(model: nn.Module, x, y, mode: str, seeds: int, exact: bool) -> dict[str, Any]:
    with probe_mode(model, mode) as m:
        fn, params = _loss_params(m, x, y)
        truth = exact_trace_piecewise_linear(m, x, y) if exact else None
        fixed = [hutchinson_trace(fn, params, 10, torch.Generator().manual_seed(s)) for s in range(seeds)]
        adaptive = [hutchinson_trace_se(fn, params, target_rel_error=0.05, max_samples=100,
                                        generator=torch.Generator().manual_seed(100 + s)) for s in range(seeds)]
        layers = ggn_trace(m, x, y) if ggn_is_hessian_trace(m, x) is None else None
    row: dict[str, Any] = {"exact": truth, "hutch10": fixed, "adaptive": [a.as_dict() for a in adaptive],
                           "ggn": None if layers is None else layers.trace}
    if truth is not None and layers is not None:
        row["ggn_rel_err"] = abs(layers.trace - truth) / abs(truth)
    if truth is not None:
        row["hutch10_median_rel_err"] = statistics.median(abs(v - truth) / abs(truth) for v in fixed)
        row["adaptive_median_rel_err"] = statistics.median(abs(a.trace - truth) / abs(truth) for a in adaptive)
        row["adaptive_within_2se"] = sum(abs(a.trace - truth) <= 2 * a.se for a in adaptive) / len(adaptive)
    row["adaptive_median_samples"] = statistics.median(a.samples for a in adaptive)
    row["adaptive_median_rel_se"] = statistics.median(a.se / abs(a.trace) for a in adaptive)
    return row


# ------------------------------------------------------------------------------------ cost
def probe_sets(x, y, subset: int = SUBSET) -> dict[str, Callable[[nn.Module, Any, Any, int], dict[str, float]]]:
    """Each returns the seconds of its quantities for one probe on batch (xb, yb) at a step."""
    sub_x, sub_y = x[:subset], y[:subset]

    def timed(out: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        r = fn()
        out[name] = out.get(name, 0.0) + time.perf_counter() - t
        return r

    def old(model, xb, yb, step):  # issue 17's shiftlab set: sharpness (subset) + noise scale
        out: dict[str, float] = {}
        with probe_mode(model, "eval") as m:
            fn, params = _loss_params(m, sub_x, sub_y)
            g = torch.Generator().manual_seed(0)
            timed(out, "power_eigenvalue_512", lambda: top_hessian_eigenvalue(fn, params, generator=g))
            timed(out, "hutchinson10_512", lambda: hutchinson_trace(fn, params, 10, generator=g))
        timed(out, "b_simple_16x32", lambda: gradient_noise_scale(
            model, x, y, generator=torch.Generator().manual_seed(step)))
        return out

    tests = GradientTests(every_n_steps=1, max_overhead=None)

    def gradient_tests(model, xb, yb, step):
        _, cost, _ = tests.measure(model, xb, yb)
        return cost

    def curvature(model, xb, yb, step):
        out: dict[str, float] = {}
        with probe_mode(model, "train" if any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
                        else "eval") as m:
            fn, params = _loss_params(m, sub_x, sub_y)
            timed(out, "lanczos_eigenvalue_512", lambda: lanczos_eigenvalues(fn, params, tol=1e-3))
            if ggn_is_hessian_trace(m, sub_x) is None:  # the sharpness callback's trace_method=auto
                timed(out, "ggn_trace_512", lambda: ggn_trace(m, sub_x, sub_y))
            else:
                timed(out, "hutchinson_se5%_512", lambda: hutchinson_trace_se(fn, params, 0.05, max_samples=100))
            fn, params = _loss_params(m, xb, yb)
            timed(out, "lanczos_eigenvalue_batch", lambda: lanczos_eigenvalues(fn, params, tol=1e-3))
        return out

    def both(model, xb, yb, step):
        return {**gradient_tests(model, xb, yb, step), **curvature(model, xb, yb, step)}

    def norm_test(path: str) -> Callable:  # one quantity alone, as Cockpit's NormTest
        def run(model, xb, yb, step):
            out: dict[str, float] = {}
            with probe_mode(model, "eval") as m:
                timed(out, f"norm_test_{path}", lambda: gs.norm_test(gs.batch_moments(m, xb, yb, path=path).moments))
            return out
        return run

    def trace(method: str) -> Callable:  # the trace of the batch's loss alone, as Cockpit's HessTrace
        def run(model, xb, yb, step):
            out: dict[str, float] = {}
            with probe_mode(model, "eval") as m:
                if method == "ggn":
                    timed(out, "trace_ggn_batch", lambda: ggn_trace(m, xb, yb))
                else:
                    fn, params = _loss_params(m, xb, yb)
                    timed(out, "trace_hutchinson_se5%_batch", lambda: hutchinson_trace_se(fn, params, 0.05))
            return out
        return run

    def eigenvalue(model, xb, yb, step):  # the top eigenvalue of the batch loss alone, as Cockpit's HessMaxEV
        out: dict[str, float] = {}
        with probe_mode(model, "eval") as m:
            fn, params = _loss_params(m, xb, yb)
            timed(out, "lanczos_eigenvalue_batch", lambda: lanczos_eigenvalues(fn, params, tol=1e-3))
        return out

    def hist2d_reference(model, xb, yb, step):  # the histogramdd path, with G, as before this change
        out: dict[str, float] = {}
        with probe_mode(model, "eval") as m:
            G = timed(out, "per_example_gradients", lambda: gs.batch_moments(m, xb, yb, gradients=True).gradients)
            flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
            timed(out, "grad_hist_2d_histogramdd", lambda: gh.histogram_2d_reference(G, flat))
        return out

    return {"shiftlab_old": old, "gradient_tests": gradient_tests, "gradient_tests+curvature": both,
            "norm_test_layers": norm_test("layers"), "norm_test_vmap": norm_test("vmap"),
            "trace_ggn": trace("ggn"), "trace_hutchinson": trace("hutchinson"), "eigenvalue": eigenvalue,
            **{q: extra(q) for q in EXTRA_SETS if q in EXTRA_QUANTITIES},
            "tic_diag_hutchinson": extra("tic_diag", hessian_diagonal="hutchinson"),
            "grad_hist_2d_histogramdd": hist2d_reference}


# further quantities, each alone (plain model only: Cockpit's counterparts need BackPACK's individual gradients)
EXTRA_SETS = (*EXTRA_QUANTITIES, "tic_diag_hutchinson", "grad_hist_2d_histogramdd")


def extra(q: str, **kwargs: Any) -> Callable:
    """One further quantity alone through the gradient-tests callback, as Cockpit's TICDiag, GradHist1d, ...;
    its ``before_step`` is called at every step (the distance's start, the update size's end point)."""
    cb = GradientTests(every_n_steps=1, quantities=[q], max_overhead=None, **kwargs)

    def run(model, xb, yb, step):
        return cb.measure(model, xb, yb, step=step)[1]

    run.before_step = lambda model, step: cb.extras.before_step(model, step)  # type: ignore[attr-defined]
    return run


def timed_run(bn: bool, x, y, steps: int, probe: Callable | None, alpha: bool = False) -> dict[str, Any]:
    """Wall time of ``steps`` SGD steps with ``probe`` every EVERY steps (alpha: GradientTests'
    end point at the step after each probe, two forward-mode passes)."""
    model = make_model(bn)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    costs: dict[str, list[float]] = {}
    each_step = getattr(probe, "before_step", None)
    t0, ticks = time.perf_counter(), [time.perf_counter()]
    for step, (xb, yb) in enumerate(batches(x, y, steps, seed=1)):
        due = None if each_step is None else each_step(model, step)
        if due:  # an end point measured a step late (the update size): its own seconds
            costs.setdefault("update_size", []).append(due["seconds"])
        if probe is not None and step % EVERY == 0:
            for k, v in probe(model, xb, yb, step).items():
                costs.setdefault(k, []).append(v)
        if alpha and step % EVERY == 0:
            start = {"step": step, "at": gs.snapshot(model), "x": xb, "y": yb}
        if alpha and step % EVERY == 1:
            t = time.perf_counter()
            GradientTests._alpha(model, start, xb, yb, F.cross_entropy)
            costs.setdefault("alpha", []).append(time.perf_counter() - t)
        sgd_step(model.train(), opt, xb, yb)
        ticks.append(time.perf_counter())
    return {"seconds": time.perf_counter() - t0, "added_ms_per_probe": added_ms_per_probe(ticks),
            "ms_per_probe": {k: 1e3 * statistics.median(v) for k, v in costs.items()}}


def added_ms_per_probe(ticks: list[float], every: int = EVERY) -> float:
    """Milliseconds a probe adds to training, from the step times of one run: the median time of each
    step phase (``step % every``) over the run's cycles, summed, minus ``every`` times the median
    of the phases that do no probing work in either tool (``2 .. every-1``; phase 1 holds alpha's
    end point). Why not run time minus an unprobed run: on a shared machine two runs' load differs
    by more than a few-millisecond probe adds; phases of one run see the same load, and medians
    drop the steps another job interrupted."""
    dt = [b - a for a, b in zip(ticks, ticks[1:])]
    cycles = len(dt) // every
    phase = [statistics.median(dt[k : cycles * every : every]) for k in range(every)]
    return 1e3 * (sum(phase) - every * statistics.median(phase[2:]))


# single quantities compared with Cockpit's: each run REPEATS times (fresh probe state), median and spread
SINGLE_SETS = ("norm_test_layers", "norm_test_vmap", "trace_ggn", "trace_hutchinson", "eigenvalue", *EXTRA_SETS)
REPEATS = 3


def cost_section(x, y, steps: int, subset: int = SUBSET, repeats: int = REPEATS) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for bn in (False, True):
        tag = "bn" if bn else "plain"
        base = min(timed_run(bn, x, y, steps, None)["seconds"] for _ in range(2))
        rows = {"unprobed_seconds": base}
        for name in probe_sets(x, y, subset):
            if bn and name in EXTRA_SETS:
                continue
            runs = [timed_run(bn, x, y, steps, probe_sets(x, y, subset)[name], alpha=name.startswith("gradient_tests"))
                    for _ in range(repeats if name in SINGLE_SETS else 1)]
            r = sorted(runs, key=lambda v: v["added_ms_per_probe"])[len(runs) // 2]  # the median run
            rows[name] = {"ratio": r["seconds"] / base, **r,
                          "added_ms_runs": [v["added_ms_per_probe"] for v in runs]}
        out[tag] = rows
    return out




def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--no-cockpit", action="store_true", help="skip the Cockpit comparison")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    args.out = output_dir("bench_probes", args.quick, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    if args.reuse and (args.out / "results.json").exists():
        res = json.loads((args.out / "results.json").read_text())
        plot(res, args.out / "bench_probes.png")
        (args.out / "SUMMARY.md").write_text(tables(res) + "\n")
        print(tables(res))
        return 0
    x, y = load_data()
    checkpoints = [0, 10] if args.quick else [0, 100, 200, 500]
    seeds = 2 if args.quick else 5
    steps = 20 if args.quick else 200
    subset = 64 if args.quick else SUBSET
    sx, sy = x[:subset], y[:subset]
    acc: dict[str, dict[int, Any]] = {}
    for bn in (False, True):
        states = train_checkpoints(bn, x, y, checkpoints)
        for mode in (("eval", "train") if bn else ("eval",)):
            variant = f"{'bn' if bn else 'plain'}-{mode}"
            acc[variant] = {}
            for step, state in states.items():
                model = make_model(bn)
                model.load_state_dict(state)
                row = {"eig": eig_row(model, sx, sy, mode, seeds)}
                if step in (checkpoints[0], checkpoints[-1]):
                    row["trace"] = trace_row(model, sx, sy, mode, seeds, exact=mode == "eval")
                acc[variant][step] = row
                print(variant, step, json.dumps({k: v for k, v in row["eig"].items()
                                                 if not isinstance(v, list)}), flush=True)
    res: dict[str, Any] = {"machine": machine(), "quick": args.quick, "checkpoints": checkpoints,
                           "accuracy": acc, "cost": cost_section(x, y, steps, subset, 1 if args.quick else REPEATS),
                           "cost_steps": steps, "every": EVERY,
                           "subset": subset,
                           "published_cockpit": PUBLISHED_COCKPIT, "cockpit": None}
    if not args.no_cockpit:
        from shiftlab.experiments import bench_probes_cockpit as ck

        res["cockpit"] = ck.compare(x, y, steps, res["cost"]["plain"]["unprobed_seconds"], checkpoints)
    res["wall_seconds"] = time.perf_counter() - t_all
    (args.out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    plot(res, args.out / "bench_probes.png")
    (args.out / "SUMMARY.md").write_text(tables(res) + "\n")
    print(tables(res))
    print(f"wrote {args.out / 'results.json'} and bench_probes.png ({res['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
