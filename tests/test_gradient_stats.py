"""Gradient statistics against an explicit loop over examples and the papers' formulas."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shiftlab.callbacks import gradient_stats as gs


def _model_batch(seed: int = 0, n: int = 12):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).double()
    model[0].bias.requires_grad_(False)  # a frozen parameter is left out of G
    model.train()
    model(torch.randn(40, 5, dtype=torch.double))  # running stats away from the defaults
    model.eval()
    x, y = torch.randn(n, 5, dtype=torch.double), torch.randint(0, 3, (n,))
    return model, x, y


def _loop_gradients(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    rows, losses = [], []
    for i in range(x.shape[0]):
        value = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        g = torch.autograd.grad(value, params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
        losses.append(float(value.detach()))
    return torch.stack(rows), torch.tensor(losses, dtype=torch.double)


def test_per_example_gradients_match_a_loop():
    model, x, y = _model_batch()
    G, losses = gs.per_example_gradients(model, x, y)
    G_loop, losses_loop = _loop_gradients(model, x, y)
    torch.testing.assert_close(G, G_loop)
    torch.testing.assert_close(losses, losses_loop)
    # their mean is the batch gradient
    params = [p for p in model.parameters() if p.requires_grad]
    batch = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    torch.testing.assert_close(G.mean(0), torch.cat([t.reshape(-1) for t in batch]))
    G2, _ = gs.per_example_gradients(model, x, y, chunk_size=5)
    torch.testing.assert_close(G2, G)


def _loop_statistics(G: torch.Tensor) -> dict[str, float]:
    """Each paper's sample formula written out example by example, coordinate by coordinate."""
    rows = [G[i].double() for i in range(G.shape[0])]
    n, d = len(rows), rows[0].numel()
    g = sum(rows) / n
    g2 = float(g @ g)
    var_norm = sum(float((r - g) @ (r - g)) for r in rows) / (n - 1)  # Byrd (3.6)
    proj = [float(r @ g) for r in rows]
    mean_proj = sum(proj) / n
    var_proj = sum((p - mean_proj) ** 2 for p in proj) / (n - 1)  # Bollapragada (2.6)
    orth = [r - (float(r @ g) / g2) * g for r in rows]
    var_orth = sum(float(o @ o) for o in orth) / (n - 1)  # Bollapragada (3.3)
    snr, ratio = [], []
    for j in range(d):
        col = [float(r[j]) for r in rows]
        m = sum(col) / n
        pop = sum((c - m) ** 2 for c in col) / n
        snr.append(m * m / (pop + 1e-5))
        ratio.append(m * m / (pop * n / (n - 1) + 1e-5))
    return {
        "norm_test": math.sqrt(var_norm / n) / math.sqrt(g2),
        "inner_product_test": math.sqrt(var_proj / n) / g2,
        "orthogonality_test": math.sqrt(var_orth / n) / math.sqrt(g2),
        "gsnr": sum(snr) / d,
        "eb_criterion": 1 - n / d * sum(ratio),  # Mahsereci (7)
        "b_simple": var_norm / (g2 - var_norm / n),  # McCandlish, unbiased |G|^2
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_statistics_match_the_papers_formulas(seed):
    model, x, y = _model_batch(seed)
    G, _ = gs.per_example_gradients(model, x, y)
    moments = gs.gradient_moments(G)
    expect = _loop_statistics(G)
    assert set(expect) == set(gs.STATISTICS)
    for name, fn in gs.STATISTICS.items():
        assert fn(moments) == pytest.approx(expect[name], rel=1e-9), name
    # B_simple is the noise-scale callback's estimator with batches of one example
    from shiftlab.callbacks.gradient_noise import b_simple_from_batch_grads

    assert gs.b_simple(moments) == pytest.approx(b_simple_from_batch_grads(G, 1).b_simple, rel=1e-9)
    # float32 gradients: float64 accumulation keeps the statistics close to the float64 ones
    m32 = gs.gradient_moments(G.float())
    for name, fn in gs.STATISTICS.items():
        assert fn(m32) == pytest.approx(expect[name], rel=1e-4), name


def test_statistics_in_known_regimes():
    gen = torch.Generator().manual_seed(0)
    signal = torch.ones(50, dtype=torch.double)
    noisy = signal + 30 * torch.randn(64, 50, generator=gen, dtype=torch.double)
    clean = signal + 0.01 * torch.randn(64, 50, generator=gen, dtype=torch.double)
    m_noisy, m_clean = gs.gradient_moments(noisy), gs.gradient_moments(clean)
    assert gs.eb_criterion(m_noisy) > 0 > gs.eb_criterion(m_clean)  # stop only on noise
    assert gs.norm_test(m_noisy) > 1 > gs.norm_test(m_clean)
    some = gs.gradient_moments(signal + 3 * torch.randn(64, 50, generator=gen, dtype=torch.double))
    assert 5 < gs.b_simple(some) < 15  # tr(Sigma) / |G|^2 = 450 / 50
    assert gs.b_simple(m_clean) < 1e-3
    with pytest.raises(ValueError):
        gs.gradient_moments(torch.ones(1, 3))


def test_alpha_on_an_exact_quadratic():
    # f(s) = (s - 1)^2 along the step: alpha = 2 t / 2 - 1
    def obs(t):
        return (1.0, (t - 1) ** 2), (-2.0, 2 * (t - 1))

    for t, want in [(1.0, 0.0), (2.0, 1.0), (0.5, -0.5), (3.0, 2.0)]:
        fs, dfs = obs(t)
        assert gs.alpha_from_fit(t, fs, dfs, (0.1, 0.1), (0.2, 0.2)) == pytest.approx(want)
    assert gs.alpha_from_fit(0.0, (1, 1), (0, 0), (1, 1), (1, 1)) == -1.0
    assert gs.alpha_from_fit(1.0, (0.0, -1.0), (0.0, -2.0), (1, 1), (1, 1)) == -1.0  # concave


def test_alpha_from_per_example_gradients():
    # loss_i(theta) = 0.5 |theta - c_i|^2: the mean loss is minimal at mean(c)
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(16, 4, generator=gen, dtype=torch.double) + 3.0

    def point(theta):
        diff = theta - c
        return 0.5 * (diff * diff).sum(1), diff  # losses, per-example gradients

    theta0 = torch.zeros(4, dtype=torch.double)
    for lr, want in [(1.0, 0.0), (0.5, -0.5), (2.0, 1.0)]:  # SGD on the mean loss, curvature 1
        step = -lr * point(theta0)[1].mean(0)
        a = gs.alpha_from_gradients(step, *point(theta0), *point(theta0 + step))
        assert a == pytest.approx(want, abs=1e-9)
    assert gs.alpha_from_gradients(torch.zeros(4), *point(theta0), *point(theta0)) == -1.0


def test_alpha_by_forward_mode_matches_per_example_gradients():
    model, x0, y0 = _model_batch(3)
    start = gs.snapshot(model)
    G0, l0 = gs.per_example_gradients(model, x0, y0)
    with torch.no_grad():  # an SGD-like step, then a fresh batch
        for p, g in zip([p for p in model.parameters() if p.requires_grad],
                        torch.split(G0.mean(0), [p.numel() for p in model.parameters() if p.requires_grad])):
            p -= 0.5 * g.view_as(p)
    x1, y1 = torch.randn_like(x0), torch.randint(0, 3, (x0.shape[0],))
    G1, l1 = gs.per_example_gradients(model, x1, y1)
    end = gs.snapshot(model)
    d = {n: end["params"][n] - start["params"][n] for n in start["params"]}
    flat = torch.cat([v.reshape(-1) for v in d.values()])
    t = float(flat.norm())
    unit = {n: v / t for n, v in d.items()}
    dl0, p0 = gs.per_example_directional(model, x0, y0, unit, at=start)
    dl1, p1 = gs.per_example_directional(model, x1, y1, unit)
    torch.testing.assert_close(p0, G0 @ (flat / t))
    torch.testing.assert_close(p1, G1 @ (flat / t))
    torch.testing.assert_close(dl0, l0)
    assert gs.alpha_from_projections(t, dl0, p0, dl1, p1) == pytest.approx(
        gs.alpha_from_gradients(flat, l0, G0, l1, G1), rel=1e-9)
