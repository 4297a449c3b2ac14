"""In-layer DDP statistics sync on CPU (gloo): 2 spawned ranks vs one process on the concatenated batch."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from shiftlab.trainers.norms.batch_renorm import BatchRenorm
from shiftlab.trainers.norms.noisy_bn import NoisyBatchNorm

SPLIT = (3, 6)  # uneven per-rank batches: 9 samples in all
STEPS = 3


def _variants() -> dict[str, callable]:
    return {
        "noisy_bn_zero_noise": lambda: NoisyBatchNorm(4, n_mu=0.0, n_sigma=1.0, r_mu=0.0, r_sigma=0.0),
        "batch_renorm": lambda: BatchRenorm(4, r_max=1.5, d_max=0.5, warmup_steps=1, r_max_steps=2,
                                            d_max_steps=2, momentum=0.3),
    }


def _model(make_norm) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), make_norm(), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 9, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, sum(SPLIT), 2, 3, 3, generator=g) * 2 + 0.5, torch.randint(0, 3, (STEPS, sum(SPLIT)), generator=g)


def _train(model: nn.Module, xs, ys, lo: int, hi: int, scale: float) -> list[torch.Tensor]:
    """SGD steps; the loss is scaled so DDP's gradient average equals the global mean loss."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    input_grads = []
    for x, y in zip(xs, ys):
        xb = x[lo:hi].clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(xb), y[lo:hi], reduction="sum") * scale
        opt.zero_grad()
        loss.backward()
        input_grads.append(xb.grad.detach().clone())
        opt.step()
    return input_grads


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    xs, ys = _data()
    lo, hi = (0, SPLIT[0]) if rank == 0 else (SPLIT[0], sum(SPLIT))
    results = {}
    for name, make in _variants().items():
        ddp = nn.parallel.DistributedDataParallel(_model(make))
        grads = _train(ddp, xs, ys, lo, hi, scale=world / sum(SPLIT))
        results[name] = {"state": {k: v.clone() for k, v in ddp.module.state_dict().items()}, "input_grads": grads}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # both ranks done with every collective before teardown (gloo aborts a process that tears
    # down its group while the peer is still using the pair)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's C++ teardown: under a loaded full suite a gloo child sometimes aborted
    # at exit ("terminate called without an active exception") after its results were saved and the group
    # destroyed; the results are what the test checks.
    os._exit(0)


@pytest.mark.timeout(120)
def test_two_rank_gloo_sync_matches_single_process_concatenated_batch():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    xs, ys = _data()
    for name, make in _variants().items():
        single = _model(make)
        grads = _train(single, xs, ys, 0, sum(SPLIT), scale=1 / sum(SPLIT))
        ref = single.state_dict()
        for r, (lo, hi) in enumerate([(0, SPLIT[0]), (SPLIT[0], sum(SPLIT))]):
            got = ranks[r][name]
            for k, v in ref.items():
                torch.testing.assert_close(got["state"][k].float(), v.float(), atol=2e-5, rtol=1e-4,
                                           msg=lambda m: f"{name} rank {r} {k}: {m}")
            for step, g in enumerate(grads):
                # each rank's loss carries a factor `world` (undone for parameters by DDP's average)
                torch.testing.assert_close(got["input_grads"][step] / 2, g[lo:hi], atol=1e-6, rtol=1e-4,
                                           msg=lambda m: f"{name} rank {r} input grad step {step}: {m}")
        # the run moved the running stats, so the check is not vacuous
        assert not torch.allclose(ref["1.running_var"], torch.ones(4))
