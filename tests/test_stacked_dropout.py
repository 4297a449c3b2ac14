"""launcher=stacked with model.dropout>0: each member draws the dropout masks its plain run draws (CPU),
so it ends where its plain run ends, and its checkpoint carries its plain run's global RNG state."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from conftest import compose_cfg
from shiftlab.trainers.checkpoint_io import load_weights_only
from shiftlab.trainers.stacked.dropout import draw_mask
from shiftlab.trainers.stacked.engine import build_member
from shiftlab.trainers.stacked.grouping import why_not_stacked
from shiftlab.trainers.stacked.run import train_stacked
from shiftlab.trainers.train import train
from test_stacked import RTOL, SEEDS, SMALL, _cfg, _close, run_cli


def test_mask_is_atens_cpu_dropout():
    """``draw_mask`` times x is nn.Dropout's output bit for bit, and consumes the generator as it does."""
    x = torch.randn(50, 32)
    for p in (0.2, 0.5, 1.0):
        torch.manual_seed(7)
        want = nn.Dropout(p).train()(x)
        g = torch.Generator().manual_seed(7)
        assert torch.equal(x * draw_mask(x.shape, p, g, torch.device("cpu")), want), p
        assert torch.equal(g.get_state(), torch.get_rng_state()), p


class _Rng(L.Callback):
    """The global CPU RNG state at the hooks around training steps and checkpoints."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, torch.Tensor]] = []

    def _r(self, trainer, what: str) -> None:
        self.rows.append((what, trainer.current_epoch, torch.get_rng_state()))

    def on_fit_start(self, trainer, pl_module) -> None:
        self._r(trainer, "fit_start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._r(trainer, f"start{batch_idx}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._r(trainer, f"end{batch_idx}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._r(trainer, "save")


def _after_draws(state: torch.Tensor, n: int) -> torch.Tensor:
    g = torch.Generator().set_state(state)
    for _ in range(n):
        torch.empty((), dtype=torch.int64).random_(generator=g)  # a DataLoader iterator's _base_seed
    return g.get_state()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_what_a_plain_run_draws_from_the_global_generator(tmp_path, dropout):
    """From the state once the model is built: one int64 draw before the first training step (sanity
    validation), one at the start of each later epoch (its train iterator), one per validation; nothing
    else without dropout (the sampler has its own generator); with dropout every step draws its masks."""
    ov = ("norm=none", f"model.dropout={dropout}")
    built = build_member(_cfg(tmp_path / "m", 1, *ov)).rng_state
    rec = _Rng()
    train(_cfg(tmp_path / "plain", 1, *ov), extra_callbacks=[rec])
    rows = {(what, epoch): s for what, epoch, s in rec.rows}
    assert torch.equal(rows["fit_start", 0], built)
    assert torch.equal(rows["start0", 0], _after_draws(built, 1))
    steps = max(int(w[3:]) for w, _ in rows if w.startswith("end")) + 1
    for epoch in (0, 1):
        start, end = rows["start0", epoch], rows[f"end{steps - 1}", epoch]
        assert torch.equal(start, end) == (dropout == 0)
        if dropout == 0:
            assert torch.equal(start, _after_draws(built, 2 * epoch + 1))
            assert torch.equal(rows["save", epoch], _after_draws(built, 2 * epoch + 2))
        else:  # the validation draw after the epoch's last mask, then the next train iterator's
            assert torch.equal(rows["save", epoch], _after_draws(end, 1))
            if epoch == 0:
                assert torch.equal(rows["start0", 1], _after_draws(end, 2))


@pytest.mark.parametrize("overrides", [
    ("norm=none", "optimizer=sgd", "scheduler=constant", "model.dropout=0.2", "data.label_noise=0.2"),
    ("norm=layernorm", "optimizer=adam", "model.dropout=0.2"),
    ("norm=batchnorm", "optimizer=momentum", "model.dropout=0.5"),
    ("norm=none", "optimizer=sgd", "batching=full", "model.dropout=0.2"),
    ("norm=layernorm", "optimizer=adam", "batching=full", "batching.grad_norm_penalty=0.1", "model.dropout=0.2"),
], ids=["none-sgd-labelnoise", "layernorm-adam", "batchnorm-momentum-p0.5", "full-sgd", "full-adam-gnp"])
def test_dropout_members_equal_their_plain_runs(tmp_path, overrides):
    """Weights, optimizer state, RunContract's RNG state, metrics and history (with label noise: the
    eval-mode memorization probe's too) equal each member's plain run's."""
    dirs = [tmp_path / f"stacked{s}" for s in SEEDS]
    summaries = train_stacked([_cfg(d, s, *overrides) for d, s in zip(dirs, SEEDS)], dirs)
    for seed, d, got in zip(SEEDS, dirs, summaries):
        want = train(_cfg(tmp_path / f"plain{seed}", seed, *overrides))
        for key in ("val/loss", "val/acc", "train/loss", "train/acc", "train/loss_epoch_mean", "test/loss", "test/acc"):
            _close(got[key], want[key], f"seed {seed}: {key}")
        assert got["global_step"] == want["global_step"]
        mine = load_weights_only(d / "checkpoints" / "last.ckpt")
        plain = load_weights_only(tmp_path / f"plain{seed}" / "checkpoints" / "last.ckpt")
        assert mine["state_dict"].keys() == plain["state_dict"].keys()
        for k, v in plain["state_dict"].items():
            torch.testing.assert_close(mine["state_dict"][k], v, rtol=RTOL, atol=1e-6, msg=f"seed {seed}: {k}")
        assert set(mine["callbacks"]) == set(plain["callbacks"])  # RunContract included
        assert torch.equal(mine["callbacks"]["RunContract"]["torch_rng"], plain["callbacks"]["RunContract"]["torch_rng"])
        for a, b in zip(mine["callbacks"]["EpochHistory"]["history"], plain["callbacks"]["EpochHistory"]["history"],
                        strict=True):
            assert a.keys() == b.keys()
            timed = {k for k in a if k.startswith("probe_cost/")}  # seconds, not results
            assert {k: a[k] for k in a.keys() - timed} == pytest.approx({k: b[k] for k in b.keys() - timed},
                                                                        rel=RTOL, abs=1e-6)
        for i, st in plain["optimizer_states"][0]["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    torch.testing.assert_close(mine["optimizer_states"][0]["state"][i][k], v, rtol=RTOL, atol=1e-6)


def _weights(path):
    return load_weights_only(path / "checkpoints" / "last.ckpt")["state_dict"]


def test_plain_run_resumes_a_dropout_member(tmp_path):
    """A plain run resumed from a member's last.ckpt continues its dropout stream: it ends where the
    uninterrupted 3-epoch plain run ends, as does the plain run resumed from the plain 2-epoch checkpoint
    (RunContract restores the global RNG and replays the epoch iterator's draw)."""
    ov = ("norm=none", "optimizer=momentum", "scheduler=constant", "model.dropout=0.2")
    dirs = [tmp_path / "s0", tmp_path / "s1"]
    train_stacked([_cfg(d, s, *ov) for s, d in enumerate(dirs)], dirs)
    train(_cfg(tmp_path / "plain2", 1, *ov))
    train(_cfg(tmp_path / "plain3", 1, *ov, "trainer.max_epochs=3"))
    want = _weights(tmp_path / "plain3")
    for name, ckpt in (("from_member", dirs[1]), ("from_plain", tmp_path / "plain2")):
        got = train(_cfg(tmp_path / name, 1, *ov, "trainer.max_epochs=3",
                         f"ckpt_path={ckpt / 'checkpoints' / 'last.ckpt'}"))
        assert got["status"] == "completed" and got["epochs_run"] == 3
        a = _weights(tmp_path / name)
        for k in want:
            torch.testing.assert_close(a[k], want[k], rtol=RTOL, atol=1e-6, msg=f"{name}: {k}")


def test_dropout_stacks_but_not_with_epoch_probes():
    assert why_not_stacked(compose_cfg(SMALL + ["norm=none", "model.dropout=0.2"])) is None
    probed = compose_cfg(SMALL + ["norm=none", "model.dropout=0.2", "callbacks=batch_noise",
                                  "callbacks.noise_scale.every_n_epochs=1"])
    reason = why_not_stacked(probed)
    assert reason is not None and "model.dropout>0" in reason and reason.startswith("callbacks.")


def test_cli_stacks_dropout_seeds(tmp_path):
    r = run_cli(tmp_path, "seed=0,1", "model.dropout=0.2", "launcher=stacked", "norm=none")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "shiftlab: stacked: jobs #0 #1 train as one stacked model (2 members)" in r.stdout.splitlines()
    assert not [ln for ln in r.stdout.splitlines() if "runs alone" in ln]
