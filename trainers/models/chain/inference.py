"""Exact inference on a linear chain in log space, batched over sequences and states.

One chain serves both models: a directed HMM (``unary = log p(x_t | z_t)``, ``trans = log A``,
``start = log pi``, so ``log Z = log p(x)``) and a linear-chain CRF (``unary`` from an encoder,
``trans``/``start``/``end`` free scores, so ``log Z`` is the log-partition function).

Shapes: ``unary`` (B, T, K), ``trans`` (K, K) with ``trans[i, j]`` scoring ``i -> j``, ``start`` and
``end`` (K,). ``mask`` (B, T) bool marks valid positions; every valid region is a prefix of
length >= 1 (``lengths_to_mask``). Padded positions never influence valid ones.

Why the "log-matmul-exp" step: ``logsumexp_i(a_i + trans_ij)`` equals
``m + c_j + log(sum_i exp(a_i - m) exp(trans_ij - c_j))`` with ``m = max_i a_i`` and
``c_j = max_i trans_ij``; the inner sum is a (B, K) x (K, K) matrix product (BLAS) instead of a
(B, K, K) broadcast, and every exponent is <= 0, so nothing overflows. The forward recursion is
causal, so variable lengths cost nothing per step: we read ``alpha`` at each sequence's last
valid position. The backward recursion is anti-causal; we right-align the sequences once (one
gather) so that it becomes causal too.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Padding value for observations and labels in (N, T) long tensors: PyTorch's cross-entropy
# ``ignore_index``, so per-position losses written for classifiers skip padding as well.
PAD = -100


class ForwardResult(NamedTuple):
    log_alpha: Tensor  # (B, T, K); entries at padded positions are unspecified
    log_z: Tensor  # (B,)


def lengths_to_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """``(B,)`` lengths -> ``(B, T)`` bool mask of valid prefixes."""
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def _check(unary: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if unary.dim() != 3:
        raise ValueError(f"unary must be (B, T, K); got shape {tuple(unary.shape)}")
    B, T, _ = unary.shape
    if mask is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=unary.device)
    else:
        lengths = mask.sum(1)
        if bool((lengths < 1).any()):
            raise ValueError("every sequence needs length >= 1 (mask has an all-False row)")
    return unary, lengths


def _safe_max(a: Tensor, dim: int) -> Tensor:
    """Max along ``dim`` (kept), clamped to the dtype's lowest finite value so that an all -inf
    row gives ``a - m = -inf`` (exp 0) instead of NaN."""
    return a.amax(dim=dim, keepdim=True).clamp_min(torch.finfo(a.dtype).min)


def log_matmul_exp(a: Tensor, exp_trans: Tensor, shifted: Tensor) -> Tensor:
    """``logsumexp_i(a[:, i] + trans[i, j]) + u[:, j]`` for ``a`` (B, K), given
    ``exp(trans - col_max)`` and ``shifted = u + col_max``. In-place adds are autograd-safe here
    (``log`` saves its input, not its output) and save two allocations per step."""
    m = _safe_max(a, dim=-1)
    return torch.log(torch.exp(a - m) @ exp_trans).add_(m).add_(shifted)


def _prep_trans(trans: Tensor) -> tuple[Tensor, Tensor]:
    col_max = _safe_max(trans, dim=0)  # (1, K)
    return torch.exp(trans - col_max), col_max


def _gather_last(values: Tensor, lengths: Tensor) -> Tensor:
    """``values[b, lengths[b] - 1]`` for (B, T, K) values."""
    idx = (lengths - 1).view(-1, 1, 1).expand(-1, 1, values.shape[-1])
    return values.gather(1, idx).squeeze(1)


def forward(unary: Tensor, trans: Tensor, start: Tensor, mask: Tensor | None = None,
            end: Tensor | None = None) -> ForwardResult:
    """Forward algorithm: ``log_alpha[b, t, k]`` = log total score of prefixes ending in ``k``."""
    unary, lengths = _check(unary, mask)
    B, T, K = unary.shape
    exp_trans, col_max = _prep_trans(trans)
    shifted = unary + col_max
    alphas = [start + unary[:, 0]]
    for t in range(1, T):
        alphas.append(log_matmul_exp(alphas[-1], exp_trans, shifted[:, t]))
    log_alpha = torch.stack(alphas, dim=1)
    last = _gather_last(log_alpha, lengths)
    if end is not None:
        last = last + end
    return ForwardResult(log_alpha, torch.logsumexp(last, dim=-1))


def log_partition(unary: Tensor, trans: Tensor, start: Tensor, mask: Tensor | None = None,
                  end: Tensor | None = None) -> Tensor:
    """``log Z`` per sequence (B,): log p(x) for an HMM, the log-partition for a CRF."""
    return forward(unary, trans, start, mask, end).log_z


def _right_align(values: Tensor, lengths: Tensor, inverse: bool = False) -> Tensor:
    """Roll each row of (B, T, ...) so its valid prefix ends at T - 1 (or undo that)."""
    B, T = values.shape[:2]
    shift = (T - lengths).view(B, 1)
    pos = torch.arange(T, device=values.device).view(1, T)
    src = (pos + (shift if inverse else -shift)) % T
    src = src.view(B, T, *([1] * (values.dim() - 2))).expand_as(values)
    return values.gather(1, src)


def backward(unary: Tensor, trans: Tensor, mask: Tensor | None = None,
             end: Tensor | None = None) -> Tensor:
    """Backward algorithm: ``log_beta[b, t, k]`` = log total score of suffixes after ``t`` given
    state ``k`` at ``t`` (``end`` at the last valid position). Padded entries are unspecified."""
    unary, lengths = _check(unary, mask)
    B, T, K = unary.shape
    aligned = _right_align(unary, lengths)
    exp_trans_t, col_max_t = _prep_trans(trans.t())
    beta = torch.zeros(B, K, dtype=unary.dtype, device=unary.device)
    if end is not None:
        beta = beta + end
    betas = [beta]
    for t in range(T - 2, -1, -1):
        betas.append(log_matmul_exp(betas[-1] + aligned[:, t + 1], exp_trans_t, col_max_t))
    log_beta = torch.stack(betas[::-1], dim=1)
    return _right_align(log_beta, lengths, inverse=True)


def posterior_marginals(unary: Tensor, trans: Tensor, start: Tensor, mask: Tensor | None = None,
                        end: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Log node marginals ``log p(z_t = k | x)`` (B, T, K) and ``log Z`` (B,).

    Padded positions get a uniform row so downstream code never sees NaN."""
    fwd = forward(unary, trans, start, mask, end)
    log_beta = backward(unary, trans, mask, end)
    log_m = fwd.log_alpha + log_beta - fwd.log_z[:, None, None]
    log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)  # remove rounding drift
    if mask is not None:
        uniform = torch.full_like(log_m, -float(torch.log(torch.tensor(float(unary.shape[-1])))))
        log_m = torch.where(mask[..., None], log_m, uniform)
    return log_m, fwd.log_z


def expected_transitions(unary: Tensor, trans: Tensor, log_alpha: Tensor, log_beta: Tensor,
                         log_z: Tensor, mask: Tensor | None = None) -> Tensor:
    """Expected transition counts ``sum_{b,t} p(z_{t-1}=i, z_t=j | x_b)`` as a (K, K) tensor.

    Computed as one batched matrix product over positions (the sum over the batch is the inner
    dimension), with max-shifts so all exponents stay bounded."""
    B, T, K = unary.shape
    if T < 2:
        return torch.zeros(K, K, dtype=unary.dtype, device=unary.device)
    a = log_alpha[:, :-1]  # (B, T-1, K)
    q = unary[:, 1:] + log_beta[:, 1:]
    ma, mq = _safe_max(a, -1), _safe_max(q, -1)
    w = ma + mq - log_z[:, None, None]  # (B, T-1, 1)
    p = torch.exp(a - ma + w)
    qq = torch.exp(q - mq)
    if mask is not None:
        p = torch.where(mask[:, 1:, None], p, torch.zeros_like(p))
        qq = torch.where(mask[:, 1:, None], qq, torch.zeros_like(qq))
    outer = torch.einsum("bti,btj->ij", p, qq)
    return outer * torch.exp(trans)


def sequence_score(unary: Tensor, trans: Tensor, start: Tensor, tags: Tensor,
                   mask: Tensor | None = None, end: Tensor | None = None) -> Tensor:
    """Unnormalized log score of the given tag sequences (B,): the CRF numerator, or
    ``log p(x, z)`` for an HMM. Tags at padded positions are ignored (may be ``PAD``)."""
    unary, lengths = _check(unary, mask)
    B, T, K = unary.shape
    valid = lengths_to_mask(lengths, T)
    z = torch.where(valid, tags, torch.zeros_like(tags))
    s = unary.gather(2, z[..., None]).squeeze(-1)
    s = torch.where(valid, s, torch.zeros_like(s)).sum(1) + start[z[:, 0]]
    if T > 1:
        pair = trans[z[:, :-1], z[:, 1:]]
        s = s + torch.where(valid[:, 1:], pair, torch.zeros_like(pair)).sum(1)
    if end is not None:
        s = s + end[z.gather(1, (lengths - 1)[:, None]).squeeze(1)]
    return s


def viterbi(unary: Tensor, trans: Tensor, start: Tensor, mask: Tensor | None = None,
            end: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Most probable state sequence (B, T) (``PAD`` at padded positions) and its score (B,)."""
    unary, lengths = _check(unary, mask)
    B, T, K = unary.shape
    delta = start + unary[:, 0]
    deltas, pointers = [delta], []
    for t in range(1, T):
        best, arg = (deltas[-1][:, :, None] + trans).max(dim=1)
        pointers.append(arg)
        deltas.append(best + unary[:, t])
    last = _gather_last(torch.stack(deltas, 1), lengths)
    if end is not None:
        last = last + end
    score, state = last.max(dim=-1)
    path = torch.full((B, T), PAD, dtype=torch.long, device=unary.device)
    cur = state
    for t in range(T - 1, -1, -1):
        cur = torch.where(lengths - 1 == t, state, cur)
        inside = t < lengths
        path[:, t] = torch.where(inside, cur, path[:, t])
        if t > 0:
            prev = pointers[t - 1].gather(1, cur[:, None]).squeeze(1)
            cur = torch.where(inside, prev, cur)
    return path, score
