"""Supervised sequence labellers over symbol sequences: a linear-chain CRF on top of a small
neural encoder, and the per-position softmax baseline with the *same* encoder.

Why the same encoder: the comparison "how much does the chain structure buy" is only fair when
the two models differ in nothing but the transition potentials and the global normalization.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from shiftlab.trainers.models import default_norm, make_activation
from shiftlab.trainers.models.chain import inference as chain


class SequenceEncoder(nn.Module):
    """Embedding -> [Conv1d -> norm -> activation] x layers -> per-position linear scores.

    The receptive field is ``layers * (kernel_size - 1) + 1`` symbols: small on purpose, so the
    CRF's transitions have long-range context to add. Padding (``chain.PAD``) maps to a zero
    embedding. ``norm`` is a spine norm factory (called with ``dims=1``).
    """

    def __init__(self, num_symbols: int, num_tags: int, embed_dim: int = 32, hidden: int = 64,
                 layers: int = 1, kernel_size: int = 3, activation: str = "relu",
                 norm: Callable[[int, int], nn.Module] = default_norm, dropout: float = 0.0) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"model.kernel_size={kernel_size} must be odd and >= 1")
        self.num_symbols = int(num_symbols)
        self.embed = nn.Embedding(num_symbols + 1, embed_dim, padding_idx=num_symbols)
        blocks: list[nn.Module] = []
        width = embed_dim
        for _ in range(int(layers)):
            blocks += [nn.Conv1d(width, hidden, kernel_size, padding=kernel_size // 2), norm(hidden, 1),
                       make_activation(activation)]
            if dropout > 0:
                blocks.append(nn.Dropout(dropout))
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_tags)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T) symbols -> (B, T, K) scores."""
        idx = torch.where(x >= 0, x, torch.full_like(x, self.num_symbols))
        h = self.embed(idx).transpose(1, 2)  # (B, E, T)
        h = self.body(h).transpose(1, 2)
        return self.head(h)


class _Tagger(nn.Module):
    supervised = True
    task = "sequence"  # trained by module=sequence (the per-token NLL), refused by module=classification

    def __init__(self, num_symbols: int, input_shape: Sequence[int] | None = None,
                 num_classes: int | None = None, num_tags: int | None = None,
                 norm: Callable[[int, int], nn.Module] = default_norm, **encoder_kw) -> None:
        super().__init__()
        K = int(num_tags or num_classes or 0)
        if K < 1:
            raise ValueError(f"model.num_tags={K} must be >= 1 (or come from the data's num_classes)")
        self.num_states = K
        self.encoder = SequenceEncoder(num_symbols, K, norm=norm, **encoder_kw)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Log posterior marginals as (B, K, T) (PyTorch's (N, C, d) classifier layout)."""
        return self.log_marginals(x, x >= 0 if mask is None else mask).transpose(1, 2)


class LinearChainCRF(_Tagger):
    """``p(y | x) = exp(score(x, y)) / Z(x)`` with ``score = start[y_1] + sum_t e_t(y_t) +
    sum_t trans[y_{t-1}, y_t] + end[y_T]``; ``e`` from the encoder. Exact marginals by
    forward-backward, decoding by Viterbi. Extra kwargs configure :class:`SequenceEncoder`."""

    def __init__(self, num_symbols: int, **kw) -> None:
        super().__init__(num_symbols, **kw)
        K = self.num_states
        self.trans = nn.Parameter(torch.zeros(K, K))
        self.start = nn.Parameter(torch.zeros(K))
        self.end = nn.Parameter(torch.zeros(K))

    def unary(self, x: Tensor, mask: Tensor | None) -> Tensor:
        u = self.encoder(x)
        return u if mask is None else u.masked_fill(~mask[..., None], 0.0)

    def log_likelihood(self, x: Tensor, mask: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """Conditional ``log p(y | x)`` per sequence (B,)."""
        u = self.unary(x, mask)
        log_z = chain.log_partition(u, self.trans, self.start, mask, self.end)
        return chain.sequence_score(u, self.trans, self.start, y, mask, self.end) - log_z

    def loss(self, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        """Negative conditional log-likelihood per token."""
        return -self.log_likelihood(x, mask, y).sum() / mask.sum()

    def log_marginals(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return chain.posterior_marginals(self.unary(x, mask), self.trans, self.start, mask, self.end)[0]

    def decode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return chain.viterbi(self.unary(x, mask), self.trans, self.start, mask, self.end)[0]


class PositionSoftmax(_Tagger):
    """Baseline: independent softmax per position over the same encoder's scores."""

    def log_marginals(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return torch.log_softmax(self.encoder(x), dim=-1)

    def log_likelihood(self, x: Tensor, mask: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        lp = self.log_marginals(x, mask)
        valid = y >= 0 if mask is None else mask
        tok = lp.gather(-1, y.clamp_min(0)[..., None]).squeeze(-1)
        return torch.where(valid, tok, torch.zeros_like(tok)).sum(1)

    def loss(self, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        scores = self.encoder(x)
        target = torch.where(mask, y, torch.full_like(y, -100))
        return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), target.reshape(-1), ignore_index=-100)

    def decode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        pred = self.encoder(x).argmax(-1)
        return pred if mask is None else pred.masked_fill(~mask, chain.PAD)
