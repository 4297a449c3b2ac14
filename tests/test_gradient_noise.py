"""B_simple estimators on cases whose gradient mean and covariance are known exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from shiftlab.callbacks.gradient_noise import (
    GradientNoiseScale,
    b_simple_from_batch_grads,
    b_simple_two_batch,
    gradient_noise_scale,
    per_batch_gradients,
)


def _population(n=60, p=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, p, generator=g, dtype=torch.double) * torch.linspace(0.5, 2.0, p).double()
    z += torch.tensor([1.0, -0.5, 0.3, 0.0, 0.8], dtype=torch.double)[:p]
    mean = z.mean(0)
    tr_sigma = float(((z - mean) ** 2).sum(1).mean())  # population covariance, divisor N
    return z, float((mean**2).sum()), tr_sigma


def test_finite_population_estimator_is_unbiased():
    # small N so the finite-population corrections (~6%) are far above the Monte Carlo error
    z, grad_sq, tr_sigma = _population(n=16)
    n, (k, b) = z.shape[0], (3, 4)
    gen = torch.Generator().manual_seed(1)
    trs, gss = [], []
    perms = torch.rand(20000, n, generator=gen).argsort(1)[:, : k * b]
    for perm in perms:
        perm = perm.view(k, b)
        est = b_simple_from_batch_grads(z[perm].mean(1), b, population_size=n)
        trs.append(est.tr_sigma)
        gss.append(est.grad_sq)
    trs, gss = torch.tensor(trs), torch.tensor(gss)
    assert abs(trs.mean() - tr_sigma) < 4 * trs.std() / len(trs) ** 0.5
    assert abs(gss.mean() - grad_sq) < 4 * gss.std() / len(gss) ** 0.5
    # the naive plug-ins are biased: |mean g|^2 over-estimates |G|^2
    naive = torch.stack([z[torch.randperm(n, generator=gen)[: k * b]].mean(0) for _ in range(4000)])
    assert (naive**2).sum(1).mean() > grad_sq + 6 * gss.std() / len(gss) ** 0.5


def test_iid_estimator_is_unbiased_and_two_batch_agrees():
    z, grad_sq, tr_sigma = _population(seed=3)
    n, (k, b) = z.shape[0], (5, 8)
    gen = torch.Generator().manual_seed(2)
    trs, gss = [], []
    for _ in range(4000):
        idx = torch.randint(0, n, (k, b), generator=gen)  # with replacement: i.i.d.
        grads = z[idx].mean(1)
        est = b_simple_from_batch_grads(grads, b)
        trs.append(est.tr_sigma)
        gss.append(est.grad_sq)
        small = float((grads**2).sum(1).mean())
        big = float((grads.mean(0) ** 2).sum())
        two = b_simple_two_batch(small, big, b, k * b)
        assert two.tr_sigma == pytest.approx(est.tr_sigma, rel=1e-9, abs=1e-12)
        assert two.grad_sq == pytest.approx(est.grad_sq, rel=1e-9, abs=1e-12)
    trs, gss = torch.tensor(trs), torch.tensor(gss)
    assert abs(trs.mean() - tr_sigma) < 4 * trs.std() / len(trs) ** 0.5
    assert abs(gss.mean() - grad_sq) < 4 * gss.std() / len(gss) ** 0.5


def test_exact_gradient_when_batches_cover_the_data():
    z, grad_sq, _ = _population()
    est = b_simple_from_batch_grads(z.view(5, 12, -1).mean(1), 12, population_size=60)
    assert est.grad_sq == pytest.approx(grad_sq, rel=1e-12)


class _Centre(nn.Module):
    """Loss 0.5|w - z_i|^2 per example: per-example gradient w - z_i, Sigma = Cov(z)."""

    def __init__(self, p):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(p, dtype=torch.double))

    def forward(self, x):
        return x - self.w


def _centre_loss(out, _y):
    return 0.5 * (out**2).sum(1).mean()


def test_model_path_matches_known_variance():
    z, _, tr_sigma = _population(n=240, seed=5)
    model = _Centre(z.shape[1])
    with torch.no_grad():
        model.w.copy_(torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5]))
    grad_sq = float(((model.w.detach() - z.mean(0)) ** 2).sum())
    y = torch.zeros(z.shape[0])
    # per-batch gradients are the batch means of w - z_i
    g = per_batch_gradients(model, z, y, 16, 3, loss=_centre_loss, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(240, generator=torch.Generator().manual_seed(0))[:48].view(3, 16)
    torch.testing.assert_close(g, (model.w.detach() - z[perm]).mean(1))
    assert model.w.grad is None
    ests = [
        gradient_noise_scale(model, z, y, 16, 15, loss=_centre_loss, generator=torch.Generator().manual_seed(s))
        for s in range(200)
    ]
    tr = torch.tensor([e.tr_sigma for e in ests])
    assert abs(float(tr.mean()) - tr_sigma) < 4 * float(tr.std()) / len(tr) ** 0.5
    # k*B == N: |G|^2 exact, so B_simple is tr_sigma_hat / exact |G|^2
    for e in ests[:3]:
        assert e.grad_sq == pytest.approx(grad_sq, rel=1e-10)
        assert e.b_simple == pytest.approx(e.tr_sigma / grad_sq, rel=1e-10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="k>=2"):
        b_simple_from_batch_grads(torch.zeros(1, 3), 4)
    with pytest.raises(ValueError, match="b_small"):
        b_simple_two_batch(1.0, 0.5, 8, 8)
    with pytest.raises(ValueError, match="num_batches"):
        GradientNoiseScale(num_batches=1)
    with pytest.raises(ValueError, match="labels"):
        GradientNoiseScale(labels="noisy")
    with pytest.raises(ValueError, match="exceeds"):
        per_batch_gradients(_Centre(2), torch.zeros(10, 2), torch.zeros(10), 4, 3, loss=_centre_loss)


def test_callback_state_round_trip_and_old_checkpoint_state():
    old = GradientNoiseScale()
    old.load_state_dict({"last": {"epoch": 3, "b_simple": 2.0, "tr_sigma": 4.0, "grad_sq": 2.0}})  # before Probe
    assert old.summary_items()["noise/b_simple"] == 2.0 and old.history[-1]["epoch"] == 3
    fresh = GradientNoiseScale()
    fresh.load_state_dict(old.state_dict())
    assert fresh.history == old.history and fresh.summary_items() == old.summary_items()
