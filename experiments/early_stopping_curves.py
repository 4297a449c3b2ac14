"""Training one configuration of the early-stopping corpus to a fixed horizon (per-epoch curves).

Why a plain loop: a stopping rule only reads per-epoch numbers, so each configuration is trained
once with shiftlab's own data modules (digits, mnist1d, synthetic, hmm_sequences), models (MLP,
CNN, ResNet, VGG, and the chain models CRF / position softmax / HMM), optimizer and scheduler
registries, without the Lightning Trainer's per-epoch overhead (on a 2-core machine that overhead
would cost more than the tiny models themselves). What is recorded matches what
``ClassificationModule`` logs per epoch: ``train_loss`` is the mean over the epoch's mini-batches
(the full-batch loss in the full-batch regime), ``val_*`` / ``test_*`` are computed on the whole
split after the epoch in eval mode. ``val_loss_se`` is the standard error of the validation loss
from the per-sample (per-sequence, for chain models) losses.

A configuration is a plain dict (see :func:`shiftlab.experiments.early_stopping_corpus.design`);
the fresh set's variants (``data_kw``, ``model_kw``, ``schedule_kw``) pass extra constructor
arguments, so corpus v2's configurations train exactly as before.
"""
from __future__ import annotations

import math
from typing import Any

IMAGE_MODELS = ("cnn", "resnet", "vgg")  # digits as 8x8 images for these


def _datamodule(cfg: dict[str, Any]):
    from shiftlab.trainers.data import DigitsDataModule, MNIST1DDataModule, SyntheticDataModule
    from shiftlab.trainers.data.hmm_sequences import HMMSequenceDataModule

    common = dict(batch_size=max(cfg["batch_size"], 1), label_noise=cfg["label_noise"],
                  seed=cfg["seed"], val_fraction=0.15, test_fraction=0.2,
                  train_fraction=cfg["train_fraction"])
    common.update(cfg.get("data_kw", {}))
    source = cfg.get("source", cfg["data"])  # the fresh set names its variants, e.g. hmm_long
    if source == "digits":
        dm = DigitsDataModule(as_images=cfg["model"] in IMAGE_MODELS, standardize=False, **common)
    elif source == "mnist1d":
        dm = MNIST1DDataModule(num_samples=2000, as_sequence=cfg["model"] == "cnn", **common)
    elif source == "synthetic":
        kw = {"kind": "teacher", "num_samples": 2000, "dim": 20, "num_classes": 4} | common
        dm = SyntheticDataModule(**kw)
    else:
        kw = {"num_sequences": 1000, "length": 24, "min_length": 12, "hmm_seed": cfg["seed"] % 5}
        dm = HMMSequenceDataModule(**(kw | common))
    dm.setup("fit")
    return dm


def _model(cfg: dict[str, Any], dm):
    import torch.nn as nn

    from shiftlab.trainers.models.cnn import CNN
    from shiftlab.trainers.models.mlp import MLP
    from shiftlab.trainers.models.resnet import ResNet
    from shiftlab.trainers.models.vgg import VGG
    from shiftlab.trainers.models.crf import LinearChainCRF, PositionSoftmax
    from shiftlab.trainers.models.hmm import HMM

    big = cfg["width"] == "large"
    if cfg["model"] == "mlp":
        return MLP(dm.input_shape, dm.num_classes, hidden=(256, 256) if big else (64,))
    if cfg["model"] == "cnn":
        return CNN(dm.input_shape, dm.num_classes, channels=(32, 32) if big else (16, 16))
    if cfg["model"] == "resnet":
        return ResNet(dm.input_shape, dm.num_classes, depth=8, base_width=16 if big else 8,
                      norm=lambda c, d: nn.BatchNorm2d(c))
    if cfg["model"] == "vgg":
        return VGG(dm.input_shape, dm.num_classes, layout="vgg_small",
                   width_mult=0.5 if big else 0.25, norm=lambda c, d: nn.BatchNorm2d(c))
    v, k = dm.num_symbols, dm.num_states
    if cfg["model"] == "hmm":
        return HMM(v, k)
    cls = LinearChainCRF if cfg["model"] == "crf" else PositionSoftmax
    return cls(v, num_tags=k, embed_dim=32 if big else 16, hidden=64 if big else 32)


def _per_sample(model, x, y, chain: bool):
    """Per-sample losses (weights = tokens for chain models) and the number of correct
    predictions (None where accuracy is undefined: the unsupervised HMM)."""
    import torch
    import torch.nn.functional as F

    if not chain:
        logits = model(x)
        return (F.cross_entropy(logits, y, reduction="none"), torch.ones(len(y)),
                int((logits.argmax(1) == y).sum()), len(y))
    mask = x >= 0
    tok = mask.sum(1).float()
    nll = -model.log_likelihood(x, mask, y if model.supervised else None)
    if not model.supervised:
        return nll, tok, None, int(mask.sum())
    pred = model.log_marginals(x, mask).argmax(-1)
    return nll, tok, int(((pred == y) & mask).sum()), int(mask.sum())


def _summary(nll, w) -> tuple[float, float]:
    """Ratio-estimator mean ``sum nll / sum w`` and its standard error."""
    n = len(nll)
    mean = float(nll.sum() / w.sum())
    r = nll - mean * w
    se = float((r.pow(2).sum() / (n * (n - 1))).sqrt() / w.mean()) if n > 1 else math.nan
    return mean, se


def train_curve(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration for ``cfg['epochs']`` epochs; per-epoch curves."""
    import torch

    from shiftlab.trainers.optim import create_optimizer, create_scheduler

    torch.manual_seed(cfg["seed"])
    dm = _datamodule(cfg)
    chain = cfg.get("source", cfg["data"]) == "hmm_sequences"
    model = _model(cfg, dm)
    opt = create_optimizer(model.parameters(), cfg["optimizer"], lr=cfg["lr"])
    sched_kw = {"step_size": max(1, cfg["epochs"] // 3), "gamma": 0.2} if cfg["schedule"] == "step" else {}
    sched_kw.update(cfg.get("schedule_kw", {}))
    sched = create_scheduler(opt, cfg["epochs"], cfg.get("scheduler", cfg["schedule"]), **sched_kw)
    tr = dm.train_set
    n = len(tr.x)
    bs = n if cfg["batch"] == "full" else cfg["batch_size"]
    g = torch.Generator().manual_seed(cfg["seed"])
    keys = ("train_loss", "val_loss", "val_loss_se", "val_acc", "test_loss", "test_acc")
    out: dict[str, list] = {k: [] for k in keys}

    def loss_of(x, y):
        if chain:
            mask = x >= 0
            return model.loss(x, y, mask), int(mask.sum())
        return torch.nn.functional.cross_entropy(model(x), y), len(y)

    for _ in range(cfg["epochs"]):
        model.train()
        perm = torch.randperm(n, generator=g)
        tot, cnt = 0.0, 0
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            loss, k = loss_of(tr.x[idx], tr.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, cnt = tot + float(loss.detach()) * k, cnt + k
        sched.step()
        out["train_loss"].append(tot / cnt)
        model.eval()
        with torch.no_grad():
            for split, name in ((dm.val_set, "val"), (dm.test_set, "test")):
                nll, w, correct, total = _per_sample(model, split.x, split.y, chain)
                mean, se = _summary(nll, w)
                out[f"{name}_loss"].append(mean)
                if name == "val":
                    out["val_loss_se"].append(se)
                out[f"{name}_acc"].append(None if correct is None else correct / total)
    return {k: [None if v is None else float(f"{v:.5g}") for v in vs] for k, vs in out.items()}
