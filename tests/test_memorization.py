"""Clean / corrupted split accounting of the memorization probe."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shiftlab.callbacks.memorization import MemorizationMonitor, memorization_metrics


def _case():
    # 6 samples, 3 classes; samples 1, 3, 4 corrupted.
    y_true = torch.tensor([0, 1, 2, 0, 1, 2])
    y = torch.tensor([0, 2, 2, 1, 0, 2])
    corrupted = y != y_true
    # predictions: 0, 2, 1, 0, 0, 2  -> clean hits: s0 yes, s2 no, s5 yes (2/3)
    # corrupted vs given: s1 (2==2) yes, s3 (0 vs 1) no, s4 (0==0) yes -> 2/3
    # corrupted vs true: s1 (2 vs 1) no, s3 (0==0) yes, s4 (0 vs 1) no -> 1/3
    pred = torch.tensor([0, 2, 1, 0, 0, 2])
    logits = F.one_hot(pred, 3).float() * 3.0 + torch.linspace(0, 0.5, 18).view(6, 3)
    return logits, y, y_true, corrupted, pred


def test_split_accounting():
    logits, y, y_true, corrupted, _ = _case()
    m = memorization_metrics(logits, y, y_true, corrupted)
    assert m["frac_corrupted"] == pytest.approx(0.5)
    assert m["clean_acc"] == pytest.approx(2 / 3)
    assert m["corrupt_acc_given"] == pytest.approx(2 / 3)
    assert m["corrupt_acc_true"] == pytest.approx(1 / 3)
    ce = F.cross_entropy(logits, y, reduction="none")
    ce_true = F.cross_entropy(logits, y_true, reduction="none")
    assert m["clean_loss"] == pytest.approx(float(ce[~corrupted].mean()))
    assert m["corrupt_loss_given"] == pytest.approx(float(ce[corrupted].mean()))
    assert m["corrupt_loss_true"] == pytest.approx(float(ce_true[corrupted].mean()))
    # the clean and corrupted parts recombine into the overall training accuracy
    overall = float((logits.argmax(1) == y).float().mean())
    f = m["frac_corrupted"]
    assert (1 - f) * m["clean_acc"] + f * m["corrupt_acc_given"] == pytest.approx(overall)


def test_no_noise_skips_corrupted_keys_and_bad_masks_fail():
    logits, _, y_true, _, _ = _case()
    m = memorization_metrics(logits, y_true, y_true, torch.zeros(6, dtype=torch.bool))
    assert m["frac_corrupted"] == 0.0 and "corrupt_acc_given" not in m
    with pytest.raises(ValueError, match="clean"):
        memorization_metrics(logits, y_true.flip(0), y_true, torch.zeros(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="agree"):
        memorization_metrics(logits, y_true[:5], y_true, torch.zeros(6, dtype=torch.bool))


class _FakeModule(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.logged = {}

    def log(self, key, value, **_):
        self.logged[key] = value


def test_callback_on_fake_trainer_uses_the_train_split():
    logits, y, y_true, corrupted, pred = _case()
    x = F.one_hot(pred, 3).float()  # identity model reproduces `pred`
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
        model.bias.zero_()
    split = SimpleNamespace(x=x, y=y, y_true=y_true, corrupted=corrupted)
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(train_set=split), current_epoch=0, max_epochs=3, should_stop=False
    )
    module = _FakeModule(model)
    cb = MemorizationMonitor(every_n_epochs=2)
    cb.on_train_epoch_end(trainer, module)  # epoch 1 of 3: not a probe epoch
    assert module.logged == {}
    trainer.current_epoch = 1
    cb.on_train_epoch_end(trainer, module)
    assert module.logged["mem/corrupt_acc_true"] == pytest.approx(1 / 3)
    assert module.logged["mem/clean_acc"] == pytest.approx(2 / 3)
    trainer.current_epoch = 2  # last epoch is always probed
    cb.on_train_epoch_end(trainer, module)
    assert len(cb.history) == 2
    assert cb.summary_items()["mem/corrupt_acc_given"] == pytest.approx(2 / 3)
    restored = MemorizationMonitor()
    restored.load_state_dict(cb.state_dict())
    assert restored.history == cb.history
    with pytest.raises(ValueError, match="every_n_epochs"):
        MemorizationMonitor(every_n_epochs=0)
