"""Per-example gradient quantities from each layer's inputs and output gradients, without forming the
``N x P`` per-example gradients: the fast path behind :func:`shiftlab.callbacks.gradient_stats.batch_moments`,
and the exact Gauss-Newton trace :func:`ggn_trace`.

Why it exists: a cost target. The gradient tests need only moments of the per-example gradients (norms,
dot products with the mean, sums of squares); ``vmap`` over ``grad`` materialises all of them (23k
numbers per example on the issue's MLP) and cost several times Cockpit's norm test, and Hutchinson's
trace to a 5% standard error cost tens of Hessian-vector products where BackPACK's exact diagonal cost
about one backward pass. For ``nn.Linear`` on 2-d inputs the per-example weight gradient is the outer
product ``d_n a_n^T`` of the layer's output gradient ``d_n`` and input ``a_n`` (BackPACK's trick), so

* ``|g_n|^2 = |a_n|^2 |d_n|^2`` (bias: ``|d_n|^2``), ``<g_n, v> = d_n^T V a_n``,
* ``sum_n g_n^2 = (d^2)^T (a^2)`` elementwise,

all from one forward and one backward pass. Eval-mode BatchNorm (a per-feature affine map) has
per-example gradients ``d_n * xhat_n`` and ``d_n``, formed directly (they are ``N x C``); so have
``Conv1d`` / ``Conv2d`` (``groups=1``, numeric padding) from their unfolded input patches, and Linear
layers on inputs with a sequence dimension (``einsum``): small next to a ``vmap`` over the network.

When it is used: :func:`fast_path_reason` returns None, i.e. every trainable parameter is the weight or
bias of an ``nn.Linear``, a supported convolution or an eval-mode BatchNorm layer with running statistics, no BatchNorm
layer uses batch statistics (train mode: its output couples the examples, so per-example gradients are
not defined), and at run time no such layer is called twice. Otherwise callers fall back to the
``torch.func`` path, which stays the reference and the general method. Both paths assume what
per-example gradients mean: each output row depends only on its own input row.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["NotApplicable", "fast_path_reason", "layer_moments", "layer_moments_and_gradients", "layer_gradients",
           "ggn_trace", "ggn_is_hessian_trace", "GGNTrace", "ggn_diagonal", "GGNDiagonal", "ggn_static_reason"]

Loss = Callable[[Tensor, Tensor], Tensor]
BN_EVAL = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONV = (nn.Conv1d, nn.Conv2d)
SUPPORTED = (nn.Linear, *CONV, *BN_EVAL)
# Leaves through which the diagonal of the Hessian equals that of the Gauss-Newton matrix: every
# parameter enters the output linearly and the activations are piecewise linear (zero second derivative).
PIECEWISE_LINEAR = (*SUPPORTED, nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Flatten,
                    nn.Unflatten, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


def _owners(model: nn.Module) -> tuple[list[tuple[str, nn.Module, str]], str | None]:
    """``[(name, module, 'weight'|'bias')]`` for the trainable parameters in ``named_parameters`` order,
    or a reason the fast path does not apply."""
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None):
            return [], f"{name or 'model'}: BatchNorm with batch statistics couples the examples"
    modules = dict(model.named_modules())
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix, _, leaf = name.rpartition(".")
        m = modules.get(prefix)
        if not isinstance(m, SUPPORTED) or leaf not in ("weight", "bias"):
            return [], (f"parameter {name} is not the weight or bias of a Linear, Conv1d/2d or eval-mode "
                        "BatchNorm layer")
        if isinstance(m, CONV) and (m.groups != 1 or m.padding_mode != "zeros" or m.padding == "same"):
            return [], f"{prefix}: only convolutions with groups=1 and numeric zero padding are supported"
        out.append((name, m, leaf))
    if not out:
        return [], "model has no trainable parameters"
    return out, None


def fast_path_reason(model: nn.Module) -> str | None:
    """None when :func:`layer_moments` applies to ``model`` as it is now, else why not."""
    return _owners(model)[1]


@dataclass
class _Record:
    inputs: Tensor
    output: Tensor
    calls: int = 0
    versions: tuple[int, int] = (0, 0)  # of input and output when recorded (an in-place change shows)

    def changed(self) -> bool:
        return (self.inputs._version, self.output._version) != self.versions


@contextlib.contextmanager
def _capture(model: nn.Module, modules: list[nn.Module]) -> Iterator[dict[nn.Module, _Record]]:
    """Record the input (detached) and output (in the graph) of each module during a forward pass."""
    rec: dict[nn.Module, _Record] = {}

    def hook(m: nn.Module, inputs: tuple, output: Tensor) -> None:
        r = rec.get(m)
        rec[m] = _Record(inputs[0].detach(), output, (r.calls if r else 0) + 1,
                         (inputs[0]._version, output._version))

    handles = [m.register_forward_hook(hook) for m in dict.fromkeys(modules)]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def _forward(model: nn.Module, x: Tensor, owners) -> tuple[Tensor, dict[nn.Module, _Record]]:
    with _capture(model, [m for _, m, _ in owners]) as rec, torch.enable_grad():
        out = model(x)
    twice = [type(m).__name__ for m, r in rec.items() if r.calls > 1]
    if twice:
        raise NotApplicable(f"a layer is called more than once ({', '.join(twice)})")
    if any(r.changed() for r in rec.values()):  # e.g. ReLU(inplace=True) after a Linear
        raise NotApplicable("a layer's input or output is modified in place later in the forward pass")
    return out, rec


class NotApplicable(RuntimeError):
    """Raised when a run-time check rules the fast path out (callers fall back)."""


def _xhat(m: nn.Module, a: Tensor) -> Tensor:
    shape = (1, -1) + (1,) * (a.dim() - 2)
    return (a - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)


def _unfold(m: nn.Module, a: Tensor) -> Tensor:
    """The convolution's input patches ``(N, C_in * prod(kernel), positions)`` (``F.unfold``), in the
    weight's ``(C_in, *kernel)`` order; a 1-d convolution is unfolded as a 2-d one of width 1."""
    pad = (0,) * len(m.kernel_size) if m.padding == "valid" else m.padding
    if isinstance(m, nn.Conv1d):
        return F.unfold(a.unsqueeze(-1), (m.kernel_size[0], 1), dilation=(m.dilation[0], 1),
                        padding=(pad[0], 0), stride=(m.stride[0], 1))
    return F.unfold(a, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride)


def _dense(m: nn.Module, leaf: str, a: Tensor, d: Tensor) -> Tensor | None:
    """Per-example gradients ``(..., N, k)`` of one parameter from input ``a`` (N, ...) and output gradients
    ``d`` (..., N, ...), or None for a 2-d Linear weight (kept as factors). Leading dims of ``d`` batch it."""
    lead = d.dim() - a.dim()
    if isinstance(m, nn.Linear):
        if leaf == "bias":
            return d.reshape(*d.shape[: lead + 1], -1, d.shape[-1]).sum(-2)
        if a.dim() == 2:
            return None
        pe = torch.einsum("...nto,nti->...noi", d.flatten(lead + 1, -2), a.flatten(1, -2))
        return pe.flatten(-2)
    red = tuple(range(lead + 2, d.dim()))  # positions of each channel
    if isinstance(m, CONV):
        if leaf == "bias":
            return d.sum(red)
        return torch.einsum("...nol,nkl->...nok", d.flatten(lead + 2), _unfold(m, a)).flatten(-2)
    g = d * _xhat(m, a) if leaf == "weight" else d
    return g.sum(red) if red else g


def _loss_output_grads(model: nn.Module, x: Tensor, y: Tensor, loss: Loss):
    """One forward and one backward pass: the owners, the layers' records, the gradients of the summed
    per-example losses at each layer's output (``d_n`` of every example at once: examples do not
    interact) and the per-example losses."""
    owners, why = _owners(model)
    if why:
        raise ValueError(why)
    out, rec = _forward(model, x, owners)
    losses = vmap(lambda o, t: loss(o.unsqueeze(0), t.unsqueeze(0)))(out, y)
    mods = list(dict.fromkeys(m for _, m, _ in owners))
    outs = torch.autograd.grad(losses.sum(), [rec[m].output for m in mods], allow_unused=True)
    dgrad = {m: (torch.zeros_like(rec[m].output) if g is None else g.detach()) for m, g in zip(mods, outs)}
    return owners, rec, dgrad, losses.detach()


def layer_moments(model: nn.Module, x: Tensor, y: Tensor, loss: Loss = F.cross_entropy):
    """``(GradientMoments, losses)`` of the per-example gradients of ``loss`` (applied to one example at a
    time, as in :func:`~shiftlab.callbacks.gradient_stats.per_example_gradients`) from one forward and one
    backward pass. Raises ValueError when :func:`fast_path_reason` is not None."""
    m, _, losses = _moments(model, x, y, loss, False)
    return m, losses


def layer_moments_and_gradients(model: nn.Module, x: Tensor, y: Tensor, loss: Loss = F.cross_entropy):
    """``(GradientMoments, G, losses)``: the moments from the factors as :func:`layer_moments` and ``G`` as
    :func:`layer_gradients`, from the same forward and backward pass. Why: the histograms need ``G``;
    moments from ``G`` cost three passes over it, from the factors almost nothing, and each layer's block
    is written straight into ``G`` (no concatenation copy)."""
    return _moments(model, x, y, loss, True)


def _moments(model: nn.Module, x: Tensor, y: Tensor, loss: Loss, with_g: bool):
    from shiftlab.callbacks.gradient_stats import GradientMoments

    owners, rec, dgrad, losses = _loss_output_grads(model, x, y, loss)
    n = x.shape[0]
    P = sum(getattr(m, leaf).numel() for _, m, leaf in owners)
    ref = dgrad[owners[0][1]]
    G = torch.empty(n, P, dtype=ref.dtype, device=ref.device) if with_g else None
    means, coords, sq, blocks, col = [], [], 0.0, [], 0
    for _, m, leaf in owners:
        a, d = rec[m].inputs, dgrad[m]
        pe = _dense(m, leaf, a, d)
        k = getattr(m, leaf).numel()
        if pe is None:  # Linear weight on (N, in): per-example gradient d_n a_n^T
            mean = d.T @ a / n
            sq = sq + d.square().sum(1) * a.square().sum(1)
            coords.append((d.square().T @ a.square()).reshape(-1) / n)
            blocks.append(((d @ mean) * a).sum(1))
            if G is not None:
                torch.mul(d.unsqueeze(2), a.unsqueeze(1), out=G[:, col:col + k].view(n, d.shape[1], a.shape[1]))
        else:
            mean = pe.mean(0)
            sq = sq + pe.square().sum(1)
            coords.append(pe.square().mean(0))
            blocks.append(pe @ mean)
            if G is not None:
                G[:, col:col + k] = pe
        means.append(mean.reshape(-1))
        col += k
    grad = torch.cat(means)
    return (GradientMoments(n, grad.numel(), grad.double(), torch.as_tensor(sq).double(),
                            torch.stack(blocks).sum(0).double(), torch.cat(coords).double()), G, losses)


def layer_gradients(model: nn.Module, x: Tensor, y: Tensor, loss: Loss = F.cross_entropy) -> tuple[Tensor, Tensor]:
    """``(G, losses)`` as :func:`~shiftlab.callbacks.gradient_stats.per_example_gradients` returns them, built
    from the layer factors (``einsum``) for callers that need the per-example gradients themselves."""
    owners, rec, dgrad, losses = _loss_output_grads(model, x, y, loss)
    cols = []
    for _, m, leaf in owners:
        a, d = rec[m].inputs, dgrad[m]
        pe = _dense(m, leaf, a, d)
        cols.append(torch.einsum("no,ni->noi", d, a).flatten(1) if pe is None else pe)
    return torch.cat(cols, 1), losses


@dataclass
class GGNTrace:
    """``tr(GGN)`` of the mean cross-entropy and whether it equals ``tr(Hessian)`` for that model."""

    trace: float
    equals_hessian_trace: bool
    reason: str | None  # why not, when it does not


def ggn_is_hessian_trace(model: nn.Module, x: Tensor) -> str | None:
    """None when ``tr(GGN) = tr(H)`` for ``model`` on ``x`` (checked by one forward pass), else why not.

    Exact when the network is a chain of leaf modules (each leaf's input is the previous leaf's output
    tensor, the model's output the last one's: no tensor operation outside the leaves), every leaf is
    piecewise linear (``PIECEWISE_LINEAR``), and :func:`fast_path_reason` holds. Then every parameter enters
    the logits linearly and the activations have zero second derivative, so the diagonal of the residual
    term ``sum_c dL/df_c * d^2 f_c / dtheta^2`` vanishes: the Hessian's diagonal is the GGN's (its
    off-diagonal blocks are not)."""
    why = _static_reason(model)
    if why:
        return why
    with _chain(model, x) as verdict, torch.no_grad():
        verdict["out"] = model(x)
    return verdict["reason"]


def ggn_static_reason(model: nn.Module) -> str | None:
    """The part of :func:`ggn_is_hessian_trace` that needs no forward pass (layers and activations)."""
    return _static_reason(model)


def _static_reason(model: nn.Module) -> str | None:
    why = fast_path_reason(model)
    if why:
        return why
    bad = sorted({type(m).__name__ for m in _leaves(model) if not isinstance(m, PIECEWISE_LINEAR)})
    return f"not piecewise linear: {', '.join(bad)}" if bad else None


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


@contextlib.contextmanager
def _chain(model: nn.Module, x: Tensor) -> Iterator[dict]:
    """Watch one forward pass: on exit ``verdict["reason"]`` is None when each leaf's input was the previous
    leaf's output (the first's ``x``) and the output put in ``verdict["out"]`` is the last leaf's."""
    state: dict = {"last": x, "ok": True, "out": None, "reason": None}

    def hook(m: nn.Module, inputs: tuple, output: Tensor) -> None:
        state["ok"] = state["ok"] and inputs[0] is state["last"]
        state["last"] = output

    handles = [m.register_forward_hook(hook) for m in _leaves(model)]
    try:
        yield state
    finally:
        for h in handles:
            h.remove()
    if not (state["ok"] and state["out"] is state["last"]):
        state["reason"] = "the forward pass is not a chain of its leaf modules (operations outside them)"


def _ggn_backward(model: nn.Module, x: Tensor):
    """One forward pass (chain check on it) and one ``C``-fold batched backward pass of the columns
    ``s_nc = sqrt(p_nc) (e_c - p_n)`` of the softmax cross-entropy's output Hessian to every layer output:
    ``(owners, records, {module: (C, N, ...) gradients}, N, reason)``, ``reason`` None when the GGN's
    diagonal is the Hessian's (:func:`ggn_is_hessian_trace`)."""
    owners, why = _owners(model)
    if why:
        raise ValueError(why)
    reason = _static_reason(model)
    with _chain(model, x) as verdict:  # the chain is checked on the same forward pass
        out, rec = _forward(model, x, owners)
        verdict["out"] = out
    reason = reason or verdict["reason"]
    if out.dim() != 2:
        raise ValueError(f"the GGN needs logits of shape (N, C), got {tuple(out.shape)}")
    n, c = out.shape
    p = torch.softmax(out.detach(), 1)
    eye = torch.eye(c, dtype=p.dtype, device=p.device)
    s = p.sqrt().T.unsqueeze(2) * (eye.unsqueeze(1) - p.unsqueeze(0))  # (C, N, C): s[c, n] = s_nc
    mods = list(dict.fromkeys(m for _, m, _ in owners))
    outs = torch.autograd.grad(out, [rec[m].output for m in mods], grad_outputs=s, is_grads_batched=True,
                               allow_unused=True)
    return owners, rec, dict(zip(mods, outs)), n, reason


def ggn_trace(model: nn.Module, x: Tensor, y: Tensor) -> GGNTrace:
    """Exact trace of the generalized Gauss-Newton matrix of ``cross_entropy(model(x), y)`` (mean):
    ``tr G = (1/N) sum_n sum_c |J_n^T s_nc|^2`` with ``S_n S_n^T = diag(p_n) - p_n p_n^T``,
    ``s_nc = sqrt(p_nc) (e_c - p_n)``. The ``C`` columns are backpropagated to the layer outputs in one
    batched backward pass (``is_grads_batched``); per Linear layer the trace is then
    ``sum_n |a_n|^2 sum_c |d_nc|^2`` (bias ``sum |d_nc|^2``), as BackPACK's exact diagonal GGN.

    Cost: one forward and one ``C``-fold batched backward pass, against one double-backward pass per
    Hutchinson probe. Equals the Hessian trace when :func:`ggn_is_hessian_trace` says so (e.g. ReLU MLPs,
    with or without eval-mode BatchNorm); otherwise it is the GGN's trace (tanh nets: a positive
    semi-definite approximation). Raises ValueError where :func:`fast_path_reason` is not None."""
    owners, rec, grads, n, reason = _ggn_backward(model, x)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for _, m, leaf in owners:
        if grads[m] is None:  # a layer the logits do not depend on
            continue
        a, d = rec[m].inputs, grads[m].detach()
        pe = _dense(m, leaf, a, d)
        if pe is None:
            total += (a.square().sum(1) * d.square().sum(2)).sum().double()
        else:
            total += pe.square().sum().double()
    return GGNTrace(float(total) / n, reason is None, reason)


@dataclass
class GGNDiagonal:
    """``diag(GGN)`` of the mean cross-entropy (flat, trainable parameters in ``named_parameters`` order)
    and whether it equals ``diag(Hessian)`` for that model."""

    diag: Tensor
    equals_hessian_diagonal: bool
    reason: str | None  # why not, when it does not


def ggn_diagonal(model: nn.Module, x: Tensor, y: Tensor) -> GGNDiagonal:
    """Exact diagonal of the generalized Gauss-Newton matrix of ``cross_entropy(model(x), y)`` (mean), from
    the same batched backward pass as :func:`ggn_trace` (BackPACK's ``DiagGGNExact``): for a Linear weight
    ``diag_ij = (1/N) sum_n (sum_c d_nci^2) a_nj^2``, for the other parameters ``(1/N) sum_nc`` of the
    squared per-example, per-column gradients. Equal to the Hessian's diagonal where
    ``equals_hessian_diagonal`` (same condition as :func:`ggn_is_hessian_trace`: then it replaces one
    Hessian-vector product per parameter, or Hutchinson's noisy estimate)."""
    owners, rec, grads, n, reason = _ggn_backward(model, x)
    parts = []
    for name, m, leaf in owners:
        p = getattr(m, leaf)
        if grads[m] is None:
            parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
            continue
        a, d = rec[m].inputs, grads[m].detach()
        pe = _dense(m, leaf, a, d)
        if pe is None:
            parts.append((d.square().sum(0).T @ a.square()).reshape(-1) / n)
        else:
            parts.append(pe.square().sum((0, 1)).reshape(-1) / n)
    return GGNDiagonal(torch.cat(parts), reason is None, reason)
