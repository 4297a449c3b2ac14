"""Chain inference against brute-force enumeration of every state sequence (T <= 5, K <= 3)."""
from __future__ import annotations

import itertools

import pytest
import torch

from shiftlab.trainers.models.chain import inference as chain


def _problem(B: int, T: int, K: int, seed: int, with_end: bool):
    g = torch.Generator().manual_seed(seed)
    unary = torch.randn(B, T, K, generator=g, dtype=torch.float64) * 2
    trans = torch.randn(K, K, generator=g, dtype=torch.float64) * 2
    start = torch.randn(K, generator=g, dtype=torch.float64)
    end = torch.randn(K, generator=g, dtype=torch.float64) if with_end else None
    return unary, trans, start, end


def _brute(unary, trans, start, end, length):
    """Scores of all K^length paths of sequence 0 (only its first ``length`` positions)."""
    K = unary.shape[-1]
    paths = list(itertools.product(range(K), repeat=length))
    scores = []
    for p in paths:
        s = start[p[0]] + unary[0, 0, p[0]]
        for t in range(1, length):
            s = s + trans[p[t - 1], p[t]] + unary[0, t, p[t]]
        if end is not None:
            s = s + end[p[-1]]
        scores.append(s)
    return torch.tensor(paths), torch.stack(scores)


@pytest.mark.parametrize("T,K,with_end", [(1, 3, False), (2, 2, True), (4, 3, False), (5, 3, True), (5, 2, False)])
def test_against_enumeration(T, K, with_end):
    unary, trans, start, end = _problem(1, T, K, seed=T * 10 + K, with_end=with_end)
    paths, scores = _brute(unary, trans, start, end, T)
    log_z = torch.logsumexp(scores, 0)
    assert torch.allclose(chain.log_partition(unary, trans, start, end=end), log_z[None], atol=1e-9)

    probs = torch.exp(scores - log_z)
    node = torch.zeros(T, K, dtype=torch.float64)
    pair = torch.zeros(K, K, dtype=torch.float64)
    for p, w in zip(paths, probs):
        node[torch.arange(T), p] += w
        for t in range(1, T):
            pair[p[t - 1], p[t]] += w
    log_m, _ = chain.posterior_marginals(unary, trans, start, end=end)
    assert torch.allclose(log_m[0].exp(), node, atol=1e-9)

    fwd = chain.forward(unary, trans, start, end=end)
    beta = chain.backward(unary, trans, end=end)
    xi = chain.expected_transitions(unary, trans, fwd.log_alpha, beta, fwd.log_z)
    assert torch.allclose(xi, pair, atol=1e-9)

    path, score = chain.viterbi(unary, trans, start, end=end)
    best = int(scores.argmax())
    assert path[0].tolist() == paths[best].tolist()
    assert torch.allclose(score[0], scores[best])
    assert torch.allclose(chain.sequence_score(unary, trans, start, path, end=end), score)


def test_masks_match_unpadded_sequences():
    """Each padded sequence gives exactly what it gives alone, unpadded (all quantities)."""
    B, T, K = 4, 5, 3
    unary, trans, start, end = _problem(B, T, K, seed=7, with_end=True)
    lengths = torch.tensor([5, 1, 3, 4])
    mask = chain.lengths_to_mask(lengths, T)
    garbage = unary.masked_fill(~mask[..., None], 1e3)  # padded content must not matter
    log_m, log_z = chain.posterior_marginals(garbage, trans, start, mask, end)
    path, score = chain.viterbi(garbage, trans, start, mask, end)
    fwd = chain.forward(garbage, trans, start, mask, end)
    beta = chain.backward(garbage, trans, mask, end)
    xi_all = chain.expected_transitions(garbage, trans, fwd.log_alpha, beta, fwd.log_z, mask)
    xi_sum = torch.zeros(K, K, dtype=torch.float64)
    for b in range(B):
        L = int(lengths[b])
        u = unary[b:b + 1, :L]
        m1, z1 = chain.posterior_marginals(u, trans, start, end=end)
        p1, s1 = chain.viterbi(u, trans, start, end=end)
        f1 = chain.forward(u, trans, start, end=end)
        xi_sum += chain.expected_transitions(u, trans, f1.log_alpha, chain.backward(u, trans, end=end), f1.log_z)
        assert torch.allclose(log_z[b], z1[0])
        assert torch.allclose(log_m[b, :L], m1[0])
        assert path[b, :L].tolist() == p1[0].tolist()
        assert (path[b, L:] == chain.PAD).all()
        assert torch.allclose(score[b], s1[0])
        tags = path.clone()
        tags[b, L:] = 2  # padded tags are ignored
        assert torch.allclose(chain.sequence_score(garbage, trans, start, tags, mask, end)[b], s1[0])
    assert torch.allclose(xi_all, xi_sum)


def test_crf_logpartition_gradient_is_expected_counts():
    """d log Z / d unary = node marginals; d log Z / d trans = expected transition counts."""
    B, T, K = 3, 6, 4
    unary, trans, start, end = _problem(B, T, K, seed=3, with_end=True)
    lengths = torch.tensor([6, 2, 4])
    mask = chain.lengths_to_mask(lengths, T)
    u, a, s, e = (t.clone().requires_grad_(True) for t in (unary, trans, start, end))
    chain.log_partition(u, a, s, mask, e).sum().backward()
    log_m, _ = chain.posterior_marginals(unary, trans, start, mask, end)
    marg = log_m.exp() * mask[..., None]
    fwd = chain.forward(unary, trans, start, mask, end)
    beta = chain.backward(unary, trans, mask, end)
    xi = chain.expected_transitions(unary, trans, fwd.log_alpha, beta, fwd.log_z, mask)
    assert torch.allclose(u.grad, marg, atol=1e-9)
    assert torch.allclose(a.grad, xi, atol=1e-9)
    assert torch.allclose(s.grad, marg[:, 0].sum(0), atol=1e-9)
    last = marg[torch.arange(B), lengths - 1]
    assert torch.allclose(e.grad, last.sum(0), atol=1e-9)


def test_float32_long_chain_is_stable():
    """Log space: a long chain with peaked scores stays finite in float32."""
    g = torch.Generator().manual_seed(0)
    unary = torch.randn(2, 400, 5, generator=g) * 30
    trans = torch.randn(5, 5, generator=g) * 30
    start = torch.zeros(5)
    log_z = chain.log_partition(unary, trans, start)
    ref = chain.log_partition(unary.double(), trans.double(), start.double())
    assert torch.isfinite(log_z).all()
    assert torch.allclose(log_z.double(), ref, rtol=1e-5)


def test_all_padding_row_is_rejected():
    unary = torch.zeros(2, 3, 2)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    with pytest.raises(ValueError, match="length >= 1"):
        chain.log_partition(unary, torch.zeros(2, 2), torch.zeros(2), mask)
