"""Triton BatchNorm modules in use: state dicts, the statistics observer, model conversion,
training next to torch, the norm registry and configs, the torch fallback, torch.compile and the
custom ops' schemas (CPU: Triton interpreter). Kernel numerics are in test_kernels_bn.py."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # CPU: run the Triton kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of kernels

import pytest
import torch.nn.functional as F
from helpers_kernels import check_against_torch, make_input, ours_for, rel_err, torch_twin
from torch import nn

from shiftlab import kernels
from shiftlab.kernels import TritonBatchNorm1d, TritonBatchNorm2d, TritonBatchNormReLU2d, convert_to_triton
from shiftlab.kernels.ops.batchnorm import batch_stats_split


def test_state_dict_parity_with_torch():
    for ours, theirs in [(TritonBatchNorm2d(7), nn.BatchNorm2d(7)),
                         (TritonBatchNorm1d(5, momentum=None), nn.BatchNorm1d(5, momentum=None)),
                         (TritonBatchNorm2d(3, affine=False), nn.BatchNorm2d(3, affine=False)),
                         (TritonBatchNorm2d(3, track_running_stats=False),
                          nn.BatchNorm2d(3, track_running_stats=False))]:
        sd, ref = ours.state_dict(), theirs.state_dict()
        assert list(sd) == list(ref)
        for k in sd:
            assert sd[k].shape == ref[k].shape and sd[k].dtype == ref[k].dtype, k
        theirs.load_state_dict(sd)
        ours.load_state_dict(ref)


def test_stats_observer_gets_batch_stats():
    shape = (4, 3, 5, 5)
    x = make_input(shape, "channels_last")
    seen = []
    m = TritonBatchNorm2d(3)
    m.stats_observer = lambda mean, var: seen.append((mean, var))
    m(x)
    assert len(seen) == 1
    mean, var = seen[0]
    xd = x.double()
    assert rel_err(mean, xd.mean(dim=(0, 2, 3))) < 1e-6
    assert rel_err(var, xd.var(dim=(0, 2, 3), unbiased=False)) < 1e-6
    m.eval()
    m(x)
    assert len(seen) == 1  # eval uses running stats: nothing new to observe
    m.set_stats_observer(None)
    m.train()(x)
    assert len(seen) == 1


def test_convert_to_triton_keeps_state_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6), nn.LayerNorm(6))
    x = torch.randn(5, 3, 6, 6)
    model(x)  # move running stats away from their init
    model.eval()
    expected = model(x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = convert_to_triton(model)
    assert out is model
    assert isinstance(model[1], TritonBatchNorm2d) and isinstance(model[5], TritonBatchNorm1d)
    assert isinstance(model[6], kernels.TritonLayerNorm)
    assert not model[1].training
    assert list(model.state_dict()) == list(sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert rel_err(model(x), expected) < 1e-5


def test_small_model_trained_with_triton_bn_tracks_torch_bn():
    def net(bn1, bn2):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), bn1(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                             bn2(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    ref, ours = net(nn.BatchNorm2d, nn.BatchNorm2d), net(TritonBatchNorm2d, TritonBatchNormReLU2d)
    ours[5] = nn.Identity()  # the fused layer applies the ReLU itself
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 2, 7, 7, generator=g) for _ in range(4)]
    ys = [torch.randint(0, 3, (6,), generator=g) for _ in range(4)]
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    for x, y in zip(xs, ys):
        for model, opt in ((ref, opt_r), (ours, opt_o)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert rel_err(b, a) < 1e-4, k
    ref.eval(), ours.eval()
    assert rel_err(ours(xs[0]), ref(xs[0])) < 1e-4


def test_norm_registry_builds_triton_modules():
    pytest.importorskip("hydra")
    from shiftlab.trainers.norms import norm_builder, norm_names

    assert {"triton_bn", "triton_ln"} <= set(norm_names())
    f = norm_builder("triton_bn", eps=1e-5, momentum=None)
    m = f(6, 2)
    assert isinstance(m, TritonBatchNorm2d) and m.momentum is None
    assert isinstance(f(6, 0), TritonBatchNorm1d) and isinstance(f(6, 1), TritonBatchNorm1d)
    assert isinstance(norm_builder("triton_ln")(6, 2), kernels.TritonChannelLayerNorm)
    with pytest.raises(ValueError, match="norm.over"):
        norm_builder("triton_ln", over="rows")(6, 2)
    with pytest.raises(ValueError, match="dims"):
        f(6, 7)


def test_norm_yaml_configs_instantiate():
    hydra = pytest.importorskip("hydra")
    from omegaconf import OmegaConf

    root = os.path.join(os.path.dirname(__file__), "..", "configs", "norm")
    for name in ("triton_bn", "triton_ln"):
        cfg = OmegaConf.load(os.path.join(root, f"{name}.yaml"))
        factory = hydra.utils.instantiate(cfg)
        layer = factory(4, 2)
        x = torch.randn(3, 4, 5, 5)
        assert layer(x).shape == x.shape


def test_torch_fallback_matches_and_warns(monkeypatch):
    """Outside CUDA and the interpreter the ops run in torch, warning once."""
    from shiftlab.kernels import _backend

    monkeypatch.setattr(_backend, "INTERPRET", False)
    monkeypatch.setattr(_backend, "_warned", False)
    shape = (4, 3, 5, 5)
    with pytest.warns(RuntimeWarning, match="falling back to torch"):
        check_against_torch(make_input(shape, "channels_last"), ours_for(shape), steps=1)
    x = make_input(shape, "contiguous")
    r = make_input(shape, "contiguous", seed=9)
    ours = TritonBatchNormReLU2d(3)
    ref = torch_twin(ours, 4)
    xo, ro = x.clone().requires_grad_(), r.clone().requires_grad_()
    xr, rr = x.double().requires_grad_(), r.double().requires_grad_()
    yo, yr = ours(xo, ro), F.relu(ref(xr) + rr)
    assert rel_err(yo, yr) < 2e-5
    yo.sum().backward(), yr.sum().backward()
    assert rel_err(xo.grad, xr.grad) < 1e-4 and rel_err(ro.grad, rr.grad) < 1e-5


@pytest.mark.slow
def test_torch_compile_fullgraph_cpu(tmp_path, monkeypatch):
    """The custom ops keep torch.compile in one graph (no graph break)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    m = TritonBatchNormReLU2d(3)
    ref = TritonBatchNormReLU2d(3)
    x = make_input((4, 3, 5, 5), "channels_last").requires_grad_()
    fn = torch.compile(lambda t: m(t).square().sum(), fullgraph=True, backend="aot_eager")
    out = fn(x)
    out.backward()
    x2 = x.detach().clone().requires_grad_()
    ref_out = ref(x2).square().sum()
    ref_out.backward()
    assert rel_err(out, ref_out) < 1e-5
    assert rel_err(x.grad, x2.grad) < 1e-5
    assert int(m.num_batches_tracked) == 1
    assert rel_err(m.running_var, ref.running_var) < 1e-6


def test_opcheck_custom_ops():
    x = make_input((3, 4, 5, 5), "channels_last")
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    torch.library.opcheck(torch.ops.shiftlab.bn_fwd.default, (x, w, b, None, None, None, 1e-5, True),
                          test_utils=("test_schema", "test_faketensor"))
    mean, lo, var = batch_stats_split(x)
    for args in [(mean, var, 1e-5, True, True), (mean, var, 1e-5, True, True, lo)]:
        torch.library.opcheck(torch.ops.shiftlab.bn_bwd.default, (torch.randn_like(x), x, w, b, None, *args),
                              test_utils=("test_schema", "test_faketensor"))
    rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.tensor(2)
    torch.library.opcheck(torch.ops.shiftlab.bn_update_running.default,
                          (rm, rv, nbt, mean, var, 0.0, True, 75.0),
                          test_utils=("test_schema", "test_faketensor"))
