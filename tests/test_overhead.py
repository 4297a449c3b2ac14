"""The per-step overhead cuts keep results: the sliced-batch loader forms the batches the per-sample
loader forms, the divergence guard's fused gradient norm equals the per-tensor one, the running
training metrics equal torchmetrics' ones, ``module.manual_optimization`` trains and resumes exactly
as the automatic loop does, and the ``module.compile_model`` option trains to the same loss."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from shiftlab.callbacks.divergence import StepGradNorm, grad_norm, optimizer_parameters
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


def test_step_grad_norm_equals_grad_norm_and_follows_the_optimizer():
    """The guard's per-step norm is grad_norm's value bit for bit (fp32: the fast path; a float64 tensor among
    them or an fp16 gradient: grad_norm itself), sees a non-finite gradient, skips parameters without a
    gradient and re-reads the parameters when a param group is added."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3))
    opt = torch.optim.Adam(list(model[0].parameters()) + list(model[1].parameters()), lr=0.1)
    model(torch.randn(4, 5)).square().sum().backward()
    norm = StepGradNorm()
    assert torch.equal(norm(opt), grad_norm(optimizer_parameters(opt)))
    model[1].bias.grad = None
    assert torch.equal(norm(opt), grad_norm(optimizer_parameters(opt)))
    opt.add_param_group({"params": list(model[2].parameters())})
    assert torch.equal(norm(opt), grad_norm(optimizer_parameters(opt)))
    assert norm(opt) > grad_norm(list(model[0].parameters()) + list(model[1].parameters()))
    model[2].weight.grad[0, 0] = float("nan")
    assert not torch.isfinite(norm(opt))
    extra = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    extra.grad = torch.full((3,), 2.0, dtype=torch.float64)
    model[2].weight.grad[0, 0] = 1.0
    opt.add_param_group({"params": [extra]})
    assert torch.equal(norm(opt), grad_norm(optimizer_parameters(opt)))
    half = torch.nn.Parameter(torch.full((4,), 60000.0, dtype=torch.float16))  # its fp16 norm would overflow
    half.grad = half.detach().clone()
    only_half = torch.optim.SGD([half], lr=0.1)
    assert torch.equal(norm(only_half), grad_norm([half])) and torch.isfinite(norm(only_half))


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


def test_running_metrics_equal_torchmetrics():
    """RunningMean / RunningAccuracy give MeanMetric's / micro MulticlassAccuracy's values bit for bit
    (uneven batches, float and integer weights), and reset like them."""
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy

    from shiftlab.trainers.modules.running import RunningAccuracy, RunningMean

    g = torch.Generator().manual_seed(0)
    ours_loss, ref_loss = RunningMean(), MeanMetric()
    ours_acc, ref_acc = RunningAccuracy(), MulticlassAccuracy(7, average="micro")
    for n in (64, 64, 17, 1, 33):
        logits, y = torch.randn(n, 7, generator=g), torch.randint(0, 7, (n,), generator=g)
        loss = torch.nn.functional.cross_entropy(logits, y)
        weight = n if n % 2 else torch.tensor(n)  # an int (classification) or a tensor (token counts)
        ours_loss.update(loss, weight)
        ref_loss.update(loss, weight=weight)
        ours_acc.update(logits, y)
        ref_acc.update(logits, y)
        assert torch.equal(ours_loss.compute(), ref_loss.compute())
        assert torch.equal(ours_acc.compute(), ref_acc.compute())
    assert 0 < float(ours_acc.compute()) < 1
    ours_loss.reset(), ours_acc.reset()
    ours_loss.update(torch.tensor(2.0), 3)
    ours_acc.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    assert float(ours_loss.compute()) == 2.0 and float(ours_acc.compute()) == 1.0


def test_mid_epoch_checkpoint_with_the_former_accuracy_metric_resumes_its_counts():
    """A mid-epoch checkpoint holding a micro MulticlassAccuracy's states (tp, fp, tn, fn: runs before
    RunningAccuracy) restores the partial epoch's accuracy into RunningAccuracy."""
    from torchmetrics.classification import MulticlassAccuracy

    from conftest import QUIET, compose_cfg
    from shiftlab.callbacks.run_contract import _train_metrics
    from shiftlab.experiments import harness

    module = harness.build(compose_cfg(QUIET))[1]
    old = MulticlassAccuracy(10, average="micro", validate_args=False)
    logits, y = torch.randn(50, 10, generator=torch.Generator().manual_seed(1)), torch.arange(50) % 10
    old.update(logits, y)
    ckpt = {"shiftlab_mid_epoch": {"epoch": 1, "batches_done": 3, "train_metrics": {
        "train_acc": {k: v.clone() for k, v in old.metric_state.items()},
        "train_loss": {"mean_value": torch.tensor(6.0), "weight": torch.tensor(3.0)}}}}
    module.on_load_checkpoint(ckpt)
    states = ckpt["shiftlab_mid_epoch"]["train_metrics"]
    for name, metric in _train_metrics(module):  # what RunContract does with them
        for k, v in states[name].items():
            setattr(metric, k, v)
    assert torch.equal(module.train_acc.compute(), old.compute())
    assert float(module.train_loss.compute()) == 2.0


MANUAL_COMMON = ["trainer.max_epochs=3", "trainer.deterministic=true", "optimizer=momentum", "data.label_noise=0.2",
                 "model.hidden=[32]"]


def _state(path):
    return torch.load(path, weights_only=False)["state_dict"]


def test_manual_optimization_trains_exactly_as_the_automatic_loop(tmp_path):
    """Same weights, metrics, global step and learning-rate schedule (cosine, stepped per epoch) with
    ``module.manual_optimization=true`` as with Lightning's automatic loop; with Lightning's gradient
    clipping or accumulation configured, or under DDP, the module keeps the automatic loop."""
    from conftest import QUIET, compose_cfg

    from shiftlab.trainers.train import train

    common = QUIET + MANUAL_COMMON + ["callbacks=default", "callbacks.diagnosis=null"]
    auto = train(compose_cfg(common, tmp_path / "auto"))
    manual = train(compose_cfg(common + ["module.manual_optimization=true"], tmp_path / "manual"))
    assert auto["status"] == manual["status"] == "completed"
    assert manual["global_step"] == auto["global_step"] > 3
    for key in ("train/loss", "train/loss_epoch_mean", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert manual[key] == auto[key], key
    a, m = _state(tmp_path / "auto/checkpoints/last.ckpt"), _state(tmp_path / "manual/checkpoints/last.ckpt")
    assert all(torch.equal(a[k], m[k]) for k in a)
    ckpts = [torch.load(tmp_path / f"{k}/checkpoints/last.ckpt", weights_only=False) for k in ("auto", "manual")]
    assert ckpts[0]["lr_schedulers"] == ckpts[1]["lr_schedulers"]  # the cosine schedule stepped alike
    assert ckpts[0]["lr_schedulers"][0]["last_epoch"] == 3
    assert ckpts[0]["optimizer_states"][0]["param_groups"] == ckpts[1]["optimizer_states"][0]["param_groups"]

    from types import SimpleNamespace

    from shiftlab.experiments import harness

    clip = compose_cfg(common + ["module.manual_optimization=true", "+trainer.gradient_clip_val=0.5"],
                       tmp_path / "clip")
    module = harness.build(clip)[1]
    for clip_val, accumulate, world, automatic in ((None, 1, 1, False), (0.5, 1, 1, True), (None, 2, 1, True),
                                                   (0.0, 1, 1, False), (None, 1, 2, True)):
        module._trainer = SimpleNamespace(gradient_clip_val=clip_val, accumulate_grad_batches=accumulate,
                                          world_size=world)
        assert module.automatic_optimization is automatic, (clip_val, accumulate, world)
    clipped = train(clip)  # Lightning would refuse clipping under manual optimization
    assert clipped["status"] == "completed" and clipped["val/loss"] != auto["val/loss"]


def test_manual_optimization_resumes_exactly(tmp_path):
    """A run stopped after epoch 0 and resumed from last.ckpt, or preempted mid-epoch and resumed from
    its interrupted.ckpt, ends where the uninterrupted run ends (weights bit for bit, metrics, step
    count), under ``module.manual_optimization=true`` and across a change of the setting between the
    interrupted and the resumed run (the step count moves to the loop that resumes)."""
    import signal

    from conftest import QUIET, compose_cfg

    from shiftlab.trainers.train import train

    common = QUIET + MANUAL_COMMON + ["callbacks=default", "callbacks.diagnosis=null"]
    manual = ["module.manual_optimization=true"]
    full = train(compose_cfg(common + manual, tmp_path / "full"))
    stops = {"epoch": ["+callbacks.stop._target_=helpers_callbacks.StopAfterEpoch", "+callbacks.stop.epoch=0"],
             "signal": ["+callbacks.sig._target_=helpers_callbacks.SignalAt", "+callbacks.sig.epoch=1",
                        "+callbacks.sig.batch=5", f"+callbacks.sig.signum={int(signal.SIGTERM)}"]}
    cases = {"manual_signal": (manual, "signal", manual), "auto_epoch_to_manual": ([], "epoch", manual),
             "manual_signal_to_auto": (manual, "signal", [])}
    for name, (first, stop, then) in cases.items():
        part = train(compose_cfg(common + first + stops[stop], tmp_path / f"part_{name}"))
        assert part["global_step"] < full["global_step"], name
        ckpt = part.get("resume_from") or tmp_path / f"part_{name}/checkpoints/last.ckpt"
        resumed = train(compose_cfg(common + then + [f"ckpt_path={ckpt}"], tmp_path / f"resumed_{name}"))
        assert resumed["status"] == "completed" and resumed["global_step"] == full["global_step"], name
        for key in ("train/loss", "train/loss_epoch_mean", "val/loss", "val/acc", "test/loss"):
            assert resumed[key] == full[key], (name, key)
        a, b = _state(tmp_path / "full/checkpoints/last.ckpt"), _state(tmp_path / f"resumed_{name}/checkpoints/last.ckpt")
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_step_progress_moves_to_the_resuming_loop():
    from shiftlab.trainers.modules.base import adopt_step_progress

    done = {"total": {"ready": 60, "completed": 60}, "current": {"ready": 20, "completed": 20}}
    empty = {"total": {"ready": 0, "completed": 0}, "current": {"ready": 0, "completed": 0}}
    auto_key, manual_key = "epoch_loop.automatic_optimization.optim_progress", "epoch_loop.manual_optimization.optim_step_progress"
    fit = {auto_key: {"optimizer": {"step": done}}, manual_key: empty}
    adopt_step_progress(fit, manual=False)
    assert fit[manual_key] == empty  # the automatic loop resumes its own count
    adopt_step_progress(fit, manual=True)
    assert fit[manual_key] == done and fit[manual_key] is not done
    fit = {auto_key: {"optimizer": {"step": empty}}, manual_key: done}
    adopt_step_progress(fit, manual=True)
    assert fit[auto_key]["optimizer"]["step"] == empty
    adopt_step_progress(fit, manual=False)
    assert fit[auto_key]["optimizer"]["step"] == done
    adopt_step_progress({}, manual=True)  # not a Lightning 2.x fit loop: left alone
