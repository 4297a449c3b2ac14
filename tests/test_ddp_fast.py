"""Fast two-process DDP check (gloo, CPU, no slow mark): gradient scaling of the full-batch path.

Why: the exact full-batch step shards the training set over ranks, divides every shard's loss by
the *global* sample (or token) count and sums the gradients over ranks. Dividing by the local
count, averaging instead of summing, or sharding the wrong way still trains; only a comparison
with one process over all samples catches it. The slow end-to-end test (test_spine_ddp.py) runs
the real launcher; this one drives the modules' own full-batch gradient with a stand-in trainer,
in two spawned processes, in seconds.
"""
from __future__ import annotations

import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from shiftlab.trainers.batching import FullBatch
from shiftlab.trainers.data.base import TensorSplit
from shiftlab.trainers.modules.classification import ClassificationModule
from shiftlab.trainers.models.chain import inference as chain
from shiftlab.trainers.models.crf import LinearChainCRF
from shiftlab.trainers.modules.sequence import SequenceModule

N, CHUNK = 13, 4  # uneven shards (7 and 6 samples) and an uneven last chunk


def _classifier_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)


def _sequence_data():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 7, (N,), generator=g)
    mask = chain.lengths_to_mask(lengths, 6)
    x = torch.randint(0, 5, (N, 6), generator=g).masked_fill(~mask, chain.PAD)
    y = torch.randint(0, 3, (N, 6), generator=g).masked_fill(~mask, chain.PAD)
    return x, y


def _classifier() -> ClassificationModule:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    return ClassificationModule(model, None, None, FullBatch(chunk_size=CHUNK), num_classes=3)


def _tagger() -> SequenceModule:
    torch.manual_seed(0)
    model = LinearChainCRF(5, num_tags=3, embed_dim=4, hidden=6)
    with torch.no_grad():
        model.trans.normal_()
    return SequenceModule(model, None, None, FullBatch(chunk_size=CHUNK), num_classes=3)


def _stand_in_trainer(split: TensorSplit, world: int, rank: int) -> SimpleNamespace:
    def reduce(t, reduce_op="sum"):
        assert reduce_op == "sum"
        t = t.clone()
        dist.all_reduce(t)
        return t

    return SimpleNamespace(datamodule=SimpleNamespace(train_set=split), world_size=world, global_rank=rank,
                           strategy=SimpleNamespace(reduce=reduce))


def _full_gradient(module, split, world: int, rank: int):
    module.trainer = _stand_in_trainer(split, world, rank)
    params = [p for p in module.model.parameters() if p.requires_grad]
    loss = module.full_batch.gradient(module, params, record=False)
    return float(loss), [p.grad.detach().clone() for p in params]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = {"clf": _full_gradient(_classifier(), TensorSplit(*_classifier_data()), world, rank),
           "seq": _full_gradient(_tagger(), TensorSplit(*_sequence_data()), world, rank)}
    # mini-batch DDP on equal shards: the averaged gradient of per-rank mean losses is the
    # gradient of the global mean loss
    x, y = _classifier_data()
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(5, 3))
    nn.functional.cross_entropy(ddp(x[:12][rank::world]), y[:12][rank::world]).backward()
    out["mini"] = [p.grad.clone() for p in ddp.parameters()]
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's C++ teardown: under a loaded full suite a gloo child sometimes aborted
    # at exit ("terminate called without an active exception") after its results were saved and the group
    # destroyed; the results are what the test checks.
    os._exit(0)


def _mean_loss_gradient(module, loss_of) -> tuple[float, list[torch.Tensor]]:
    params = [p for p in module.model.parameters() if p.requires_grad]
    loss = loss_of(module.model)
    return float(loss.detach()), list(torch.autograd.grad(loss, params))


@pytest.mark.timeout(120)
def test_two_rank_full_batch_gradients_equal_one_process_over_all_samples():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]

    x, y = _classifier_data()
    ref_loss, ref = _mean_loss_gradient(_classifier(), lambda m: nn.functional.cross_entropy(m(x), y))
    xs, ys = _sequence_data()
    seq_loss, seq_ref = _mean_loss_gradient(
        _tagger(), lambda m: -m.log_likelihood(xs, xs >= 0, ys).sum() / (xs >= 0).sum())
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    mini_ref = torch.autograd.grad(nn.functional.cross_entropy(lin(x[:12]), y[:12]), list(lin.parameters()))

    for r, got in enumerate(ranks):
        loss, grads = got["clf"]
        assert loss == pytest.approx(ref_loss, rel=1e-6), r  # the summed shard losses: the global mean
        for g, e in zip(grads, ref):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5, msg=lambda m: f"classifier rank {r}: {m}")
        loss, grads = got["seq"]
        assert loss == pytest.approx(seq_loss, rel=1e-6), r  # per token of the whole set
        for g, e in zip(grads, seq_ref):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5, msg=lambda m: f"sequence rank {r}: {m}")
        for g, e in zip(got["mini"], mini_ref):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5, msg=lambda m: f"mini-batch rank {r}: {m}")

    # not vacuous: normalizing each shard by its own size (7 vs 6 samples) gives another gradient
    module = _classifier()
    local = [torch.autograd.grad(nn.functional.cross_entropy(module.model(x[r::2]), y[r::2]),
                                 list(module.model.parameters())) for r in range(2)]
    wrong = [a + b for a, b in zip(*local)]
    assert max(float((w - e).abs().max()) for w, e in zip(wrong, ref)) > 1e-2
