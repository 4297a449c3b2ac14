"""Corpus v2 of real learning curves for the early-stopping benchmark (one command, cached).

Why a plain loop: a stopping rule only reads per-epoch numbers, so each configuration is trained
once to a fixed horizon with shiftlab's own data modules (digits, mnist1d, synthetic,
hmm_sequences), models (MLP, CNN, ResNet, and the chain models CRF / position softmax / HMM),
optimizer and scheduler registries, without the Lightning Trainer's per-epoch overhead (on this
2-core machine that overhead would cost more than the tiny models themselves). What is recorded
matches what ``ClassificationModule`` logs per epoch: ``train_loss`` is the mean over the
epoch's mini-batches (the full-batch loss in the full-batch regime), ``val_*`` / ``test_*`` are
computed on the whole split after the epoch in eval mode. ``val_loss_se`` is the standard error
of the validation loss from the per-sample (per-sequence, for chain models) losses.

Configurations are drawn from a seeded design (:func:`design`), so run ``i`` is always the same
run; results are appended one JSON line per run to ``--out``, and a rerun skips the runs already
there (an interrupted build continues where it stopped).

Usage::

    nice -n 19 python -m shiftlab.experiments.early_stopping_corpus --runs 400 --budget-s 3600 [--cheap-first]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parent
CORPUS_V1 = ROOT / "data" / "early_stopping_corpus.json"
CORPUS_V2 = ROOT / "data" / "early_stopping_corpus_v2.jsonl"


def in_source_checkout(path: Path) -> bool:
    """True when ``path`` lies in a source checkout, not in an installed package: only there may
    the shipped corpus and figures be extended (an install never writes into site-packages)."""
    return "site-packages" not in path.resolve().parts and "dist-packages" not in path.resolve().parts


def default_corpus_out() -> Path:
    return CORPUS_V2 if in_source_checkout(CORPUS_V2) else Path("outputs") / CORPUS_V2.name

LRS = {"sgd": (0.03, 0.1, 0.3), "momentum": (0.01, 0.03, 0.1),
       "adam": (3e-4, 1e-3, 3e-3), "adamw": (3e-4, 1e-3, 3e-3)}
NOISE = (0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.6)


def design(i: int) -> dict[str, Any]:
    """The ``i``-th configuration of the corpus (deterministic in ``i``)."""
    rng = random.Random(1000 + i)
    data = rng.choices(["digits", "mnist1d", "synthetic", "hmm_sequences"], [3, 3, 2, 2])[0]
    if data == "hmm_sequences":
        model = rng.choice(["crf", "position_softmax", "hmm"])
    elif data == "digits":
        model = rng.choices(["mlp", "cnn", "resnet"], [4, 3, 3])[0]
    else:
        model = rng.choices(["mlp", "cnn"], [3, 2])[0]
    opt = rng.choice(list(LRS))
    full = rng.random() < 0.3
    conv = model in ("cnn", "resnet")  # ~10x the CPU per sample: fewer, larger steps
    cfg: dict[str, Any] = {
        "data": data, "model": model, "optimizer": opt,
        "lr": rng.choice(LRS[opt]) * (3.0 if full and opt in ("sgd", "momentum") else 1.0),
        "schedule": rng.choice(["constant", "step", "cosine"]),
        "label_noise": 0.0 if model == "hmm" else rng.choice(NOISE),
        "batch": "full" if full else "mini",
        "batch_size": 0 if full else rng.choice([64, 128] if conv else [32, 64, 128]),
        "epochs": (rng.choice([100, 150] if conv else [100, 200, 300]) if full
                   else rng.choice([50, 75, 100] if conv else [50, 75, 100, 150])),
        "train_fraction": rng.choice([0.25, 0.5] if conv else [0.25, 0.5, 1.0]),
        "width": rng.choice(["small", "large"]),
        "seed": i,
    }
    if model == "hmm":  # unsupervised: a large step size is what makes its curve move at all
        cfg["lr"] = {"sgd": 1.0, "momentum": 0.3, "adam": 0.05, "adamw": 0.05}[opt]
    cfg["id"] = (f"v2-{i:04d}-{data}-{model}-{opt}-{cfg['schedule']}-n{cfg['label_noise']}-"
                 f"{cfg['batch']}{cfg['batch_size'] or ''}-e{cfg['epochs']}")
    return cfg


COST = {"mlp": 1.0, "position_softmax": 1.0, "cnn": 3.0, "crf": 3.0, "hmm": 4.0, "resnet": 10.0}


def est_cost(cfg: dict[str, Any]) -> float:
    """Relative CPU cost of a design point (measured per-run seconds on this machine, roughly)."""
    return COST[cfg["model"]] * cfg["epochs"] * cfg["train_fraction"]


def _datamodule(cfg: dict[str, Any]):
    from shiftlab.trainers.data import DigitsDataModule, MNIST1DDataModule, SyntheticDataModule
    from shiftlab.trainers.data.hmm_sequences import HMMSequenceDataModule

    common = dict(batch_size=max(cfg["batch_size"], 1), label_noise=cfg["label_noise"],
                  seed=cfg["seed"], val_fraction=0.15, test_fraction=0.2,
                  train_fraction=cfg["train_fraction"])
    if cfg["data"] == "digits":
        dm = DigitsDataModule(as_images=cfg["model"] in ("cnn", "resnet"), standardize=False, **common)
    elif cfg["data"] == "mnist1d":
        dm = MNIST1DDataModule(num_samples=2000, as_sequence=cfg["model"] == "cnn", **common)
    elif cfg["data"] == "synthetic":
        dm = SyntheticDataModule(kind="teacher", num_samples=2000, dim=20, num_classes=4, **common)
    else:
        dm = HMMSequenceDataModule(num_sequences=1000, length=24, min_length=12,
                                   hmm_seed=cfg["seed"] % 5, **common)
    dm.setup("fit")
    return dm


def _model(cfg: dict[str, Any], dm):
    import torch.nn as nn

    from shiftlab.trainers.models.cnn import CNN
    from shiftlab.trainers.models.mlp import MLP
    from shiftlab.trainers.models.resnet import ResNet
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
    chain = cfg["data"] == "hmm_sequences"
    model = _model(cfg, dm)
    opt = create_optimizer(model.parameters(), cfg["optimizer"], lr=cfg["lr"])
    sched_kw = {"step_size": max(1, cfg["epochs"] // 3), "gamma": 0.2} if cfg["schedule"] == "step" else {}
    sched = create_scheduler(opt, cfg["epochs"], cfg["schedule"], **sched_kw)
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


def load_corpus(path: Path = CORPUS_V2) -> list[dict[str, Any]]:
    """Runs cached in ``path`` (a truncated line, from an interrupted build, is skipped; a run
    written twice counts once)."""
    if not path.exists():
        return []
    runs: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            run = json.loads(line)
        except json.JSONDecodeError:
            continue
        runs.setdefault(run["id"], run)
    return list(runs.values())


def build(path: Path, runs: int, budget_s: float, start: int = 0, cheap_first: bool = False
          ) -> int:
    """Train design points ``start .. start+runs-1`` not yet in ``path`` until ``budget_s``
    (``cheap_first``: in order of :func:`est_cost`, so a short budget yields more curves; a
    later call makes the rest)."""
    import torch

    torch.set_num_threads(1)
    done = {r["id"] for r in load_corpus(path)}
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, 1 torch thread, torch {torch.__version__}"
    t0, made = time.time(), 0
    order = list(range(start, start + runs))
    if cheap_first:
        order.sort(key=lambda i: est_cost(design(i)))
    for i in order:
        cfg = design(i)
        if cfg["id"] in done:
            continue
        if time.time() - t0 > budget_s:
            print(f"budget of {budget_s:.0f} s spent; {len(done) + made} runs cached", flush=True)
            break
        t1 = time.time()
        run = dict(cfg, **train_curve(cfg), seconds=round(time.time() - t1, 2), machine=machine)
        with path.open("a") as f:  # one line per run: an interruption loses at most this run
            f.write(json.dumps(run, separators=(",", ":")) + "\n")
        made += 1
        v = run["val_loss"]
        print(f"[{i}] {cfg['id']}: {run['seconds']} s, min val {min(v):.3f} at "
              f"{v.index(min(v))}/{len(v)}", flush=True)
    return made


# ------------------------------------------------------------------------------------------------
# corpus v1 (kept: 72 constant-lr curves, 100 epochs, no standard errors; `--v1` rebuilds it)
# ------------------------------------------------------------------------------------------------
V1_GRID = {
    "data": ["digits", "mnist1d", "synthetic"],
    "model": ["mlp", "cnn"],
    "label_noise": [0.0, 0.2, 0.4],
    "optimizer": ["momentum", "adam"],
    "batch_size": [32, 128],
}
V1_LR = {"momentum": 0.05, "adam": 1e-3}


# ------------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------------
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



def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=default_corpus_out())
    ap.add_argument("--runs", type=int, default=400, help="design points 0..runs-1")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=3600.0)
    ap.add_argument("--v1", action="store_true", help="rebuild / extend corpus v1 instead")
    ap.add_argument("--cheap-first", action="store_true",
                    help="train the cheapest design points first (more curves per budget)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.runs < 1:
        print(f"shiftlab: error: --runs={args.runs} is not allowed; allowed: >= 1", file=sys.stderr)
        return 2
    if args.v1:
        build_v1(CORPUS_V1, 100, args.budget_s)
        return 0
    build(args.out, args.runs, args.budget_s, args.start, args.cheap_first)
    return 0


if __name__ == "__main__":
    sys.exit(main())
