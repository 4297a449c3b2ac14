"""Reference checks of the covariate-shift measures against direct, independent computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shiftlab.callbacks.covariate_shift import (activation_drift, clone_optimizer, gradient_ics, landscape_smoothness,
                                       weight_layers)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5, bias=False), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.Tanh(),
                         nn.Linear(4, 2, bias=False))


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (16,), generator=g)


def _f(ws, x):
    """The same network written out by hand."""
    w1, w2, w3 = ws
    return torch.tanh(torch.tanh(x @ w1.T) @ w2.T) @ w3.T


def _grads(ws, x, y):
    ws = [w.detach().clone().requires_grad_(True) for w in ws]
    loss = F.cross_entropy(_f(ws, x), y)
    return float(loss.detach()), torch.autograd.grad(loss, ws)


def _fingerprint(model, opt):
    return ([p.detach().clone() for p in model.parameters()], [None if p.grad is None else p.grad.clone()
                                                               for p in model.parameters()],
            repr(opt.state_dict()), torch.get_rng_state().clone())


def _assert_untouched(before, after):
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    for a, b in zip(before[1], after[1]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert before[2] == after[2]
    assert torch.equal(before[3], after[3])


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_gradient_ics_matches_manual_update(kind):
    model = _net().double()
    x, y = _data()
    lr = 0.3
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if kind == "momentum"
           else torch.optim.Adam(model.parameters(), lr=lr, betas=(0.8, 0.95), eps=1e-8))
    # give the optimizer real state (momentum / moments) with another batch
    for seed in (5, 6):
        xo, yo = _data(seed)
        opt.zero_grad()
        F.cross_entropy(model(xo), yo).backward()
        opt.step()
    opt.zero_grad()
    ws = [m.weight.detach().clone() for m in (model[0], model[2], model[4])]
    state = [opt.state[m.weight] for m in (model[0], model[2], model[4])]
    before = _fingerprint(model, opt)
    res = gradient_ics(model, F.cross_entropy, x, y, opt)
    _assert_untouched(before, _fingerprint(model, opt))
    assert list(res) == ["2", "4"]

    _, g = _grads(ws, x, y)

    def update(j):  # the optimizer's step for parameter j, written out from its state
        if kind == "momentum":
            return ws[j] - lr * (0.9 * state[j]["momentum_buffer"] + g[j])
        t = float(state[j]["step"]) + 1
        m = 0.8 * state[j]["exp_avg"] + 0.2 * g[j]
        v = 0.95 * state[j]["exp_avg_sq"] + 0.05 * g[j] ** 2
        return ws[j] - lr * (m / (1 - 0.8 ** t)) / ((v / (1 - 0.95 ** t)).sqrt() + 1e-8)

    for name, i in (("2", 1), ("4", 2)):
        moved = [update(j) if j < i else ws[j] for j in range(3)]
        _, g_new = _grads(moved, x, y)
        diff = float((g[i] - g_new[i]).norm())
        cos = float((g[i] * g_new[i]).sum() / (g[i].norm() * g_new[i].norm()))
        assert res[name]["l2"] == pytest.approx(diff, rel=1e-6, abs=1e-10)
        assert res[name]["cos"] == pytest.approx(cos, rel=1e-6)
        assert res[name]["grad_norm"] == pytest.approx(float(g[i].norm()), rel=1e-6)
        assert diff > 1e-4  # the update did shift layer i's gradient
    with pytest.raises(ValueError, match="out of range"):
        gradient_ics(model, F.cross_entropy, x, y, opt, layers=[7])


def test_gradient_ics_noise_layers_use_training_rng_and_bn_buffers_kept():
    """With noisy BN the probe's G equals the gradient the real step computes next."""
    from shiftlab.trainers.norms.noisy_bn import NoisyBatchNorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), NoisyBatchNorm(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 2))
    x, y = _data()
    x = x.float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    res = gradient_ics(model, F.cross_entropy, x, y, opt, layers=[2])
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    F.cross_entropy(model(x), y).backward()  # the real step's gradient, same RNG stream
    assert res["4"]["grad_norm"] == pytest.approx(float(model[4].weight.grad.norm()), rel=1e-5)


def test_weight_layers_follow_forward_order():
    class Rev(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Linear(4, 2)
            self.a = nn.Linear(3, 4)

        def forward(self, x):
            return self.b(self.a(x))

    assert weight_layers(Rev(), torch.randn(2, 3)) == ["a", "b"]


def test_landscape_matches_direct_computation():
    model = _net().double()
    x, y = _data()
    ws = [m.weight.detach().clone() for m in (model[0], model[2], model[4])]
    etas = [0.05, 0.2, 0.8]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _fingerprint(model, opt)
    res = landscape_smoothness(model, F.cross_entropy, x, y, etas)
    _assert_untouched(before, _fingerprint(model, opt))
    loss0, g = _grads(ws, x, y)
    gn = float(torch.sqrt(sum((gi ** 2).sum() for gi in g)))
    losses, diffs = [], []
    for eta in etas:
        le, ge = _grads([w - eta * gi for w, gi in zip(ws, g)], x, y)
        losses.append(le)
        diffs.append(float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g, ge)))))
    assert res["loss"] == pytest.approx(loss0, rel=1e-9)
    assert res["losses"] == pytest.approx(losses, rel=1e-9)
    assert res["loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-6)
    assert res["grad_diff_max"] == pytest.approx(max(diffs), rel=1e-6)
    assert res["grad_diff_min"] == pytest.approx(min(diffs), rel=1e-6)
    assert res["beta_smoothness"] == pytest.approx(max(d / (e * gn) for d, e in zip(diffs, etas)), rel=1e-6)
    with pytest.raises(ValueError, match="etas"):
        landscape_smoothness(model, F.cross_entropy, x, y, [0.0])


def test_activation_drift_matches_numpy_percentiles():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Sigmoid(), nn.Linear(6, 3), nn.Identity())
    model.train()
    for _ in range(3):
        model(torch.randn(32, 4) * 2 + 1)  # move the running statistics
    x = torch.randn(50, 4)
    res = activation_drift(model, x)
    assert model.training  # mode restored
    lin, bn = model[0], model[1]
    with torch.no_grad():
        z = (x @ lin.weight.T + lin.bias).numpy()
        zn = ((z - bn.running_mean.numpy()) / np.sqrt(bn.running_var.numpy() + bn.eps) * bn.weight.numpy()
              + bn.bias.numpy())
    for key, arr in (("1/in", z), ("1/out", zn)):
        for p in (15, 50, 85):
            assert res[f"{key}/p{p}"] == pytest.approx(float(np.percentile(arr, p)), rel=1e-4, abs=1e-5)
        assert res[f"{key}/mean"] == pytest.approx(float(arr.mean()), rel=1e-4, abs=1e-5)
        assert res[f"{key}/std"] == pytest.approx(float(arr.std()), rel=1e-4)
    assert "4/in/p50" in res  # the Identity slot of norm=none is tracked too
    one = activation_drift(model, x, unit=2, layers=["1"])
    assert set(k.split("/")[0] for k in one) == {"1"}
    assert one["1/in/p50"] == pytest.approx(float(np.percentile(z[:, 2], 50)), rel=1e-4, abs=1e-5)
    # training-mode measurement leaves the running statistics where they were
    rm = bn.running_mean.clone()
    activation_drift(model, x, train_mode=True)
    assert torch.equal(rm, bn.running_mean)
    with pytest.raises(ValueError, match="not norm layers"):
        activation_drift(model, x, layers=["0"])


def test_clone_optimizer_is_independent():
    import copy

    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    F.cross_entropy(model(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    twin = copy.deepcopy(model)
    new = clone_optimizer(opt, model, twin)
    assert new.param_groups[0]["weight_decay"] == 1e-3
    buf = opt.state[model[0].weight]["momentum_buffer"].clone()
    for p in twin.parameters():
        p.grad = torch.ones_like(p)
    new.step()
    assert torch.equal(opt.state[model[0].weight]["momentum_buffer"], buf)


def test_distribution_stats_subsampled_percentiles_close():
    from shiftlab.callbacks.covariate_shift import distribution_stats

    t = torch.randn(200, 32, 40)
    full = distribution_stats(t, max_quantile_elements=t.numel())
    sub = distribution_stats(t)
    assert t.numel() > 1 << 14
    for k in ("p15", "p50", "p85"):
        assert sub[k] == pytest.approx(full[k], abs=0.04)
    assert sub["mean"] == full["mean"] and sub["std"] == full["std"]
    assert full["p50"] == pytest.approx(float(np.percentile(t.numpy(), 50)), abs=1e-4)
