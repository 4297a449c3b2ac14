"""Speed of the batched log-space chain inference vs pomegranate's DenseHMM (CPU).

Same HMM parameters, same sequences (default batch 256, T 100, K 32): times the forward pass,
the forward pass plus its autograd backward (the gradient-descent training step), and the full
forward-backward (posterior marginals + expected transition counts, the EM E-step); checks that
both libraries give the same log-likelihood; prints the time ratios (pomegranate / ours, > 1
means ours is faster).

    .venv/bin/python experiments/pgm_bench.py [--batch 256 --length 100 --states 32 --threads 1]

pomegranate is optional (``pip install -c constraints.txt pomegranate==1.1.2``); without it
the script compares against a plain per-step ``logsumexp`` reference implementation instead.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

from shiftlab.experiments.harness import describe_machine, machine
from shiftlab.trainers.models.chain import inference as chain
from shiftlab.trainers.models.hmm import hmm_unary, make_hmm


def _time_pair(a: Callable[[], object], b: Callable[[], object], repeats: int, warmup: int = 2
               ) -> tuple[float, float]:
    """Minimum wall times (ms) of ``a`` and ``b``, called alternately so that both see the same
    background load on a shared CPU; the minimum is the least disturbed run."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, ts in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return 1e3 * min(ta), 1e3 * min(tb)


def _import_peer():
    """Import pomegranate first: importing it (through apricot) resets torch's thread count, so
    the thread setting must come after."""
    try:
        import pomegranate.hmm  # noqa: F401

        return None
    except ImportError as e:  # pragma: no cover - optional package
        return e


def reference_forward(unary: torch.Tensor, trans: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Textbook log-space forward with a (B, K, K) broadcast + logsumexp per step."""
    alpha = start + unary[:, 0]
    for t in range(1, unary.shape[1]):
        alpha = torch.logsumexp(alpha[:, :, None] + trans, dim=1) + unary[:, t]
    return torch.logsumexp(alpha, -1)


def _pomegranate_model(params, dtype):
    from pomegranate.distributions import Categorical
    from pomegranate.hmm import DenseHMM

    K = params.num_states
    dists = [Categorical(params.emit[k:k + 1].to(dtype)) for k in range(K)]
    return DenseHMM(dists, edges=params.trans.to(dtype), starts=params.start.to(dtype),
                    ends=torch.ones(K, dtype=dtype))


def run(batch: int, length: int, states: int, symbols: int, repeats: int, seed: int = 0,
        peer_error: ImportError | None = None) -> dict:
    dtype = torch.float32
    params = make_hmm(states, symbols, stickiness=0.5, emission_noise=0.5, seed=seed)
    x, _, _ = params.sample(batch, length, seed=seed + 1)
    log_start, log_trans, log_emit = (t.to(dtype) for t in params.logs())
    unary = hmm_unary(log_emit, x, None).contiguous()

    ours_ll = chain.log_partition(unary, log_trans, log_start)
    exact_ll = chain.log_partition(*(t.double() for t in (unary, log_trans, log_start)))

    def ours_fwd():
        return chain.log_partition(unary, log_trans, log_start)

    def ours_grad():
        u = unary.detach().requires_grad_(True)
        a = log_trans.detach().requires_grad_(True)
        chain.log_partition(u, a, log_start).sum().backward()

    def ours_fb():
        fwd = chain.forward(unary, log_trans, log_start)
        beta = chain.backward(unary, log_trans)
        chain.expected_transitions(unary, log_trans, fwd.log_alpha, beta, fwd.log_z)
        return torch.exp(fwd.log_alpha + beta - fwd.log_z[:, None, None])

    res: dict = {"batch": batch, "length": length, "states": states, "symbols": symbols,
                 "dtype": str(dtype), "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "machine": describe_machine()}
    ours = {"forward": ours_fwd, "forward+autograd": ours_grad, "forward-backward": ours_fb}
    # variable lengths (uniform in [T/2, T]), masked: the forward pass costs the same
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=torch.Generator().manual_seed(seed))
    mask = chain.lengths_to_mask(lengths, length)
    unary_var = unary.masked_fill(~mask[..., None], 0.0)
    ours_var = {"forward (masked lengths)": lambda: chain.log_partition(unary_var, log_trans, log_start, mask)}
    res["max_abs_ll_err_ours_vs_float64"] = float((ours_ll.double() - exact_ll).abs().max())

    try:
        import pomegranate

        if peer_error is not None:
            raise peer_error
        model = _pomegranate_model(params, dtype)
        peer_name = f"pomegranate {pomegranate.__version__} DenseHMM"
        X = x[..., None]
        peer_unary = model._emission_matrix(X)  # (B, T, K) log emissions, as theirs computes them
        peer_ll = model.log_probability(X)

        def peer_fwd():
            f = model.forward(emissions=unary)
            return torch.logsumexp(f[:, -1] + model.ends, dim=1)

        def peer_grad():
            u = unary.detach().requires_grad_(True)
            f = model.forward(emissions=u)
            torch.logsumexp(f[:, -1] + model.ends, dim=1).sum().backward()

        def peer_fb():
            return model.forward_backward(emissions=unary)

        peer = {"forward": peer_fwd, "forward+autograd": peer_grad, "forward-backward": peer_fb,
                "log-likelihood from symbols": lambda: model.log_probability(X)}
        ours["log-likelihood from symbols"] = lambda: chain.log_partition(hmm_unary(log_emit, x, None),
                                                                          log_trans, log_start)
        res["max_abs_emission_diff"] = float((peer_unary - unary).abs().max())
        res["max_abs_ll_diff_vs_peer"] = float((peer_ll - ours_ll).abs().max())
        res["max_rel_ll_diff_vs_peer"] = float(((peer_ll - ours_ll).abs() / ours_ll.abs()).max())
    except ImportError as e:  # pragma: no cover - depends on the optional package
        peer_name = f"reference logsumexp loop (pomegranate not importable: {e})"
        ref_ll = reference_forward(unary, log_trans, log_start)

        def ref_grad():
            u = unary.detach().requires_grad_(True)
            reference_forward(u, log_trans, log_start).sum().backward()

        peer = {"forward": lambda: reference_forward(unary, log_trans, log_start), "forward+autograd": ref_grad}
        res["max_abs_ll_diff_vs_peer"] = float((ref_ll - ours_ll).abs().max())
    res["peer"] = peer_name
    res["ours_ms"], res["peer_ms"] = {}, {}
    for k in peer:
        res["ours_ms"][k], res["peer_ms"][k] = _time_pair(ours[k], peer[k], repeats)
    for k, fn in ours_var.items():
        res["ours_ms"][k] = _time_pair(fn, fn, repeats)[0]
    res["ratio_peer_over_ours"] = {k: res["peer_ms"][k] / res["ours_ms"][k] for k in res["peer_ms"]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--states", type=int, default=32)
    ap.add_argument("--symbols", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = leave as is)")
    ap.add_argument("--json", type=str, default="", help="also write the figures to this file")
    a = ap.parse_args()
    peer_error = _import_peer()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    res = run(a.batch, a.length, a.states, a.symbols, a.repeats, peer_error=peer_error)
    print(f"peer: {res['peer']}; batch {a.batch}, T {a.length}, K {a.states}, V {a.symbols}, "
          f"{res['dtype']}, torch {res['torch']}, {res['threads']} thread(s)\nmachine: {machine()}")
    for k in res["ours_ms"]:
        if k in res["peer_ms"]:
            print(f"  {k:28s} ours {res['ours_ms'][k]:8.2f} ms   peer {res['peer_ms'][k]:8.2f} ms   "
                  f"ratio peer/ours {res['ratio_peer_over_ours'][k]:5.2f}")
        else:
            print(f"  {k:28s} ours {res['ours_ms'][k]:8.2f} ms")
    print(f"  max |log-lik ours - peer| = {res['max_abs_ll_diff_vs_peer']:.3e} "
          f"(ours vs float64: {res['max_abs_ll_err_ours_vs_float64']:.3e})")
    ok = res["max_abs_ll_diff_vs_peer"] <= 1e-4 * max(1.0, float(a.length))
    print("  log-likelihoods agree" if ok else "  LOG-LIKELIHOODS DISAGREE")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
