"""GradientTests under DDP on CPU (gloo): two spawned ranks with uneven batches log the same values, and
those equal one process's on the concatenated batch (the batch the DDP step uses)."""
from __future__ import annotations

import math
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from shiftlab.callbacks.gradient_tests import QUANTITIES, GradientTests

SPLIT = (13, 19)  # uneven per-rank batches: 32 examples in all
STEPS = 7
SETTINGS = {
    # every quantity, TIC with the exact Hessian diagonal (83 parameters), the evidence rule on
    "exact": dict(quantities=list(QUANTITIES), hessian_diagonal="exact", hist_bins=20, hist2d_bins=[6, 7],
                  stop_rule="evidence", stop_rule_kwargs={"patience": 100}),
    # TIC with Hutchinson's diagonal: the ranks draw the same probes and average their estimates
    "hutchinson": dict(quantities=["tic_diag", "tic_trace"], hessian_diagonal="hutchinson", hessian_samples=5),
}


def _model() -> nn.Module:
    """float64: tic_diag sums C_jj / H_jj over coordinates where H_jj is near 0 and of either sign, so
    in float32 the summation order alone moves it by ~0.3%; float64 lets the comparison be tight."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, sum(SPLIT), 6, generator=g, dtype=torch.float64)
    return x, (x[..., 0] + 0.5 * torch.randn(STEPS, sum(SPLIT), generator=g) > 0).long() + (x[..., 1] > 1).long()


def _run(model: nn.Module, step_model: nn.Module, lo: int, hi: int, world: int, strategy) -> dict:
    """SGD steps on examples ``lo:hi`` of each batch with both callbacks probing every other step; the
    loss is scaled so that DDP's gradient average equals the gradient of the global mean loss."""
    cbs = {k: GradientTests(every_n_steps=2, max_overhead=None, **v) for k, v in SETTINGS.items()}
    trainer = SimpleNamespace(global_step=0, world_size=world, loggers=[], should_stop=False, strategy=strategy)
    opt = torch.optim.SGD(step_model.parameters(), lr=0.3, momentum=0.5)
    xs, ys = _data()
    for step in range(STEPS):
        x, y = xs[step, lo:hi], ys[step, lo:hi]
        trainer.global_step = step
        for cb in cbs.values():
            cb.on_train_batch_start(trainer, model, (x, y), step)
        loss = F.cross_entropy(step_model(x), y, reduction="sum") * world / sum(SPLIT)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for cb in cbs.values():
            cb.on_train_batch_end(trainer, model, {"loss": loss}, (x, y), step)
    return {k: {"history": [{q: v for q, v in r.items() if not q.startswith("cost/")} for r in cb.history],
                "hists_1d": cb.extras.hists_1d, "hist_2d": cb.extras.hist_2d,
                "rule": None if cb.rule is None else list(cb.rule.values)} for k, cb in cbs.items()}


def _broadcast(obj, src=0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)  # trains; the callbacks probe the module inside
    lo, hi = (0, SPLIT[0]) if rank == 0 else (SPLIT[0], sum(SPLIT))
    result = _run(model, ddp, lo, hi, world, SimpleNamespace(broadcast=_broadcast))
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # every collective done on both ranks before teardown
    dist.destroy_process_group()
    os._exit(0)  # skip the interpreter's C++ teardown (an occasional gloo abort at exit)


def _same(a: list[dict], b: list[dict]) -> bool:
    """Histories equal value for value, bit for bit (NaN equal to NaN)."""
    return len(a) == len(b) and all(
        set(r) == set(q) and all(r[k] == q[k] or (math.isnan(r[k]) and math.isnan(q[k])) for k in r)
        for r, q in zip(a, b))


def _close(a: float, b: float, key: str) -> None:
    if math.isnan(b):
        assert math.isnan(a), key
    else:
        assert a == pytest.approx(b, rel=1e-7, abs=1e-10), key


@pytest.mark.timeout(120)
def test_two_ranks_agree_and_equal_one_process_on_the_union():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    model = _model()
    single = _run(model, model, 0, sum(SPLIT), 1, None)
    for name in SETTINGS:
        r0, r1, ref = ranks[0][name], ranks[1][name], single[name]
        # every rank holds the same values, bit for bit (they come from the same reductions)
        assert _same(r0["history"], r1["history"]) and r0["rule"] == r1["rule"], name
        assert all(torch.equal(a, b) for a, b in zip(r0["hists_1d"], r1["hists_1d"]))
        # ... and they are the single process's on the concatenated batch
        assert [r["step"] for r in r0["history"]] == [r["step"] for r in ref["history"]] == [0, 2, 4, 6]
        for got, want in zip(r0["history"], ref["history"]):
            assert set(got) == set(want), name
            for key in want:
                _close(got[key], want[key], f"{name} step {want['step']} {key}")
        for got, want in zip(r0["hists_1d"], ref["hists_1d"]):
            assert float(got.sum()) == float(want.sum()) == sum(SPLIT) * 83
            assert float((got - want).abs().sum()) <= 2  # a float32 ulp may move an element across an edge
        if r0["hist_2d"] is not None:
            assert r0["hist_2d"][0] == ref["hist_2d"][0] and float((r0["hist_2d"][1] - ref["hist_2d"][1]).abs().sum()) <= 2
    full = single["exact"]["history"]
    # not vacuous: the statistics moved, alpha and update size were filed under their probe steps
    assert {r["step"] for r in full if "alpha" in r} == {0, 2, 4} and "update_size" in full[0]
    assert len({round(r["gsnr"], 6) for r in full}) == 4 and full[-1]["distance"] > 0
    assert all(math.isfinite(r["b_simple"]) and math.isfinite(r["tic_diag"]) for r in full)
    # one rank alone would have measured something else (what the union reduction fixes)
    alone = _run(_model(), _model(), 0, SPLIT[0], 1, None)["exact"]["history"]
    assert abs(alone[0]["norm_test"] - full[0]["norm_test"]) > 1e-3 * abs(full[0]["norm_test"])
