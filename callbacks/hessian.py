"""Hessian probes on a loss: Hessian-vector products, top eigenvalue, trace, epsilon-sharpness.

Why a shared module: the batch-regime experiment (sharpness at the end of training) and the
curvature-based early-stopping monitor both need the same curvature numbers, and they must agree.
Everything here is plain math on tensors, testable without a Trainer.

Common conventions
------------------
``loss_fn``
    A zero-argument callable returning a scalar loss tensor that depends on ``params`` through
    autograd (e.g. ``lambda: F.cross_entropy(model(x), y)`` on a fixed subset). Put the model in
    ``eval()`` mode first when it has dropout or batch norm, so that every call sees the same
    function; the probes call it once (HVP, eigenvalue, trace) or a few times (sharpness).
``params``
    A list of tensors with ``requires_grad=True`` (e.g. ``[p for p in model.parameters() if
    p.requires_grad]``). The Hessian is the one with respect to all of them, flattened and
    concatenated in list order.
``generator``
    An optional ``torch.Generator`` (CPU) for the random start / probe vectors, so results are
    reproducible without touching the global RNG. Random vectors are drawn on the CPU and moved
    to the parameters' device.

The eigenvalue and trace probes differentiate the gradient graph once and reuse it for every
Hessian-vector product (``retain_graph=True``), so ``k`` products cost one forward, one backward
and ``k`` double-backward passes.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

LossFn = Callable[[], Tensor]

__all__ = [
    "hessian_vector_product",
    "top_hessian_eigenvalue",
    "hutchinson_trace",
    "epsilon_sharpness",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _check_params(params: Sequence[Tensor]) -> list[Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params is empty; pass the tensors the Hessian is taken with respect to")
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(f"params[{i}] does not require grad; pass only trainable tensors")
    return params


def _split_like(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for p in params:
        n = p.numel()
        out.append(flat[i : i + n].view_as(p))
        i += n
    return out


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _norm(a: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(sum((x * x).sum() for x in a))


def _random_like(
    params: Sequence[Tensor], kind: str, generator: torch.Generator | None
) -> list[Tensor]:
    out = []
    for p in params:
        if kind == "normal":
            v = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        elif kind == "rademacher":
            v = torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1
        else:  # pragma: no cover - internal
            raise ValueError(kind)
        out.append(v.to(p.device))
    return out


class _HVP:
    """Gradient graph built once; each call is one double-backward pass."""

    def __init__(self, loss_fn: LossFn, params: Sequence[Tensor]) -> None:
        self.params = _check_params(params)
        with torch.enable_grad():
            loss = loss_fn()
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            self.loss = loss.detach()
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        # Parameters the loss ignores, or in which it is linear, have zero Hessian rows.
        self._live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grads = [grads[i] for i in self._live]

    def __call__(self, vec: Sequence[Tensor]) -> list[Tensor]:
        out = [torch.zeros_like(p) for p in self.params]
        if not self._live:
            return out
        vec = list(vec)
        hv = torch.autograd.grad(
            self._grads, self.params, grad_outputs=[vec[i] for i in self._live],
            retain_graph=True, allow_unused=True,
        )
        return [o if h is None else h.detach() for o, h in zip(out, hv)]


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def hessian_vector_product(
    loss_fn: LossFn, params: Sequence[Tensor], vec: Tensor | Sequence[Tensor]
) -> Tensor | list[Tensor]:
    """Return ``H @ vec`` where ``H`` is the Hessian of ``loss_fn()`` w.r.t. ``params``.

    ``vec`` is either a flat tensor of length ``sum(p.numel())`` (the result is then flat too) or
    a list of tensors shaped like ``params`` (the result is then such a list). Exact (Pearlmutter's
    double-backward trick), no finite differences.
    """
    params = _check_params(params)
    flat_in = isinstance(vec, Tensor)
    n = sum(p.numel() for p in params)
    if flat_in:
        if vec.numel() != n:
            raise ValueError(f"vec has {vec.numel()} elements, params have {n}")
        parts = _split_like(vec.reshape(-1).to(params[0].dtype), params)
    else:
        parts = list(vec)
        if len(parts) != len(params) or any(v.shape != p.shape for v, p in zip(parts, params)):
            raise ValueError("vec must be a flat tensor or a list shaped like params")
    hv = _HVP(loss_fn, params)(parts)
    if flat_in:
        return torch.cat([h.reshape(-1) for h in hv])
    return hv


def top_hessian_eigenvalue(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    iters: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> float:
    """Dominant Hessian eigenvalue by power iteration on Hessian-vector products.

    Returns the Rayleigh quotient ``v^T H v`` of the converged unit vector, i.e. the eigenvalue of
    largest *magnitude*, with its sign (near a minimum that is the largest, positive one, the usual
    "sharpness"). Stops after ``iters`` products or when the estimate changes by less than
    ``tol`` relative to its magnitude. Cost: ``iters`` double-backward passes on ``loss_fn``'s
    graph.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    return _power_iteration(_HVP(loss_fn, params), iters, tol, generator)


def _power_iteration(hvp: _HVP, iters: int, tol: float, generator: torch.Generator | None) -> float:
    v = _random_like(hvp.params, "normal", generator)
    nv = _norm(v)
    v = [x / nv for x in v]
    eig: float | None = None
    for _ in range(iters):
        hv = hvp(v)
        new = float(_dot(v, hv))
        nhv = float(_norm(hv))
        if nhv == 0.0 or not math.isfinite(nhv):
            return new if math.isfinite(new) else float("nan")
        v = [h / nhv for h in hv]
        if eig is not None and abs(new - eig) <= tol * (abs(eig) + 1e-12):
            eig = new
            break
        eig = new
    return float(eig)


def hutchinson_trace(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    samples: int = 10,
    generator: torch.Generator | None = None,
) -> float:
    """Hutchinson's unbiased estimate of ``tr(H)``: the mean of ``v^T H v`` over Rademacher ``v``.

    Exact for a diagonal Hessian whatever ``samples`` is; otherwise its variance is
    ``2 * sum_{i != j} H_ij^2 / samples``. Cost: ``samples`` double-backward passes.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    return _hutchinson(_HVP(loss_fn, params), samples, generator)


def _hutchinson(hvp: _HVP, samples: int, generator: torch.Generator | None) -> float:
    total = 0.0
    for _ in range(samples):
        v = _random_like(hvp.params, "rademacher", generator)
        total += float(_dot(v, hvp(v)))
    return total / samples


def epsilon_sharpness(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    eps: float = 1e-3,
    steps: int = 10,
    method: str = "pgd",
    generator: torch.Generator | None = None,
) -> float:
    """Keskar et al. (2017) epsilon-sharpness, in percent.

    ``100 * (max_{y in C} f(x + y) - f(x)) / (1 + f(x))`` with the box
    ``C = {y : |y_i| <= eps * (|x_i| + 1)}`` in the full parameter space (Keskar's ``A = I``).

    The inner maximisation is approximate, as in the paper (which runs 10 L-BFGS-B iterations):

    * ``method="pgd"`` (default): ``steps`` iterations of projected sign-gradient ascent started at
      a uniformly random point of the box (step = a quarter of the box width); on-device, no
      scipy. Returns the best value seen, so it is a lower bound on the true maximum.
    * ``method="lbfgsb"``: scipy's L-BFGS-B with box bounds and ``maxiter=steps`` (the paper's
      solver), also from a random point of the box (at a minimum the gradient vanishes); moves the parameters to numpy on every evaluation, so only for small models.

    ``params`` are perturbed in place and always restored (also on error). Each step costs one
    forward + backward of ``loss_fn``.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if method not in ("pgd", "lbfgsb"):
        raise ValueError(f"method={method!r} is unknown; allowed: pgd, lbfgsb")
    params = _check_params(params)
    x0 = [p.detach().clone() for p in params]
    bound = [eps * (x.abs() + 1.0) for x in x0]

    def set_delta(delta: Sequence[Tensor]) -> None:
        with torch.no_grad():
            for p, x, d in zip(params, x0, delta):
                p.copy_(x + d)

    try:
        with torch.no_grad():
            f0 = float(loss_fn())
        if method == "pgd":
            best = _sharpness_pgd(loss_fn, params, bound, steps, generator, set_delta, f0)
        else:
            best = _sharpness_lbfgsb(loss_fn, params, bound, steps, generator, set_delta, f0)
    finally:
        with torch.no_grad():
            for p, x in zip(params, x0):
                p.copy_(x)
    return 100.0 * (best - f0) / (1.0 + f0)


def _sharpness_pgd(loss_fn, params, bound, steps, generator, set_delta, f0) -> float:
    # Start inside the box at a random point (uniform), then ascend with sign steps.
    delta = [
        (torch.rand(b.shape, generator=generator, dtype=b.dtype).to(b.device) * 2 - 1) * b
        for b in bound
    ]
    best = f0
    alpha = [0.5 * b for b in bound]  # a quarter of the box width 2b
    for _ in range(steps + 1):
        set_delta(delta)
        with torch.enable_grad():
            loss = loss_fn()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        best = max(best, float(loss.detach()))
        delta = [
            d if g is None else torch.maximum(torch.minimum(d + a * g.sign(), b), -b)
            for d, g, a, b in zip(delta, grads, alpha, bound)
        ]
    return best


def _sharpness_lbfgsb(loss_fn, params, bound, steps, generator, set_delta, f0) -> float:
    import numpy as np
    from scipy.optimize import minimize

    flat_bound = torch.cat([b.reshape(-1) for b in bound]).double().cpu().numpy()
    best = [f0]

    def neg(z: "np.ndarray") -> tuple[float, "np.ndarray"]:
        d = torch.from_numpy(z).to(params[0].device)
        set_delta([t.to(p.dtype) for t, p in zip(_split_like(d, params), params)])
        with torch.enable_grad():
            loss = loss_fn()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        best[0] = max(best[0], float(loss.detach()))
        g = torch.cat([
            (torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in zip(grads, params)
        ])
        return -float(loss.detach()), -g.double().cpu().numpy()

    # Random start in the box: at a minimum the gradient is 0 and L-BFGS-B would not move.
    start = (torch.rand(flat_bound.shape, generator=generator, dtype=torch.float64) * 2 - 1)
    start = start.numpy() * flat_bound
    if steps > 0:
        minimize(
            neg, start, jac=True, method="L-BFGS-B",
            bounds=list(zip(-flat_bound, flat_bound)), options={"maxiter": steps},
        )
    return best[0]
