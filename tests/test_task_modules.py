"""The task modules (``module=classification|sequence``) on their shared base: checkpoints written
before the refactor still load, and both tasks follow one logging policy (train figures logged
once per epoch, not every step)."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import QUIET, compose_cfg
from shiftlab.trainers.build import build_datamodule, build_module
from shiftlab.trainers.modules.base import TaskModule

CHAIN = ["data.num_sequences=40", "data.length=6", "data.min_length=3"]

# state_dict keys and shapes of these configs' modules as written by trainers/module.py and
# trainers/pgm_module.py before they became trainers/modules/ (dumped from that code at commit da04468)
OLD_LAYOUT = {
    ("data=synthetic", "model.hidden=[8]", "norm=batchnorm"): {
        "model.net.1.weight": (8, 20), "model.net.1.bias": (8,), "model.net.2.weight": (8,),
        "model.net.2.bias": (8,), "model.net.2.running_mean": (8,), "model.net.2.running_var": (8,),
        "model.net.2.num_batches_tracked": (), "model.net.4.weight": (4, 8), "model.net.4.bias": (4,)},
    ("experiment=pgm_crf", *CHAIN): {
        "model.trans": (4, 4), "model.start": (4,), "model.end": (4,), "model.encoder.embed.weight": (13, 32),
        "model.encoder.body.0.weight": (64, 32, 3), "model.encoder.body.0.bias": (64,),
        "model.encoder.head.weight": (4, 64), "model.encoder.head.bias": (4,)},
    ("experiment=pgm_hmm", *CHAIN): {
        "model.start_logits": (4,), "model.trans_logits": (4, 4), "model.emit_logits": (4, 12)},
}


@pytest.mark.parametrize("overrides", list(OLD_LAYOUT), ids=lambda o: o[0])
def test_state_dicts_in_the_old_key_layout_load_strictly(overrides):
    cfg = compose_cfg(QUIET + list(overrides))
    dm = build_datamodule(cfg)
    dm.setup("fit")
    module = build_module(cfg, dm)
    assert isinstance(module, TaskModule)
    g = torch.Generator().manual_seed(0)
    old = {k: (torch.randint(0, 5, s, generator=g) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g))
           for k, s in OLD_LAYOUT[overrides].items()}
    module.load_state_dict(old, strict=True)  # no missing or unexpected key
    for k, v in module.state_dict().items():
        assert torch.equal(v, old[k].to(v.dtype)), k


class _LogCalls(L.Callback):
    """Counts the module's ``log`` calls per key, and the (loss, units) of each training step."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.steps: list[tuple[float, float]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        log = pl_module.log

        def counting(name, *a, **kw):
            self.calls[name] = self.calls.get(name, 0) + 1
            return log(name, *a, **kw)

        pl_module.log = counting

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.full_batch is not None:  # the loader's item is a placeholder
            return
        x, y = batch
        self.steps.append((float(pl_module.last_loss), float(pl_module.loss(x, y).units)))


def _fit(tmp_path, task: str, *extra: str, batching: str = "mini") -> tuple[_LogCalls, L.Trainer]:
    over = ["data=synthetic", "data.num_samples=300"] if task == "classification" else ["experiment=pgm_crf", *CHAIN]
    size = "batching.batch_size=8" if batching == "mini" else "batching.chunk_size=8"
    cfg = compose_cfg(QUIET + over + ["trainer.max_epochs=1", f"batching={batching}", size, "test=false",
                                      "optimizer=sgd", "optimizer.lr=0.0", *extra], tmp_path)
    counter = _LogCalls()
    L.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[counter], num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return counter, trainer


@pytest.mark.parametrize("task", ["classification", "sequence"])
def test_train_figures_are_logged_once_per_epoch_as_the_weighted_mean(tmp_path, task):
    counter, trainer = _fit(tmp_path, task)
    assert len(counter.steps) > 3  # several steps, one log
    assert counter.calls["train/loss"] == 1 and counter.calls["train/acc"] == 1
    loss, units = map(torch.tensor, zip(*counter.steps))
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(float((loss * units).sum() / units.sum()),
                                                                         rel=1e-5)


@pytest.mark.parametrize("batching", ["mini", "full"])
def test_sequence_without_train_accuracy_logs_no_train_acc(tmp_path, batching):
    counter, trainer = _fit(tmp_path, "sequence", "module.track_train_acc=false", batching=batching)
    assert counter.calls["train/loss"] == 1 and "train/acc" not in counter.calls
    assert "train/acc" not in trainer.callback_metrics and "val/acc" in trainer.callback_metrics


def test_task_and_probe_contracts_are_declared_abstract():
    """A task or probe that forgets part of its contract fails when built, naming what is missing."""
    from shiftlab.callbacks.probe import Probe
    from shiftlab.trainers.modules.base import TaskModule

    assert {"loss", "eval_loss", "count_units", "make_accuracy", "update_accuracy"} == TaskModule.__abstractmethods__

    class NoMeasure(Probe):
        name = "no_measure"

    with pytest.raises(TypeError, match="measure"):
        NoMeasure(every_n_epochs=1)
