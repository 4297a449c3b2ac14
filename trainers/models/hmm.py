"""Discrete hidden Markov model: true parameters (for sampling and ceilings) and a trainable
model whose parameters are logits, fitted by gradient descent on the marginal log-likelihood."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from shiftlab.trainers.models.chain import inference as chain


@dataclass
class HMMParams:
    """Probabilities of a discrete HMM: ``start`` (K,), ``trans`` (K, K) rows ``i -> j``,
    ``emit`` (K, V). Kept in float64 so the Bayes ceiling is not limited by rounding."""

    start: Tensor
    trans: Tensor
    emit: Tensor

    @property
    def num_states(self) -> int:
        return self.start.shape[0]

    @property
    def num_symbols(self) -> int:
        return self.emit.shape[1]

    def logs(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(torch.log(p.to(dtype)) for p in (self.start, self.trans, self.emit))

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("start", "trans", "emit")}

    def permuted(self, perm: Sequence[int]) -> "HMMParams":
        """Relabel states: new state ``s`` is old state ``perm[s]``."""
        p = torch.as_tensor(perm)
        return HMMParams(self.start[p], self.trans[p][:, p], self.emit[p])

    def sample(self, n: int, max_len: int, min_len: int | None = None, seed: int = 0
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``n`` sequences: ``x``, ``z`` (n, max_len) long with ``chain.PAD`` after each
        length, and ``lengths`` (n,) uniform in ``[min_len, max_len]``."""
        min_len = max_len if min_len is None else min_len
        if not 1 <= min_len <= max_len:
            raise ValueError(f"data.min_length={min_len} must be in [1, length={max_len}]")
        g = torch.Generator().manual_seed(int(seed))
        lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
        z = torch.empty(n, max_len, dtype=torch.long)
        z[:, 0] = torch.multinomial(self.start.expand(n, -1), 1, generator=g).squeeze(1)
        for t in range(1, max_len):
            z[:, t] = torch.multinomial(self.trans[z[:, t - 1]], 1, generator=g).squeeze(1)
        x = torch.multinomial(self.emit[z.reshape(-1)], 1, generator=g).view(n, max_len)
        mask = chain.lengths_to_mask(lengths, max_len)
        return x.masked_fill(~mask, chain.PAD), z.masked_fill(~mask, chain.PAD), lengths


def make_hmm(num_states: int, num_symbols: int, stickiness: float = 0.7,
             emission_noise: float = 0.3, seed: int = 0) -> HMMParams:
    """A random HMM whose difficulty is set by two knobs.

    ``stickiness`` in [0, 1): weight of the identity in each transition row (the rest is a
    Dirichlet(1) row), so states persist and context helps. ``emission_noise`` in [0, 1]: each
    state emits from its own block of symbols (``V // K`` of them, wrapping when ``V < K``)
    mixed with a Dirichlet(1) row with this weight; 0 makes states nearly identifiable from one
    symbol, 1 leaves only the chain structure."""
    if not 0.0 <= stickiness < 1.0:
        raise ValueError(f"data.stickiness={stickiness} is out of range; allowed: 0 <= stickiness < 1")
    if not 0.0 <= emission_noise <= 1.0:
        raise ValueError(f"data.emission_noise={emission_noise} is out of range; allowed: 0 <= emission_noise <= 1")
    if num_states < 1 or num_symbols < 1:
        raise ValueError(f"data.num_states={num_states}, data.num_symbols={num_symbols}: both must be >= 1")
    rng = np.random.default_rng(seed)
    K, V = num_states, num_symbols
    start = rng.dirichlet(np.ones(K))
    trans = stickiness * np.eye(K) + (1 - stickiness) * rng.dirichlet(np.ones(K), size=K)
    block = max(1, V // K)
    clean = np.zeros((K, V))
    for k in range(K):
        lo = (k * block) % V
        clean[k, [(lo + i) % V for i in range(block)]] = 1.0 / block
    emit = (1 - emission_noise) * clean + emission_noise * rng.dirichlet(np.ones(V), size=K)
    as_t = lambda a: torch.tensor(a / a.sum(-1, keepdims=True), dtype=torch.float64)  # noqa: E731
    return HMMParams(as_t(start), as_t(trans), as_t(emit))


def hmm_unary(log_emit: Tensor, x: Tensor, mask: Tensor | None) -> Tensor:
    """``log p(x_t | z_t = k)`` as (B, T, K); 0 at padded positions."""
    xc = x.clamp_min(0)
    unary = log_emit.t()[xc]  # (B, T, K)
    if mask is not None:
        unary = unary.masked_fill(~mask[..., None], 0.0)
    return unary


class HMM(nn.Module):
    """Trainable discrete HMM with logit parameters (softmax keeps them valid distributions).

    Args:
        num_states: K (defaults to the data module's ``num_classes``).
        num_symbols: V (``${data.num_symbols}`` in the config).
        init_scale: std of the random initial logits (random starts differ by the seed).
        input_shape / num_classes / norm: accepted for the spine's model-building signature.
    """

    supervised = False
    task = "sequence"  # trained by module=sequence (the per-token NLL), refused by module=classification

    def __init__(self, num_symbols: int, num_states: int | None = None, init_scale: float = 1.0,
                 input_shape: Sequence[int] | None = None, num_classes: int | None = None,
                 norm: Callable | None = None) -> None:
        super().__init__()
        K = int(num_states or num_classes or 0)
        if K < 1 or num_symbols < 1:
            raise ValueError(f"model.num_states={K} and model.num_symbols={num_symbols} must be >= 1")
        self.num_states, self.num_symbols = K, int(num_symbols)
        self.start_logits = nn.Parameter(torch.randn(K) * init_scale)
        self.trans_logits = nn.Parameter(torch.randn(K, K) * init_scale)
        self.emit_logits = nn.Parameter(torch.randn(K, num_symbols) * init_scale)

    @classmethod
    def from_params(cls, params: HMMParams) -> "HMM":
        m = cls(params.num_symbols, params.num_states)
        m.load_params(params)
        return m

    @torch.no_grad()
    def load_params(self, params: HMMParams) -> None:
        for logits, p in zip((self.start_logits, self.trans_logits, self.emit_logits), params.logs()):
            logits.copy_(p.clamp_min(-1e4).to(logits.dtype))

    def log_params(self) -> tuple[Tensor, Tensor, Tensor]:
        return (torch.log_softmax(self.start_logits, -1), torch.log_softmax(self.trans_logits, -1),
                torch.log_softmax(self.emit_logits, -1))

    def params(self) -> HMMParams:
        return HMMParams(*(p.detach().double().exp() for p in self.log_params()))

    def _chain(self, x: Tensor, mask: Tensor | None):
        log_start, log_trans, log_emit = self.log_params()
        return hmm_unary(log_emit, x, mask), log_trans, log_start

    def log_likelihood(self, x: Tensor, mask: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """``log p(x)`` per sequence (B,); ``y`` is ignored (unsupervised)."""
        unary, log_trans, log_start = self._chain(x, mask)
        return chain.log_partition(unary, log_trans, log_start, mask)

    def loss(self, x: Tensor, y: Tensor | None, mask: Tensor) -> Tensor:
        """Negative marginal log-likelihood per token."""
        return -self.log_likelihood(x, mask).sum() / mask.sum()

    def log_marginals(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        unary, log_trans, log_start = self._chain(x, mask)
        return chain.posterior_marginals(unary, log_trans, log_start, mask)[0]

    def decode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        unary, log_trans, log_start = self._chain(x, mask)
        return chain.viterbi(unary, log_trans, log_start, mask)[0]

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Log posterior marginals as (B, K, T): PyTorch's (N, C, d) layout, so classifier code
        (``F.cross_entropy(out, y)`` with ``PAD`` = ignore_index) works on it unchanged."""
        return self.log_marginals(x, x >= 0 if mask is None else mask).transpose(1, 2)


def true_model_scores(params: HMMParams, x: Tensor, mask: Tensor, y: Tensor | None = None
                      ) -> dict[str, Tensor]:
    """Everything the true model says about a data set (float64): ``log_px`` (B,), log posterior
    marginals (B, T, K), the Viterbi path and, given ``y``, ``log p(y | x)`` (B,)."""
    log_start, log_trans, log_emit = params.logs()
    unary = hmm_unary(log_emit, x, mask)
    log_m, log_px = chain.posterior_marginals(unary, log_trans, log_start, mask)
    out = {"log_px": log_px, "log_marginals": log_m,
           "viterbi": chain.viterbi(unary, log_trans, log_start, mask)[0]}
    if y is not None:
        out["log_py_given_x"] = chain.sequence_score(unary, log_trans, log_start, y, mask) - log_px
    return out
