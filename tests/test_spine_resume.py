"""An interrupted and resumed CPU run ends exactly where an uninterrupted one does."""
from __future__ import annotations

import pytest
import torch

from shiftlab.trainers.train import train

COMMON = ["trainer.max_epochs=4", "trainer.deterministic=true", "callbacks=default", "optimizer=momentum",
          "data.label_noise=0.2"]


def _weights(path):
    return torch.load(path, weights_only=False)["state_dict"]


@pytest.mark.parametrize("extra", [[], ["model.dropout=0.2"], ["model.dropout=0.2", "module.steps_per_call=3"]],
                         ids=["plain", "dropout", "dropout-grouped"])
def test_resume_from_last_checkpoint_is_exact(tmp_path, extra):
    """With dropout the masks come from the global generator: the resumed run must restore it before the
    epoch's training iterator draws its base seed from it, as the uninterrupted run's iterator did."""
    from conftest import QUIET, compose_cfg

    common = COMMON + extra
    full = train(compose_cfg(QUIET + common, tmp_path / "full"))
    part = train(compose_cfg(QUIET + common + ["+callbacks.stop._target_=helpers_callbacks.StopAfterEpoch",
                                               "+callbacks.stop.epoch=1"], tmp_path / "part"))
    assert part["epochs_run"] == 2
    resumed = train(compose_cfg(QUIET + common + [f"ckpt_path={tmp_path}/part/checkpoints/last.ckpt"],
                                tmp_path / "resumed"))
    assert resumed["epochs_run"] == 4  # the history travels in the checkpoint
    for key in ("val/loss", "val/acc", "train/loss", "test/loss", "test/acc"):
        assert resumed[key] == full[key], key
    a, b = _weights(tmp_path / "full/checkpoints/last.ckpt"), _weights(tmp_path / "resumed/checkpoints/last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)
