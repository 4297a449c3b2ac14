"""Corpus v1 of the early-stopping benchmark (kept: 72 constant-lr curves, 100 epochs, no
standard errors; ``python -m shiftlab.experiments.early_stopping_corpus --v1`` rebuilds it).

Why a separate module: v1 has its own grid, models and file format; corpus v2 and the fresh set
(:mod:`shiftlab.experiments.early_stopping_corpus`) share nothing with it but the data modules.
"""
from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------
V1_GRID = {
    "data": ["digits", "mnist1d", "synthetic"],
    "model": ["mlp", "cnn"],
    "label_noise": [0.0, 0.2, 0.4],
    "optimizer": ["momentum", "adam"],
    "batch_size": [32, 128],
}
V1_LR = {"momentum": 0.05, "adam": 1e-3}


def v1_configs() -> list[dict[str, Any]]:
    keys = list(V1_GRID)
    out = []
    for i, values in enumerate(itertools.product(*(V1_GRID[k] for k in keys))):
        cfg = dict(zip(keys, values))
        cfg["lr"] = V1_LR[cfg["optimizer"]]
        cfg["seed"] = i
        cfg["id"] = "{data}-{model}-n{label_noise}-{optimizer}-b{batch_size}".format(**cfg)
        out.append(cfg)
    return out


def _v1_datamodule(cfg: dict[str, Any]):
    from shiftlab.trainers.data import DigitsDataModule, MNIST1DDataModule, SyntheticDataModule

    common = dict(batch_size=cfg["batch_size"], label_noise=cfg["label_noise"], seed=cfg["seed"],
                  val_fraction=0.15, test_fraction=0.2)
    cnn = cfg["model"] == "cnn"
    if cfg["data"] == "digits":
        # already in [0, 1]; per-pixel standardization blows up pixels constant in train
        dm = DigitsDataModule(as_images=cnn, standardize=False, **common)
    elif cfg["data"] == "mnist1d":
        dm = MNIST1DDataModule(num_samples=4000, as_sequence=cnn, **common)
    else:
        dm = SyntheticDataModule(kind="teacher", num_samples=2000, dim=20, num_classes=4, **common)
    dm.setup("fit")
    return dm


def _v1_model(cfg: dict[str, Any], dm):
    from shiftlab.trainers.models.cnn import CNN
    from shiftlab.trainers.models.mlp import MLP

    if cfg["model"] == "mlp":
        return MLP(dm.input_shape, dm.num_classes, hidden=(128, 128))
    return CNN(dm.input_shape, dm.num_classes, channels=(32, 32, 32))


def v1_train_curve(cfg: dict[str, Any], epochs: int) -> dict[str, list[float]]:
    """Train one configuration for ``epochs`` epochs; return per-epoch curves."""
    import torch
    import torch.nn.functional as F

    from shiftlab.trainers.optim import create_optimizer

    torch.manual_seed(cfg["seed"])
    dm = _v1_datamodule(cfg)
    model = _v1_model(cfg, dm)
    opt = create_optimizer(model.parameters(), cfg["optimizer"], lr=cfg["lr"])
    tr = dm.train_set
    g = torch.Generator().manual_seed(cfg["seed"])
    curves: dict[str, list[float]] = {k: [] for k in
                                      ("train_loss", "train_acc", "val_loss", "val_acc",
                                       "test_loss", "test_acc")}

    @torch.no_grad()
    def evaluate(split) -> tuple[float, float]:
        model.eval()
        logits = model(split.x)
        model.train()
        return (float(F.cross_entropy(logits, split.y)),
                float((logits.argmax(1) == split.y).float().mean()))

    n = len(tr)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        tot_loss, tot_correct = 0.0, 0
        for s in range(0, n, cfg["batch_size"]):
            idx = perm[s:s + cfg["batch_size"]]
            x, y = tr.x[idx], tr.y[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += float(loss.detach()) * len(idx)
            tot_correct += int((logits.argmax(1) == y).sum())
        curves["train_loss"].append(tot_loss / n)
        curves["train_acc"].append(tot_correct / n)
        for split, name in ((dm.val_set, "val"), (dm.test_set, "test")):
            loss, acc = evaluate(split)
            curves[f"{name}_loss"].append(loss)
            curves[f"{name}_acc"].append(acc)
    return {k: [float(f"{v:.5g}") for v in vs] for k, vs in curves.items()}


def build_v1(path: Path, epochs: int, budget_s: float, limit: int | None = None) -> dict:
    """Train the grid in a seeded random order until ``budget_s`` is spent; resumable (configs
    already in ``path`` are skipped, the file is rewritten after each one)."""
    import platform

    import torch

    torch.set_num_threads(1)
    corpus = json.loads(path.read_text()) if path.exists() else {
        "epochs": epochs, "machine": f"{platform.processor() or platform.machine()}, "
                                     f"{torch.get_num_threads()} torch thread(s), CPU",
        "runs": []}
    if corpus["epochs"] != epochs:
        raise ValueError(f"--epochs={epochs} differs from the cached corpus' {corpus['epochs']}; "
                         "use the same horizon or another --corpus path")
    done = {r["id"] for r in corpus["runs"]}
    todo = [c for c in v1_configs() if c["id"] not in done]
    random.Random(0).shuffle(todo)  # any prefix covers the grid evenly
    if limit is not None:
        todo = todo[:limit]
    t0 = time.time()
    for cfg in todo:
        if time.time() - t0 > budget_s:
            print(f"budget of {budget_s:.0f} s spent; {len(corpus['runs'])} runs cached")
            break
        t1 = time.time()
        run = dict(cfg, **v1_train_curve(cfg, epochs))
        run["seconds"] = round(time.time() - t1, 1)
        corpus["runs"].append(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(corpus, separators=(",", ":")))
        tmp.replace(path)
        print(f"[{len(corpus['runs'])}] {cfg['id']}: {run['seconds']} s, "
              f"min val loss {min(run['val_loss']):.3f} at {run['val_loss'].index(min(run['val_loss']))}",
              flush=True)
    return corpus
