"""The per-step overhead cuts keep results: the sliced-batch loader forms the batches the per-sample
loader forms, the divergence guard's fused gradient norm equals the per-tensor one, and the
``module.compile_model`` option trains to the same loss."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from shiftlab.callbacks.divergence import grad_norm, optimizer_parameters
from shiftlab.trainers.data import DigitsDataModule, EpochSeededSampler
from shiftlab.trainers.data.base import EpochSeededBatches, collate_batch


def _per_sample_batches(split, batch_size: int, seed: int, epoch: int, skip=None):
    sampler = EpochSeededSampler(len(split), seed, skip=skip)
    sampler.set_epoch(epoch)
    return list(DataLoader(split, batch_size=batch_size, sampler=sampler, collate_fn=collate_batch))


@pytest.mark.parametrize("batch_size", [32, 100, 2000])
def test_sliced_batches_equal_per_sample_batches(batch_size):
    dm = DigitsDataModule(batch_size=batch_size, seed=3)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochSeededBatches)  # no trainer: the single-process path
    for epoch in (0, 1, 5):
        loader.sampler.set_epoch(epoch)
        fast = list(loader)
        slow = _per_sample_batches(dm.train_set, batch_size, 3, epoch)
        assert len(fast) == len(slow) == len(loader)
        for (xf, yf), (xs, ys) in zip(fast, slow):
            assert torch.equal(xf, xs) and torch.equal(yf, ys)
    assert not torch.equal(fast[0][1], _per_sample_batches(dm.train_set, batch_size, 3, 4)[0][1])


def test_sliced_batches_resume_mid_epoch_like_the_sampler():
    dm = DigitsDataModule(batch_size=32, seed=1)
    dm.setup()
    dm.skip_train_batches(epoch=2, batches=7)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    resumed = list(loader)
    slow = _per_sample_batches(dm.train_set, 32, 1, 2, skip=(2, 7 * 32))
    full = _per_sample_batches(dm.train_set, 32, 1, 2)
    assert len(resumed) == len(slow) == len(full) - 7
    assert all(torch.equal(a[1], b[1]) for a, b in zip(resumed, full[7:]))
    loader.sampler.set_epoch(3)  # the skip applies once
    assert len(list(loader)) == len(full)


def test_fused_grad_norm_equals_per_tensor_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    model(torch.randn(4, 5)).square().sum().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per_tensor = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert torch.allclose(grad_norm(optimizer_parameters(opt)), per_tensor, rtol=1e-6)
    model[0].weight.grad[0, 0] = float("inf")
    assert not torch.isfinite(grad_norm(optimizer_parameters(opt)))
    half = [torch.full((4,), 60000.0, dtype=torch.float16)]  # finite, but its norm overflows fp16

    class P:
        grad = half[0]
    assert torch.isfinite(grad_norm([P()]))


@pytest.mark.slow
def test_compiled_model_trains_to_the_same_loss(tmp_path):
    """``module.compile_model=true`` (inductor on this CPU) against eager: same losses within float
    reassociation after one epoch on digits."""
    from conftest import QUIET, compose_cfg

    from shiftlab.trainers.train import train

    common = QUIET + ["trainer.max_epochs=1", "+trainer.limit_train_batches=8", "callbacks=none", "test=false",
                      "trainer.enable_checkpointing=false", "model.hidden=[16]"]
    from torch._dynamo.utils import counters

    eager = train(compose_cfg(common, tmp_path / "eager"))
    counters.clear()
    compiled = train(compose_cfg(common + ["module.compile_model=true"], tmp_path / "compiled"))
    assert eager["status"] == compiled["status"] == "completed", compiled.get("stop_reason")
    assert counters["stats"]["unique_graphs"] > 0  # the forward really went through the compiler
    for key in ("train/loss", "val/loss"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4), key


def test_sliced_batches_draw_the_order_when_iterated_not_when_made():
    """A resumed Lightning run makes the loader's iterator before ``set_epoch``; the order must be
    that of the epoch set by then (the resume tests' exactness rests on it)."""
    dm = DigitsDataModule(batch_size=64, seed=2)
    dm.setup()
    loader = dm.train_dataloader()
    it = iter(loader)
    loader.sampler.set_epoch(3)
    assert torch.equal(next(it)[1], _per_sample_batches(dm.train_set, 64, 2, 3)[0][1])


def test_ddp_and_overfit_batches_keep_the_per_sample_sampler():
    """Lightning re-shards (DDP) or replaces (overfit_batches) a per-sample sampler; a batch
    sampler would be split by batches instead, so those runs keep the per-sample path."""
    from types import SimpleNamespace

    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    for world_size, overfit in ((2, 0), (1, 2), (1, 0.5)):
        dm.trainer = SimpleNamespace(world_size=world_size, overfit_batches=overfit)
        assert isinstance(dm.train_dataloader().sampler, EpochSeededSampler), (world_size, overfit)
    dm.trainer = SimpleNamespace(world_size=1, overfit_batches=0)
    assert isinstance(dm.train_dataloader().sampler, EpochSeededBatches)
