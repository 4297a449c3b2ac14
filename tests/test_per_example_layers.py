"""The layer-factor fast path against the torch.func reference and a loop over examples; the exact
Gauss-Newton trace against dense Hessians and dense Gauss-Newton matrices."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_hessian import dense_hessian
from torch import nn

from shiftlab.callbacks import gradient_stats as gs
from shiftlab.callbacks import per_example_layers as pel


def _mlp(bias: bool = True, bn: bool = False, act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(6, 7, bias=bias)]
    layers += ([nn.BatchNorm1d(7)] if bn else []) + [act(), nn.Linear(7, 5, bias=bias), act(), nn.Linear(5, 3)]
    model = nn.Sequential(*layers).double()
    if bn:
        model.train()
        model(torch.randn(40, 6, dtype=torch.double))  # running statistics away from the defaults
        with torch.no_grad():
            model[2].weight.uniform_(0.5, 1.5)
            model[2].bias.uniform_(-0.5, 0.5)
        model.eval()
    return model


def _batch(n: int = 11, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.double), torch.randint(0, 3, (n,), generator=g)


def _loop(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        F.cross_entropy(model(x[i: i + 1]), y[i: i + 1]), params)]) for i in range(len(x))]
    return torch.stack(rows)


def _assert_moments_close(a: gs.GradientMoments, b: gs.GradientMoments, rtol: float = 1e-5) -> None:
    assert (a.n, a.d) == (b.n, b.d)
    for field in ("grad", "sq_norms", "dots", "coord_sq_mean"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=rtol, atol=1e-12, msg=field)


CASES = {"mlp": dict(), "mlp-no-bias": dict(bias=False), "mlp-bn-eval": dict(bn=True),
         "tanh": dict(act=nn.Tanh)}


@pytest.mark.parametrize("case", CASES)
def test_layer_moments_match_vmap_and_a_loop(case):
    model = _mlp(**CASES[case])
    x, y = _batch()
    fast = gs.batch_moments(model, x, y)
    assert fast.path == "layers" and fast.fallback_reason is None and fast.gradients is None
    ref = gs.batch_moments(model, x, y, path="vmap", gradients=True)
    assert ref.path == "vmap"
    _assert_moments_close(fast.moments, ref.moments)
    torch.testing.assert_close(fast.losses, ref.losses)
    torch.testing.assert_close(ref.gradients, _loop(model, x, y))
    _assert_moments_close(fast.moments, gs.gradient_moments(_loop(model, x, y)))
    for name, fn in gs.STATISTICS.items():  # every statistic agrees
        assert fn(fast.moments) == pytest.approx(fn(ref.moments), rel=1e-5, nan_ok=True), name
    G, losses = pel.layer_gradients(model, x, y)
    torch.testing.assert_close(G, ref.gradients)
    assert gs.batch_moments(model, x, y, gradients=True).path == "layers"


def test_layer_moments_float32_and_frozen_parameters():
    model = _mlp().float()
    model[1].weight.requires_grad_(False)  # a frozen weight with a trainable bias
    x, y = _batch(32)
    x = x.float()
    fast, ref = gs.batch_moments(model, x, y), gs.batch_moments(model, x, y, path="vmap")
    assert fast.path == "layers" and fast.moments.d == ref.moments.d
    _assert_moments_close(fast.moments, ref.moments, rtol=1e-4)


def test_sequence_inputs_and_batchnorm_over_positions():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.BatchNorm1d(3), nn.Flatten(), nn.Linear(15, 2)).double()
    model.train()
    model(torch.randn(20, 3, 4, dtype=torch.double))
    model.eval()
    x, y = torch.randn(9, 3, 4, dtype=torch.double), torch.randint(0, 2, (9,))
    fast = gs.batch_moments(model, x, y, gradients=True)
    assert fast.path == "layers"
    torch.testing.assert_close(fast.gradients, _loop(model, x, y))
    _assert_moments_close(fast.moments, gs.gradient_moments(_loop(model, x, y)))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.a(torch.relu(self.a(x))))


def test_falls_back_and_says_why():
    x, y = _batch()
    bn_train = _mlp(bn=True).train()
    assert "batch statistics" in pel.fast_path_reason(bn_train)
    ln = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    r = gs.batch_moments(ln, x, y)
    assert r.path == "vmap" and "LayerNorm" not in r.fallback_reason and "1.weight" in r.fallback_reason
    tied = _Tied().double()
    r = gs.batch_moments(tied, x, y)
    assert r.path == "vmap" and "more than once" in r.fallback_reason
    torch.testing.assert_close(r.moments.grad, gs.gradient_moments(_loop(tied, x, y)).grad.double())
    with pytest.raises(ValueError, match="does not apply"):
        gs.batch_moments(tied, x, y, path="layers")
    with pytest.raises(ValueError, match="not allowed"):
        gs.batch_moments(tied, x, y, path="fast")


# --------------------------------------------------------------------------- Gauss-Newton trace
def _dense_jacobian_and_hessian_of_loss(model, x):
    """Dense logit Jacobians J (N, C, P) and the softmax cross-entropy Hessians A = diag p - p p^T (N, C, C)."""
    names = [n for n, _ in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def logits(flat):
        d, i = dict(buffers), 0
        for n, p in zip(names, model.parameters()):
            d[n] = flat[i: i + p.numel()].view_as(p)
            i += p.numel()
        return torch.func.functional_call(model, d, (x,))

    J = torch.autograd.functional.jacobian(logits, flat0)  # (N, C, P)
    p = torch.softmax(logits(flat0), 1)
    A = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return J, A


def _dense_ggn_trace(model, x, y) -> float:
    """tr of (1/N) sum_n J_n^T (diag p_n - p_n p_n^T) J_n with dense Jacobians."""
    J, A = _dense_jacobian_and_hessian_of_loss(model, x)
    return float((A * (J @ J.transpose(1, 2))).sum()) / x.shape[0]


@pytest.mark.parametrize("case", ["mlp", "mlp-no-bias", "mlp-bn-eval"])
def test_ggn_trace_is_the_exact_hessian_trace_of_a_relu_net(case):
    model = _mlp(**CASES[case])
    x, y = _batch(13)
    r = pel.ggn_trace(model, x, y)
    assert r.equals_hessian_trace and r.reason is None
    assert r.trace == pytest.approx(float(torch.trace(dense_hessian(model, x, y))), rel=1e-5)


def test_ggn_trace_where_the_hessian_differs():
    model = _mlp(act=nn.Tanh)
    x, y = _batch(13)
    r = pel.ggn_trace(model, x, y)
    assert not r.equals_hessian_trace and "Tanh" in r.reason
    assert r.trace == pytest.approx(_dense_ggn_trace(model, x, y), rel=1e-5)  # it is the GGN's trace
    hess = float(torch.trace(dense_hessian(model, x, y)))
    assert abs(r.trace - hess) > 1e-3 * abs(hess)  # and not the Hessian's
    with pytest.raises(ValueError, match="batch statistics"):  # train-mode BN: examples interact
        pel.ggn_trace(_mlp(bn=True).train(), x, y)


class _FunctionalTanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_an_operation_outside_the_leaves_is_not_trusted():
    x, _ = _batch()
    assert "chain" in pel.ggn_is_hessian_trace(_FunctionalTanh().double(), x)
    assert pel.ggn_is_hessian_trace(_mlp(), x) is None


def test_the_gradient_tests_callback_records_the_path():
    from shiftlab.callbacks.gradient_tests import GradientTests

    x, y = _batch(16)
    cb = GradientTests(every_n_steps=1, max_overhead=None)
    fast, cost, (losses, G) = cb.measure(_mlp(bn=True), x, y)
    ln = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    slow, _, _ = cb.measure(ln, x, y)
    assert fast["layer_path"] == 1.0 and G is None and cost["per_example_gradients"] > 0
    assert slow["layer_path"] == 0.0
    ref = gs.batch_moments(_mlp(bn=True), x, y, path="vmap").moments
    assert fast["norm_test"] == pytest.approx(gs.norm_test(ref), rel=1e-5)


def test_in_place_activations_fall_back():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    x, y = _batch()
    r = gs.batch_moments(model, x, y)
    assert r.path == "vmap" and "in place" in r.fallback_reason
    _assert_moments_close(r.moments, gs.gradient_moments(_loop(model, x, y)))
    with pytest.raises(pel.NotApplicable, match="in place"):
        pel.ggn_trace(model, x, y)


def test_the_projects_mlp_takes_both_fast_paths():
    from shiftlab.trainers.models.mlp import MLP

    torch.manual_seed(5)
    model = MLP((6,), 3, hidden=(8, 8)).double()
    x, y = _batch(10)
    assert gs.batch_moments(model, x, y).path == "layers"
    r = pel.ggn_trace(model, x, y)
    assert r.equals_hessian_trace
    assert r.trace == pytest.approx(float(torch.trace(dense_hessian(model, x, y))), rel=1e-5)


def _cnn(dims: int, seed: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    conv, pool, bn = (nn.Conv1d, nn.MaxPool1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.MaxPool2d,
                                                                                 nn.BatchNorm2d)
    model = nn.Sequential(conv(2, 3, 3, padding=1), bn(3), nn.ReLU(), pool(2),
                          conv(3, 4, 2, stride=2, dilation=1, padding="valid"), nn.ReLU(),
                          conv(4, 2, 3, padding=2, dilation=2, bias=False), nn.Flatten(),
                          nn.Linear(2 * 2 ** dims, 3)).double()
    model.train()
    model(torch.randn(20, 2, *(8,) * dims, dtype=torch.double))
    return model.eval()


@pytest.mark.parametrize("dims", [1, 2])
def test_convolutions_by_unfolded_patches(dims):
    model = _cnn(dims)
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(9, 2, *(8,) * dims, generator=g, dtype=torch.double), torch.randint(0, 3, (9,), generator=g)
    fast = gs.batch_moments(model, x, y, gradients=True)
    assert fast.path == "layers"
    torch.testing.assert_close(fast.gradients, _loop(model, x, y))
    _assert_moments_close(gs.batch_moments(model, x, y).moments, gs.batch_moments(model, x, y, path="vmap").moments)
    r = pel.ggn_trace(model, x, y)  # conv, eval-mode BN, ReLU, max-pool: piecewise linear
    assert r.equals_hessian_trace
    assert r.trace == pytest.approx(float(torch.trace(dense_hessian(model, x, y))), rel=1e-5)
    grouped = nn.Sequential(nn.Conv1d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(12, 3))
    assert "groups=1" in pel.fast_path_reason(grouped)


# --------------------------------------------------------------------------- Gauss-Newton diagonal
def _dense_ggn_diagonal(model, x, y) -> torch.Tensor:
    """diag of (1/N) sum_n J_n^T (diag p_n - p_n p_n^T) J_n with dense Jacobians."""
    J, A = _dense_jacobian_and_hessian_of_loss(model, x)
    return torch.einsum("ncp,ncd,ndp->p", J, A, J) / x.shape[0]


@pytest.mark.parametrize("case", ["mlp", "mlp-no-bias", "mlp-bn-eval", "conv1d", "conv2d"])
def test_ggn_diagonal_is_the_exact_hessian_diagonal_of_a_piecewise_linear_net(case):
    if case.startswith("conv"):
        dims = int(case[4])
        model = _cnn(dims)
        g = torch.Generator().manual_seed(8)
        x, y = torch.randn(9, 2, *(8,) * dims, generator=g, dtype=torch.double), torch.randint(0, 3, (9,), generator=g)
    else:
        model = _mlp(**CASES[case])
        x, y = _batch(13)
    r = pel.ggn_diagonal(model, x, y)
    assert r.equals_hessian_diagonal and r.reason is None
    H = dense_hessian(model, x, y)
    torch.testing.assert_close(r.diag, H.diagonal(), rtol=1e-5, atol=1e-10)
    assert float(r.diag.sum()) == pytest.approx(pel.ggn_trace(model, x, y).trace, rel=1e-9)
    # the off-diagonal Hessian is not the GGN's, only the diagonal is: the test is not vacuous
    assert float((H - torch.diag(H.diagonal())).abs().max()) > 1e-3


def test_ggn_diagonal_where_the_hessian_differs():
    model = _mlp(act=nn.Tanh)
    x, y = _batch(13)
    r = pel.ggn_diagonal(model, x, y)
    assert not r.equals_hessian_diagonal and "Tanh" in r.reason
    torch.testing.assert_close(r.diag, _dense_ggn_diagonal(model, x, y), rtol=1e-5, atol=1e-10)
    assert float((r.diag - dense_hessian(model, x, y).diagonal()).abs().max()) > 1e-4
    frozen = _mlp()
    frozen[1].weight.requires_grad_(False)  # trainable parameters only, in order
    full = pel.ggn_diagonal(_mlp(), x, y).diag
    torch.testing.assert_close(pel.ggn_diagonal(frozen, x, y).diag, full[frozen[1].weight.numel():])


@pytest.mark.parametrize("case", ["mlp", "mlp-bn-eval", "conv2d"])
def test_moments_and_gradients_from_one_pass(case):
    """G written block by block equals the loop over examples; the moments are the factors' (not G's)."""
    if case == "conv2d":
        model = _cnn(2)
        g = torch.Generator().manual_seed(9)
        x, y = torch.randn(9, 2, 8, 8, generator=g, dtype=torch.double), torch.randint(0, 3, (9,), generator=g)
    else:
        model = _mlp(**CASES[case])
        x, y = _batch(10)
    m, G, losses = pel.layer_moments_and_gradients(model, x, y)
    torch.testing.assert_close(G, _loop(model, x, y))
    _assert_moments_close(m, pel.layer_moments(model, x, y)[0], rtol=1e-12)
    _assert_moments_close(m, gs.gradient_moments(G))
    bm = gs.batch_moments(model.float(), x.float(), y, gradients=True)
    assert bm.path == "layers" and bm.gradients.dtype == torch.float32
    torch.testing.assert_close(bm.gradients, _loop(model, x.float(), y), rtol=1e-4, atol=1e-6)
