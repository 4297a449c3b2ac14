"""experiments/bench_overhead.py: its three sides time the same work (the floor side is the hand loop's epoch in
a bare LightningModule, and it trains the configured model)."""
from __future__ import annotations

import torch

from shiftlab.experiments import bench_overhead as bench


def test_floor_side_trains_the_configured_model_and_times_every_epoch(tmp_path):
    cfg = bench.compose_cfg("digits_mlp", 3, tmp_path, ["model.hidden=[32]"])
    before = torch.nn.utils.parameters_to_vector(bench.harness.build(cfg)[1].model.parameters())
    times = bench.floor_epochs(cfg)
    assert [len(times[k]) for k in bench.CLOCKS] == [3, 3] and min(times["wall"]) > 0
    assert times["val_acc"] > 0.5  # chance: 0.1
    _, module = bench.harness.build(cfg)  # the same seed: the hand loop and the floor start from these weights
    assert torch.equal(torch.nn.utils.parameters_to_vector(module.model.parameters()), before)


def test_compare_reports_each_side(tmp_path, monkeypatch):
    calls = []
    for side in ("shiftlab_epochs", "hand_loop_epochs", "floor_epochs"):
        monkeypatch.setattr(bench, side, lambda cfg, side=side: calls.append(side) or {"wall": [9.0, 1.0], "cpu": [9.0, 2.0]})
    out = bench.compare(None, rounds=2, floor=True)
    assert calls == ["hand_loop_epochs"] + ["shiftlab_epochs", "hand_loop_epochs", "floor_epochs", "hand_loop_epochs"] * 2
    assert out["lightning_floor"] == {"wall": [1.0, 1.0], "cpu": [2.0, 2.0]} and len(out["hand"]["wall"]) == 5
    assert "lightning_floor" not in bench.compare(None, rounds=1)
