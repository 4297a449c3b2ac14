"""TIC, gradient histograms, distance and update size: plain functions against explicit loops and the
papers' formulas, then through the GradientTests callback (values, exact resume, PNG of a real run)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_hessian import dense_hessian
from torch import nn

from shiftlab.callbacks import gradient_histograms as gh
from shiftlab.callbacks import gradient_stats as gs
from shiftlab.callbacks import tic
from shiftlab.callbacks import trajectory_stats as ts
from shiftlab.callbacks.gradient_tests import GradientTests

EXTRAS = ["tic_diag", "tic_trace", "grad_hist_1d", "grad_hist_2d", "distance", "update_size"]


def _tiny(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    return model, torch.randn(7, 4) * 2, torch.randint(0, 3, (7,))


def _loop_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each example's own gradient by a plain backward pass per example."""
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows).double()


def test_tic_against_explicit_c_and_exact_hessian():
    model, x, y = _tiny()
    G = _loop_gradients(model, x, y)
    C = G.T @ G / G.shape[0]  # uncentered second moment, explicit
    H = dense_hessian(model, x, y).double()
    want_diag = float((C.diagonal() / (H.diagonal() + 1e-7)).sum())
    want_trace = float(C.trace() / (H.trace() + 1e-7))
    G_func, _ = gs.per_example_gradients(model, x, y)
    c = tic.second_moment_diagonal(G_func)
    torch.testing.assert_close(c, C.diagonal(), rtol=1e-5, atol=1e-9)
    hd = tic.hessian_diagonal_exact(model, x, y, chunk_size=10)  # several chunks
    assert hd.method == "exact" and hd.hvps == H.shape[0] and hd.trace_samples is None
    torch.testing.assert_close(hd.diag.double(), H.diagonal(), rtol=1e-4, atol=1e-6)
    assert tic.tic_diag(c, hd.diag) == pytest.approx(want_diag, rel=1e-4)
    assert tic.tic_trace(c, hd.diag) == pytest.approx(want_trace, rel=1e-5)
    assert tic.tic_trace_se(1.0, None) == 0.0
    # the tiny net has zero curvature on no coordinate, so the two forms differ
    assert abs(want_diag - want_trace) > 1e-3 * abs(want_trace)


def test_hutchinson_diagonal_is_unbiased_within_its_own_error():
    model, x, y = _tiny(1)
    H = dense_hessian(model, x, y).double()
    m = 3000
    hd = tic.hessian_diagonal_hutchinson(model, x, y, samples=m, generator=torch.Generator().manual_seed(3))
    assert hd.method == "hutchinson" and hd.trace_samples.shape == (m,)
    # per coordinate, v_j (Hv)_j = H_jj + sum_{k != j} H_jk v_j v_k: variance sum_{k != j} H_jk^2
    sd = ((H ** 2).sum(1) - H.diagonal() ** 2).sqrt() / math.sqrt(m)
    err = (hd.diag.double() - H.diagonal()).abs()
    assert bool((err <= 5 * sd + 1e-6).all()), float((err / (sd + 1e-12)).max())
    assert float(err.max()) > 0  # an estimate, not the exact diagonal
    se = float(hd.trace_samples.std() / math.sqrt(m))
    assert abs(float(hd.trace_samples.mean()) - float(H.trace())) <= 5 * se
    value = 2.5
    assert tic.tic_trace_se(value, hd.trace_samples) == pytest.approx(
        value * se / abs(float(hd.trace_samples.mean())), rel=1e-9)
    auto = tic.hessian_diagonal(model, x, y, max_exact_params=10, samples=4)
    assert auto.method == "hutchinson" and tic.hessian_diagonal(model, x, y).method == "exact"
    with pytest.raises(ValueError, match="allowed"):
        tic.hessian_diagonal(model, x, y, method="gauss")


def test_histograms_against_loops_over_examples():
    model, x, y = _tiny(2)
    G = gs.per_example_gradients(model, x, y)[0] * 3  # spread some elements beyond the range
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) * 4
    bins, rng = 9, (-0.5, 0.7)
    want = np.zeros(bins)
    edges = np.linspace(*rng, bins + 1)
    for i in range(G.shape[0]):
        want += np.histogram(np.clip(G[i].numpy(), *rng), bins=edges)[0]
    got = gh.histogram_1d(G, bins, rng)
    np.testing.assert_allclose(got.numpy(), want)
    assert got.sum() == G.numel() and (G.abs() > 0.7).any()  # clipped outliers are counted
    (bx, by), r2 = (5, 6), ((-0.3, 0.3), (-1.0, 1.0))
    want2 = np.zeros((bx, by))
    for i in range(G.shape[0]):
        for j in range(G.shape[1]):
            gx, py = np.clip(float(G[i, j]), *r2[0]), np.clip(float(flat[j]), *r2[1])
            want2 += np.histogram2d([gx], [py], bins=[bx, by], range=r2)[0]
    np.testing.assert_allclose(gh.histogram_2d(G, flat, (bx, by), r2).numpy(), want2)
    with pytest.raises(ValueError):
        gh.histogram_1d(G, 0, rng)
    with pytest.raises(ValueError):
        gh.histogram_2d(G, flat[:-1], (bx, by), r2)


def test_distance_and_update_size_against_flat_norms():
    model, x, y = _tiny(3)
    init = ts.parameter_copy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        before = ts.parameter_copy(model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    flat = lambda d: torch.cat([v.reshape(-1) for v in d.values()]).double()  # noqa: E731
    now = ts.parameter_copy(model)
    dist = ts.distance_from_init(model, init)
    upd = ts.update_size(model, before)
    assert dist["total"] == pytest.approx(float((flat(now) - flat(init)).norm()), rel=1e-9)
    assert upd["total"] == pytest.approx(float((flat(now) - flat(before)).norm()), rel=1e-9)
    for name in init:
        assert dist[name] == pytest.approx(float((now[name].double() - init[name].double()).norm()), rel=1e-9)
    assert dist["total"] > upd["total"] > 0  # three steps went further than the last one


def _fake_trainer(step: int = 0):
    return SimpleNamespace(global_step=step, world_size=1, loggers=[], should_stop=False)


def _batches(steps: int):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(steps)]


def _drive(cb_for_step, model, opt, batches, first: int = 0):
    trainer = _fake_trainer()
    for step, (x, y) in enumerate(batches[first:], start=first):
        cb = cb_for_step(step)
        trainer.global_step = step
        cb.on_train_batch_start(trainer, model, (x, y), step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cb.on_train_batch_end(trainer, model, {"loss": loss}, (x, y), step)


def _net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


def _values(history):
    return [{k: v for k, v in r.items() if not k.startswith("cost/")} for r in history]


def test_callback_values_and_exact_resume(tmp_path):
    kw = dict(every_n_steps=2, quantities=["gsnr", *EXTRAS], max_overhead=None,
              hessian_diagonal="hutchinson", hessian_samples=6, hist_bins=12, hist2d_bins=[4, 5])
    batches = _batches(9)
    model, opt = _net()
    init = ts.parameter_copy(model)
    whole = GradientTests(**kw)
    _drive(lambda s: whole, model, opt, batches)
    assert [r["step"] for r in whole.history] == [0, 2, 4, 6, 8]
    assert all("update_size" in r for r in whole.history[:-1]) and "update_size" not in whole.history[-1]
    assert whole.history[0]["distance"] == 0.0 and whole.history[-1]["distance"] > 0
    assert len(whole.extras.hists_1d) == 5 and whole.extras.hist_2d[0] == 8
    assert all(float(h.sum()) == 16 * 83 for h in whole.extras.hists_1d)  # N x P elements each
    # the probe at step 8 matches the plain functions on that batch at those parameters
    x8, y8 = batches[8]
    model8, _ = _net()
    _drive(lambda s: GradientTests(every_n_steps=0), model8, torch.optim.SGD(model8.parameters(), lr=0.2,
           momentum=0.9), batches[:8])
    G = gs.per_example_gradients(model8, x8, y8)[0]
    hd = tic.hessian_diagonal_hutchinson(model8, x8, y8, samples=6, generator=torch.Generator().manual_seed(8))
    c = tic.second_moment_diagonal(G)
    last = whole.history[-1]
    assert last["tic_trace"] == pytest.approx(tic.tic_trace(c, hd.diag), rel=1e-6)
    assert last["tic_diag"] == pytest.approx(tic.tic_diag(c, hd.diag), rel=1e-6)
    assert last["tic_trace_se"] == pytest.approx(tic.tic_trace_se(last["tic_trace"], hd.trace_samples), rel=1e-6)
    assert last["distance"] == pytest.approx(ts.distance_from_init(model8, init)["total"], rel=1e-9)
    assert last["distance/0.weight"] == pytest.approx(ts.distance_from_init(model8, init)["0.weight"], rel=1e-9)
    torch.testing.assert_close(whole.extras.hists_1d[-1], gh.histogram_1d(G, 12, (-2, 2)))
    # resume after the probe at step 4: the initial parameters and the pending update-size start
    # come back from the saved state, and the run continues as if never stopped
    model, opt = _net()
    first, second = GradientTests(**kw), GradientTests(**kw)
    _drive(lambda s: first, model, opt, batches[:5])
    assert first.extras.update_start["step"] == 4
    torch.save(first.state_dict(), tmp_path / "cb.pt")
    second.load_state_dict(torch.load(tmp_path / "cb.pt", weights_only=True))  # as checkpoints load
    _drive(lambda s: second, model, opt, batches, first=5)
    assert _values(second.history) == _values(whole.history)
    for a, b in zip(second.extras.hists_1d, whole.extras.hists_1d):
        assert torch.equal(a, b)
    assert torch.equal(second.extras.hist_2d[1], whole.extras.hist_2d[1])
    items = second.summary_items()
    assert items["grad_tests/tic_hessian_diagonal"] == "hutchinson" and items["grad_tests/distance_from_step"] == 0
    assert "grad_tests/distance/0.weight" not in items and "grad_tests/distance" in items
    png = second.extras.save_plot(tmp_path)
    assert png.name == "gradient_histograms.png" and png.stat().st_size > 1000


def test_default_set_unchanged_and_bad_values_are_one_line():
    cb = GradientTests()
    assert cb.quantities == ["b_simple", "norm_test", "inner_product_test", "orthogonality_test", "gsnr",
                             "eb_criterion", "alpha"]
    assert cb.extras.wanted == []
    for kwargs, key in [({"hessian_diagonal": "gauss"}, "hessian_diagonal=gauss"),
                        ({"hessian_samples": 1}, "hessian_samples=1"),
                        ({"hist_bins": 0}, "hist_bins=0"),
                        ({"hist_range": [2, 1]}, "hist_range=[2, 1]"),
                        ({"hist2d_bins": [40]}, "hist2d_bins=[40]"),
                        ({"hist2d_range": [[0, 1]]}, "hist2d_range=[[0, 1]]"),
                        ({"quantities": ["tic"]}, "quantities=")]:
        with pytest.raises(ValueError, match="allowed") as err:
            GradientTests(**kwargs)
        assert str(err.value).startswith(f"callbacks.gradient_tests.{key}") and "\n" not in str(err.value)


def _callback_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return next(v for k, v in ckpt["callbacks"].items() if k.startswith("GradientTests"))


@pytest.mark.timeout(240)
def test_run_writes_png_logs_new_quantities_and_resumes_exactly(tmp_path):
    """A real run with every new quantity, and one interrupted after its first epoch (whose last step,
    2, is a probe: its update size is pending in the checkpoint) then resumed: the same values."""
    from conftest import QUIET, compose_cfg
    from shiftlab.trainers.train import train

    quiet = [o for o in QUIET if not o.startswith("callbacks=")]
    common = quiet + ["trainer.max_epochs=2", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1",
                      "test=false", "trainer.deterministic=true", "callbacks=gradient_tests",
                      "callbacks.gradient_tests.every_n_steps=2", "callbacks.gradient_tests.max_overhead=null",
                      f"callbacks.gradient_tests.quantities=[gsnr,{','.join(EXTRAS)}]"]
    s = train(compose_cfg(common, tmp_path / "full"))
    for q in ("gsnr", "tic_diag", "tic_trace", "tic_trace_se", "distance", "update_size"):
        assert isinstance(s[f"grad_tests/{q}"], float), q
    assert s["grad_tests/probes"] == 3 and s["grad_tests/distance"] > 0  # steps 0, 2, 4
    assert s["grad_tests/tic_hessian_diagonal"] in ("layers", "exact", "hutchinson")
    png = tmp_path / "full" / "plots" / "gradient_histograms.png"
    assert png.exists() and png.stat().st_size > 1000
    train(compose_cfg(common + ["+callbacks.stop._target_=helpers_callbacks.StopAfterEpoch",
                                "+callbacks.stop.epoch=0"], tmp_path / "part"))
    part = _callback_state(tmp_path / "part")
    assert part["extras"]["update_start"]["step"] == 2 and part["extras"]["init"] is not None
    train(compose_cfg(common + [f"ckpt_path={tmp_path}/part/checkpoints/last.ckpt"], tmp_path / "resumed"))
    full, resumed = _callback_state(tmp_path / "full"), _callback_state(tmp_path / "resumed")
    assert _values(resumed["history"]) == _values(full["history"])
    assert "update_size" in resumed["history"][1]  # step 2's, measured after the resume
    assert all(torch.equal(a, b) for a, b in zip(resumed["extras"]["hists_1d"], full["extras"]["hists_1d"]))


def test_tic_layer_path_is_the_exact_hessian_diagonal_and_needs_no_per_example_gradients():
    """ReLU net: auto takes the layer-factor Gauss-Newton diagonal, equal to the dense Hessian's diagonal
    (and to the torch.func reference) to 1e-5; C comes from the moments, and the callback forms no G."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(9, 4, dtype=torch.double), torch.randint(0, 3, (9,))
    H = dense_hessian(model, x, y).double()
    hd = tic.hessian_diagonal(model, x, y)
    assert hd.method == "layers" and hd.hvps == 0 and hd.fallback_reason is None
    torch.testing.assert_close(hd.diag, H.diagonal(), rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(hd.diag, tic.hessian_diagonal_exact(model, x, y).diag, rtol=1e-5, atol=1e-10)
    assert tic.hessian_diagonal(model, x, y, nn.CrossEntropyLoss()).method == "layers"
    other = tic.hessian_diagonal(model, x, y, lambda o, t: F.cross_entropy(o, t, reduction="sum"))
    assert other.method == "exact" and "cross-entropy" in other.fallback_reason
    tanh = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    fb = tic.hessian_diagonal(tanh, x, y)
    assert fb.method == "exact" and "Tanh" in fb.fallback_reason
    with pytest.raises(ValueError, match="Tanh"):
        tic.hessian_diagonal(tanh, x, y, method="layers")
    # the callback: the same TIC as from the loop's C and the dense diagonal, without forming G
    G = _loop_gradients(model, x, y)
    c = G.square().mean(0)
    cb = GradientTests(every_n_steps=1, quantities=["tic_diag", "tic_trace"], max_overhead=None)
    values, cost, (_, G_cb) = cb.measure(model, x, y)
    assert G_cb is None and values["layer_path"] == 1.0 and cb.extras.hessian_used == "layers"
    assert values["tic_trace"] == pytest.approx(float(c.sum() / (H.trace() + 1e-7)), rel=1e-5)
    assert values["tic_diag"] == pytest.approx(float((c / (H.diagonal() + 1e-7)).sum()), rel=1e-5)
    assert values["tic_trace_se"] == 0.0 and cost["hessian_diagonal"] > 0


def test_fast_2d_histogram_matches_histogramdd_and_loops():
    torch.manual_seed(6)
    G = torch.randn(21, 37) * 0.6
    G[:, :5] = 0.0  # dead units: exact zeros sit on an interior bin edge
    G[3, 7], G[4, 8] = 1.0, -1.0  # the range's edges
    flat = torch.randn(37) * 1.5
    flat[0] = 0.0
    bins, r2 = (8, 6), ((-1.0, 1.0), (-2.0, 2.0))
    fast, ref = gh.histogram_2d(G, flat, bins, r2), gh.histogram_2d_reference(G, flat, bins, r2)
    torch.testing.assert_close(fast, ref, rtol=0, atol=0)
    want = np.zeros(bins)
    for i in range(G.shape[0]):
        for j in range(G.shape[1]):
            gx, py = np.clip(float(G[i, j]), *r2[0]), np.clip(float(flat[j]), *r2[1])
            want += np.histogram2d([gx], [py], bins=list(bins), range=r2)[0]
    np.testing.assert_allclose(fast.numpy(), want)
    assert fast.sum() == G.numel() and (G.abs() > 1).any() and (flat.abs() > 2).any()
    # more rows than one block, float64 input: the same counts as the plain formula
    G64 = torch.randn(3 * gh.ROWS + 5, 11, dtype=torch.double)
    np.testing.assert_allclose(gh.histogram_1d(G64, 7, (-1.5, 1.5)).numpy(),
                               np.histogram(G64.float().clamp(-1.5, 1.5).numpy(), 7, (-1.5, 1.5))[0])


def test_distance_and_update_size_alone_do_no_per_example_pass():
    model, x, y = _tiny(5)
    cb = GradientTests(every_n_steps=1, quantities=["distance", "update_size"], max_overhead=None)
    cb.extras.before_step(model, 0)
    values, cost, (losses, G) = cb.measure(model, x, y)
    assert losses is None and G is None and "per_example_gradients" not in cost and "layer_path" not in values
    assert values["distance"] == 0.0 and set(cost) == {"distance", "update_size_copy"}
