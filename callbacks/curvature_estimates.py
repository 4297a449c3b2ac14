"""Curvature estimates that say how far to trust them: Lanczos eigenvalues with residuals and a converged
flag, Hutchinson's trace with its standard error, and the model mode the curvature is taken in.

Why beside :mod:`shiftlab.callbacks.hessian`: those are the plain estimators (power iteration, a fixed
number of Hutchinson probes) kept to reproduce earlier figures; these report the evidence with the value.
Conventions (``loss_fn``, ``params``, ``generator``) are the ones of :mod:`shiftlab.callbacks.hessian`.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from shiftlab.callbacks.hessian import LossFn, _HVP, _dot, _random_like, _split_like
from shiftlab.callbacks.probe_utils import eval_mode

__all__ = ["EigenResult", "TraceResult", "lanczos_eigenvalues", "hutchinson_trace_se", "probe_mode"]

@dataclass
class EigenResult:
    """Eigenvalues with the evidence for them.

    ``values``: descending; ``residuals``: ``||H v - lambda v||`` per Ritz pair, recomputed with
    one extra Hessian-vector product each (an eigenvalue error is at most its residual);
    ``hvps``: products spent; ``converged``: every ``residual <= tol * max(|lambda|, tol)``.
    """

    values: list[float]
    residuals: list[float]
    hvps: int
    converged: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TraceResult:
    """Hutchinson's trace, its standard error (sample std / sqrt(n)) and the probes used."""

    trace: float
    se: float
    samples: int
    converged: bool  # se / |trace| reached the target before max_samples

    def as_dict(self) -> dict:
        return asdict(self)


def lanczos_eigenvalues(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    k: int = 1,
    which: str = "LA",
    tol: float = 1e-3,
    max_hvps: int = 300,
    ncv: int | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """Top-``k`` Hessian eigenvalues by implicitly restarted Lanczos (scipy ``eigsh``, ARPACK).

    Why not power iteration: it converges to the eigenvalue of largest *magnitude*, at a rate set
    by ``|lambda_2 / lambda_1|``; with ``|lambda_min|`` close to ``lambda_max`` (BatchNorm nets in
    train mode early on) it stalls between the two and a relative-change test stops it on the
    plateau. Lanczos with ``which="LA"`` (largest algebraic; ``"SA"`` smallest, ``"LM"`` largest
    magnitude) separates them and its residual says whether it is done.

    ``tol`` is ARPACK's relative accuracy; ``ncv`` the Lanczos basis size (default
    ``max(2k+2, 8)``); ``max_hvps`` bounds the Hessian-vector products (the
    restart count is derived from it). When ARPACK does not converge the best Ritz values so far
    are returned with ``converged=False`` rather than raising.
    """
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    if k < 1 or which not in ("LA", "SA", "LM"):
        raise ValueError(f"need k >= 1 and which in LA, SA, LM; got k={k}, which={which!r}")
    hvp = _HVP(loss_fn, params)
    n = sum(p.numel() for p in hvp.params)
    if k >= n:
        raise ValueError(f"k={k} must be smaller than the number of parameters {n}")
    dtype, count = hvp.params[0].dtype, [0]

    def matvec(z):
        count[0] += 1
        zt = torch.as_tensor(z.reshape(-1), dtype=dtype).to(hvp.params[0].device)
        hv = hvp(_split_like(zt, hvp.params))
        return torch.cat([h.reshape(-1) for h in hv]).double().cpu().numpy()

    ncv = min(n, ncv or max(2 * k + 2, 8))  # 8: 10-22 products at tol 1e-3 on the MLP
    v0 = torch.randn(n, generator=generator, dtype=torch.float64).numpy()
    op = LinearOperator((n, n), matvec=matvec, dtype="float64")
    try:
        vals, vecs = eigsh(op, k=k, which=which, tol=tol, ncv=ncv, v0=v0,
                           maxiter=max(1, max_hvps // max(1, ncv - k)))
    except ArpackNoConvergence as e:  # keep what converged; flag it below through residuals
        vals, vecs = e.eigenvalues, e.eigenvectors
        if len(vals) == 0:
            return EigenResult([float("nan")] * k, [float("inf")] * k, count[0], False)
    order = vals.argsort()[::-1]
    values, residuals = [], []
    for i in order:
        lam, vec = float(vals[i]), vecs[:, i]
        residuals.append(float(((matvec(vec) - lam * vec) ** 2).sum() ** 0.5))
        values.append(lam)
    ok = len(values) == k and all(r <= tol * max(abs(v), tol) for v, r in zip(values, residuals))
    return EigenResult(values, residuals, count[0], ok)


def hutchinson_trace_se(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    target_rel_error: float = 0.05,
    min_samples: int = 20,
    max_samples: int = 100,
    generator: torch.Generator | None = None,
) -> TraceResult:
    """Hutchinson's trace with Rademacher probes, adding probes until ``se / |trace|`` drops
    below ``target_rel_error`` (checked from ``min_samples >= 2`` on) or ``max_samples`` is spent.

    Why a standard error: with a fixed 10 probes the error against the exact trace ranged over
    tens of percent with nothing to flag it. Stopping on the running SE biases the SE slightly
    low (optional stopping); ``min_samples`` keeps that small.
    """
    if not 2 <= min_samples <= max_samples or target_rel_error < 0:
        raise ValueError(f"need 2 <= min_samples <= max_samples and target_rel_error >= 0, got "
                         f"{min_samples}, {max_samples}, {target_rel_error}")
    hvp = _HVP(loss_fn, params)
    xs: list[float] = []
    while len(xs) < max_samples:
        v = _random_like(hvp.params, "rademacher", generator)
        xs.append(float(_dot(v, hvp(v))))
        if len(xs) >= min_samples:
            mean, se = _mean_se(xs)
            if se <= target_rel_error * abs(mean):
                return TraceResult(mean, se, len(xs), True)
    mean, se = _mean_se(xs)
    return TraceResult(mean, se, len(xs), se <= target_rel_error * abs(mean))


def _mean_se(xs: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(len(xs)))


@contextlib.contextmanager
def probe_mode(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """The network to probe: ``eval`` - ``model`` itself in eval mode (restored on exit);
    ``train`` - a deep copy in train mode, so BatchNorm uses batch statistics as the training
    steps do while the model's running statistics do not move. Dropout stays off in both
    (a Hessian of a random function is no fixed operator). Probe ``trainable params`` of the
    module yielded, not of ``model``.
    """
    if mode == "eval":
        with eval_mode(model):
            yield model
    elif mode == "train":
        twin = copy.deepcopy(model).train()
        for m in twin.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        yield twin
    else:
        raise ValueError(f"mode={mode!r} is not allowed; allowed: train, eval")
