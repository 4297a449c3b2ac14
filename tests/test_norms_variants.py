"""Equivalences, eval behaviour and state_dict parity of the normalization variants."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functools

from shiftlab.trainers.norms import NormFactory, create_norm_layer
from shiftlab.trainers.norms import prepare_model as apply_prepare_model
from shiftlab.trainers.norms import weight_std
from shiftlab.trainers.norms.batch_renorm import BatchRenorm, renorm_limits
from shiftlab.trainers.norms.ghost_bn import GhostBatchNorm
from shiftlab.trainers.norms.noisy_bn import NoisyBatchNorm, nonstationary_noise
from shiftlab.trainers.norms.weight_std import WSConv2d, prepare_model

BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
ZERO_NOISE = dict(n_mu=0.0, n_sigma=1.0, r_mu=0.0, r_sigma=0.0)


def _pair(variant: nn.Module, dims: int, c: int = 5) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    ref = BN[dims](c, momentum=variant.momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    variant.load_state_dict(ref.state_dict(), strict=True)
    return variant, ref


def _run_steps(mod: nn.Module, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    outs, grads = [], []
    g = torch.Generator().manual_seed(7)
    for x in xs:
        x = x.clone().requires_grad_(True)
        y = mod(x)
        w = torch.randn(y.shape, generator=g)
        (y * w).sum().backward()
        outs.append(y.detach())
        grads.append(x.grad)
    return outs, grads


def _assert_same_bn(a: nn.Module, b: nn.Module, xs: list[torch.Tensor], atol: float = 1e-5) -> None:
    oa, ga = _run_steps(a, xs)
    ob, gb = _run_steps(b, xs)
    for u, v in zip(oa + ga, ob + gb):
        torch.testing.assert_close(u, v, atol=atol, rtol=1e-4)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=atol * 10, rtol=1e-4)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), atol=atol, rtol=1e-4)


def _batches(dims: int, n: int = 12, c: int = 5, k: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(3)
    return [torch.randn(n, c, *([4] * dims)) * 2 + 1 for _ in range(k)]


@pytest.mark.parametrize("dims", [0, 1, 2])
def test_noisy_bn_without_noise_is_batchnorm(dims):
    for pos in ("after_affine", "before_affine"):
        a, b = _pair(NoisyBatchNorm(5, noise_position=pos, **ZERO_NOISE), dims)
        _assert_same_bn(a, b, _batches(dims))


def test_noisy_bn_noise_only_in_training_and_position_switch():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 4, 4)
    layer = NoisyBatchNorm(3)
    with torch.no_grad():
        layer.weight.fill_(2.0)
        layer.bias.fill_(1.0)
    ref = nn.BatchNorm2d(3)
    ref.load_state_dict(layer.state_dict())
    y_train = layer(x)
    assert not torch.allclose(y_train, ref(x), atol=1e-3)
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x), ref(x))
    # before/after affine differ given the same noise draw
    torch.manual_seed(5)
    after = NoisyBatchNorm(3, noise_position="after_affine")
    after.load_state_dict(layer.state_dict())
    before = NoisyBatchNorm(3, noise_position="before_affine")
    before.load_state_dict(layer.state_dict())
    torch.manual_seed(9)
    ya = after(x)
    torch.manual_seed(9)
    yb = before(x)
    # before: gamma*(s*xh+m)+beta; after: s*(gamma*xh+beta)+m -> difference is (gamma-1)*m + beta*(1-s)
    assert not torch.allclose(ya, yb, atol=1e-3)
    with pytest.raises(ValueError, match="noise_position"):
        NoisyBatchNorm(3, noise_position="middle")


def test_nonstationary_noise_distribution():
    """Alg. 1: with a=0 the output is m; with a=1, r_mu=n_mu=0 it is s."""
    g = torch.Generator().manual_seed(0)
    zeros = torch.zeros(4000, 6, 3)
    m = nonstationary_noise(zeros, 0.5, 1.25, 0.1, 0.1, generator=g)
    per_unit = m.transpose(0, 1).reshape(6, -1)
    assert (per_unit.max(1).values - per_unit.min(1).values <= 0.2 + 1e-6).all()  # width 2 r_mu
    assert (per_unit.mean(1).abs() <= 0.5 + 0.01).all()
    assert per_unit.mean(1).std() > 0.01  # mu_t differs between units
    s = nonstationary_noise(torch.ones(4000, 6), 0.0, 1.25, 0.0, 0.1, generator=g)
    assert ((s.mean(0) > 1 - 0.02) & (s.mean(0) < 1.25 + 0.02)).all()
    torch.testing.assert_close(s.std(0), torch.full((6,), 0.1), atol=0.01, rtol=0)
    # non-stationary: a second step draws other mu_t
    m2 = nonstationary_noise(zeros, 0.5, 1.25, 0.1, 0.1, generator=g)
    assert not torch.allclose(m.mean((0, 2)), m2.mean((0, 2)), atol=1e-2)


@pytest.mark.parametrize("dims", [0, 2])
def test_batch_renorm_r1_d0_is_batchnorm(dims):
    a, b = _pair(BatchRenorm(5, r_max=1.0, d_max=0.0, warmup_steps=0), dims)
    _assert_same_bn(a, b, _batches(dims))


def test_batch_renorm_matches_direct_formula():
    torch.manual_seed(0)
    layer = BatchRenorm(4, r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0, momentum=0.5)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.0, 3.0, -3.0, 0.2]))
        layer.running_var.copy_(torch.tensor([1.0, 0.1, 9.0, 1.0]))
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(16, 4, dtype=torch.float64).float().requires_grad_(True)
    y = layer(x)
    # independent computation, per channel, in float64
    xd = x.detach().double()
    mu_b = xd.mean(0)
    sd_b = (((xd - mu_b) ** 2).mean(0) + layer.eps).sqrt()
    sd = (rv.double() + layer.eps).sqrt()
    r = (sd_b / sd).clamp(1 / 1.5, 1.5)
    d = ((mu_b - rm.double()) / sd).clamp(-0.5, 0.5)
    expect = ((xd - mu_b) / sd_b * r + d) * layer.weight.detach().double() + layer.bias.detach().double()
    torch.testing.assert_close(y.double(), expect, atol=1e-5, rtol=1e-5)
    assert (r != 1).any() and (d.abs() == 0.5).any()  # the clipping was exercised
    # gradient treats r and d as constants
    xx = x.detach().double().requires_grad_(True)
    mu = xx.mean(0)
    sdv = (((xx - mu) ** 2).mean(0) + layer.eps).sqrt()
    ((xx - mu) / sdv * r + d).mul(layer.weight.detach().double()).pow(2).sum().backward()
    y.pow(2).sum().backward()
    torch.testing.assert_close(x.grad.double(), xx.grad, atol=1e-4, rtol=1e-4)
    # running update is torch's (unbiased var)
    torch.testing.assert_close(layer.running_mean.double(), 0.5 * rm.double() + 0.5 * mu_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.running_var.double(), 0.5 * rv.double() + 0.5 * xd.var(0), atol=1e-5, rtol=0)


def test_batch_renorm_schedule_uses_num_batches_tracked():
    assert renorm_limits(1, 3, 5, 5000, 40000, 25000) == (1.0, 0.0)
    assert renorm_limits(5000, 3, 5, 5000, 40000, 25000) == (1.0, 0.0)
    r, d = renorm_limits(15000, 3, 5, 5000, 40000, 25000)
    assert r == pytest.approx(1 + 2 * 10000 / 35000) and d == pytest.approx(5 * 10000 / 20000)
    assert renorm_limits(50000, 3, 5, 5000, 40000, 25000) == (3.0, 5.0)
    layer = BatchRenorm(3, warmup_steps=2, r_max_steps=4, d_max_steps=4)
    for _ in range(5):
        layer(torch.randn(8, 3))
    assert int(layer.num_batches_tracked) == 5 and layer.current_limits() == (3.0, 5.0)


@pytest.mark.parametrize("dims", [0, 2])
def test_ghost_bn_single_chunk_is_batchnorm(dims):
    a, b = _pair(GhostBatchNorm(5, virtual_batch_size=12), dims)
    _assert_same_bn(a, b, _batches(dims, n=12))
    a, b = _pair(GhostBatchNorm(5, virtual_batch_size=100), dims)
    _assert_same_bn(a, b, _batches(dims, n=12))


@pytest.mark.parametrize("n,vb,dims", [(12, 4, 0), (10, 4, 2), (9, 4, 0), (11, 3, 1)])
def test_ghost_bn_equals_bn_per_chunk(n, vb, dims):
    """Outputs, input grads and running stats equal BN run separately on each virtual batch."""
    ghost, ref = _pair(GhostBatchNorm(5, virtual_batch_size=vb), dims)
    x = _batches(dims, n=n, k=1)[0]
    bounds = list(range(0, n, vb))
    if n % vb == 1 and dims == 0:  # a 1-sample tail joins the previous chunk
        bounds = bounds[:-1]
    chunks = [x[s:e] for s, e in zip(bounds, bounds[1:] + [n])]
    xg = x.clone().requires_grad_(True)
    yg = ghost(xg)
    w = torch.randn(yg.shape)
    (yg * w).sum().backward()
    ys, gs = [], []
    for ch, wch in zip(chunks, torch.split(w, [len(c) for c in chunks])):
        ch = ch.clone().requires_grad_(True)
        yc = ref(ch)
        (yc * wch).sum().backward()
        ys.append(yc.detach())
        gs.append(ch.grad)
    torch.testing.assert_close(yg.detach(), torch.cat(ys), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(xg.grad, torch.cat(gs), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ghost.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ghost, k), getattr(ref, k), atol=1e-5, rtol=1e-5)


def test_ghost_bn_cumulative_momentum_none():
    ghost, ref = _pair(GhostBatchNorm(3, virtual_batch_size=4, momentum=None), 0, c=3)
    x = torch.randn(12, 3)
    ghost(x)
    for ch in x.split(4):
        ref(ch)
    torch.testing.assert_close(ghost.running_var, ref.running_var)
    torch.testing.assert_close(ghost.running_mean, ref.running_mean)


@pytest.mark.parametrize("name", ["noisy_bn", "batch_renorm", "ghost_bn"])
def test_bn_family_state_dict_round_trip_and_eval(name):
    torch.manual_seed(0)
    layer = create_norm_layer(name, 6, 2)
    for _ in range(3):
        layer(torch.randn(8, 6, 3, 3) * 3 + 2)
    plain = nn.BatchNorm2d(6)
    plain.load_state_dict(layer.state_dict(), strict=True)
    back = create_norm_layer(name, 6, 2)
    back.load_state_dict(plain.state_dict(), strict=True)
    assert float(layer.running_var.mean()) > 2  # running stats moved away from init
    x = torch.randn(5, 6, 3, 3)
    for m in (layer, plain, back):
        m.eval()
    torch.testing.assert_close(layer(x), plain(x))
    torch.testing.assert_close(back(x), plain(x))
    # eval mode uses running statistics: output of one sample does not depend on the others
    torch.testing.assert_close(layer(x[:1]), layer(x)[:1])


def test_groupnorm_groups_and_errors():
    assert create_norm_layer("groupnorm", 64, 2).num_groups == 32
    assert create_norm_layer("groupnorm", 100, 0).num_groups == 25
    assert create_norm_layer("groupnorm", 8, 2, num_groups=32).num_groups == 8
    with pytest.raises(ValueError, match="norm.num_groups"):
        create_norm_layer("groupnorm", 100, 0, strict=True)
    x = torch.randn(2, 64, 3, 3)
    torch.testing.assert_close(create_norm_layer("groupnorm", 64, 2)(x), F.group_norm(x, 32, eps=1e-5))


def test_layernorm_modes():
    x = torch.randn(3, 6, 4, 4)
    torch.testing.assert_close(create_norm_layer("layernorm", 6, 2)(x), F.layer_norm(x, (6, 4, 4)))
    torch.testing.assert_close(create_norm_layer("layernorm", 6, 2, over="channels")(x),
                               F.layer_norm(x.permute(0, 2, 3, 1), (6,)).permute(0, 3, 1, 2))
    ln = create_norm_layer("layernorm", 6, 0)
    assert set(ln.state_dict()) == {"weight", "bias"}
    v = torch.randn(3, 6)
    torch.testing.assert_close(ln(v), F.layer_norm(v, (6,)))
    ln.eval()
    torch.testing.assert_close(ln(v[:1]), F.layer_norm(v[:1], (6,)))
    with pytest.raises(ValueError, match="norm.over"):
        create_norm_layer("layernorm", 6, 2, over="rows")


def test_weight_std_prepare_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Sequential(nn.Conv1d(8, 4, 1)), nn.Linear(4, 2))
    keys = list(model.state_dict())
    w = model[0].weight.detach().clone()
    assert prepare_model(model) is model
    assert isinstance(model[0], WSConv2d) and isinstance(model[0], nn.Conv2d)
    assert type(model[3]) is nn.Linear
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 5, 5)
    mean = w.mean((1, 2, 3), keepdim=True)
    std = (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5).sqrt()
    torch.testing.assert_close(model[0](x), F.conv2d(x, (w - mean) / std, model[0].bias))
    assert isinstance(create_norm_layer("weight_std", 8, 2), nn.GroupNorm)


def test_prepare_model_is_a_declared_capability_applied_from_the_configured_partial():
    """build_model receives the partial Hydra builds from configs/norm/weight_std.yaml; the
    registry entry behind it declares prepare_model, so the convs become WS convs. Other norms
    leave the model alone."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))
    assert apply_prepare_model(functools.partial(weight_std.build, num_groups=2), model) is model
    assert isinstance(model[0], WSConv2d)
    from shiftlab.trainers.norms import batchnorm

    plain = nn.Sequential(nn.Conv2d(3, 4, 3))
    apply_prepare_model(functools.partial(batchnorm.build, eps=1e-5), plain)
    assert type(plain[0]) is nn.Conv2d


def test_norm_builders_reject_bad_values():
    with pytest.raises(KeyError, match="norm=ghostbn is not allowed; allowed: known norm names: .*ghost_bn"):
        create_norm_layer("ghostbn", 4, 0)
    with pytest.raises(ValueError, match="norm.virtual_batch_size"):
        create_norm_layer("ghost_bn", 4, 0, virtual_batch_size=0)
    with pytest.raises(ValueError, match="norm.r_max"):
        create_norm_layer("batch_renorm", 4, 0, r_max=0.5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_old_norm_factory_target_still_builds_and_rejects_unknown_names():
    with pytest.raises(KeyError, match="ghost_bn"):
        NormFactory("ghostbn")
    layer = NormFactory("batchnorm", sync=False)(8, 2)
    assert type(layer) is nn.BatchNorm2d
