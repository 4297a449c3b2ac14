"""Baum-Welch EM for a discrete HMM: the classic full-batch reference trainer.

Why a plain function and not a Lightning loop: one EM iteration is a closed-form M-step over
sufficient statistics of the whole data set, not a gradient step, so there is nothing for an
optimizer or a batching regime to do. Each E-step is exact (forward-backward), so the marginal
log-likelihood never decreases (up to rounding) — a property the tests check.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from shiftlab.trainers.models.chain import inference as chain
from shiftlab.trainers.models.hmm import HMMParams, hmm_unary


@dataclass
class EMHistory:
    """Per-iteration record: total log-likelihood *before* the M-step of that iteration (i.e. of
    the parameters that iteration started from), per-token value, and cumulative wall time."""

    log_likelihood: list[float] = field(default_factory=list)
    per_token: list[float] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)


def sufficient_statistics(params: HMMParams, x: Tensor, mask: Tensor, chunk_size: int = 4096,
                          dtype: torch.dtype = torch.float64) -> tuple[dict[str, Tensor], float]:
    """E-step: expected start, transition and emission counts, and the total ``log p(x)``."""
    log_start, log_trans, log_emit = params.logs(dtype)
    K, V = log_emit.shape
    stats = {"start": torch.zeros(K, dtype=dtype), "trans": torch.zeros(K, K, dtype=dtype),
             "emit": torch.zeros(K, V, dtype=dtype)}
    total = 0.0
    for lo in range(0, x.shape[0], chunk_size):
        xb, mb = x[lo:lo + chunk_size], mask[lo:lo + chunk_size]
        unary = hmm_unary(log_emit, xb, mb)
        fwd = chain.forward(unary, log_trans, log_start, mb)
        beta = chain.backward(unary, log_trans, mb)
        gamma = torch.exp(fwd.log_alpha + beta - fwd.log_z[:, None, None])
        gamma = torch.where(mb[..., None], gamma, torch.zeros_like(gamma))
        stats["start"] += gamma[:, 0].sum(0)
        stats["trans"] += chain.expected_transitions(unary, log_trans, fwd.log_alpha, beta, fwd.log_z, mb)
        onehot = torch.zeros(*xb.shape, V, dtype=dtype).scatter_(-1, xb.clamp_min(0)[..., None], 1.0)
        stats["emit"] += torch.einsum("btk,btv->kv", gamma, onehot)
        total += float(fwd.log_z.sum())
    return stats, total


def m_step(stats: dict[str, Tensor], pseudocount: float = 0.0) -> HMMParams:
    """Normalize expected counts (+ an optional Dirichlet pseudocount) into probabilities."""
    def norm(c: Tensor) -> Tensor:
        c = c + pseudocount
        s = c.sum(-1, keepdim=True)
        return torch.where(s > 0, c / s.clamp_min(1e-300), torch.full_like(c, 1.0 / c.shape[-1]))

    return HMMParams(norm(stats["start"]), norm(stats["trans"]), norm(stats["emit"]))


def baum_welch(x: Tensor, mask: Tensor, init: HMMParams, iterations: int = 50, tol: float = 0.0,
               pseudocount: float = 0.0, chunk_size: int = 4096,
               dtype: torch.dtype = torch.float64) -> tuple[HMMParams, EMHistory]:
    """Run EM from ``init``. Stops after ``iterations`` or when the per-token log-likelihood
    improves by less than ``tol``. The history includes the final parameters' value."""
    params, hist = init, EMHistory()
    n_tokens = float(mask.sum())
    t0 = time.perf_counter()
    for it in range(iterations + 1):
        stats, ll = sufficient_statistics(params, x, mask, chunk_size, dtype)
        hist.log_likelihood.append(ll)
        hist.per_token.append(ll / n_tokens)
        hist.wall_time.append(time.perf_counter() - t0)
        if it == iterations or (it > 0 and hist.per_token[-1] - hist.per_token[-2] < tol):
            break
        params = m_step(stats, pseudocount)
    return params, hist


def random_params(num_states: int, num_symbols: int, seed: int, init_scale: float = 1.0) -> HMMParams:
    """Softmax of seeded Gaussian logits: the same kind of random start as :class:`HMM`'s, so
    EM and gradient descent can be compared from identical initial parameters."""
    g = torch.Generator().manual_seed(int(seed))

    def rows(*shape: int) -> Tensor:
        return torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * init_scale, -1)

    return HMMParams(rows(num_states), rows(num_states, num_states), rows(num_states, num_symbols))
