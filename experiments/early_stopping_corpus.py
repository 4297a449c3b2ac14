"""Real learning curves for the early-stopping benchmark (one command, cached): corpus v2 and the
fresh held-out set.

Why two designs: corpus v2 (:func:`design`) is what the default rule was tuned on -- its
held-out cells were consulted while designing it, so they no longer measure generalization. The
**fresh set** (:func:`design_fresh`, ``--set fresh``) only has (data set, model) cells and data
variants that corpus v2 never used: VGG on digits images, Gaussian-cluster synthetic data, a
10-class synthetic teacher, longer HMM sequences from other chains; plus Nesterov momentum,
warm-up cosine schedules and label noise 0.5. It was generated after the default rule was fixed
and is read only to report, never to tune.

Each configuration is trained once (:mod:`shiftlab.experiments.early_stopping_curves`). Design
points are seeded, so run ``i`` is always the same run; results are appended one JSON line per run
to ``--out``, and a rerun skips the runs already there (an interrupted build continues where it
stopped). Corpus v1 lives in :mod:`shiftlab.experiments.early_stopping_corpus_v1`.

Usage::

    nice -n 19 python -m shiftlab.experiments.early_stopping_corpus --runs 400 --budget-s 3600 [--cheap-first]
    nice -n 10 python -m shiftlab.experiments.early_stopping_corpus --set fresh --runs 200 --budget-s 1800
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from shiftlab.experiments.early_stopping_curves import train_curve

ROOT = Path(__file__).resolve().parent
CORPUS_V1 = ROOT / "data" / "early_stopping_corpus.json"
CORPUS_V2 = ROOT / "data" / "early_stopping_corpus_v2.jsonl"
CORPUS_FRESH = ROOT / "data" / "early_stopping_corpus_fresh.jsonl"


def in_source_checkout(path: Path) -> bool:
    """True when ``path`` lies in a source checkout, not in an installed package: only there may
    the shipped corpus and figures be extended (an install never writes into site-packages)."""
    return "site-packages" not in path.resolve().parts and "dist-packages" not in path.resolve().parts


def default_corpus_out(path: Path = CORPUS_V2) -> Path:
    return path if in_source_checkout(path) else Path("outputs") / path.name


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


# The fresh held-out set: cells and variants corpus v2 never used. ``data`` names the variant
# (the benchmark's subgroup), ``source`` the data module it is drawn from.
FRESH_DATA = {  # variant: (source, data_kw, models, weight)
    "digits": ("digits", {}, ("vgg",), 2),
    "synthetic_clusters": ("synthetic", {"kind": "clusters", "dim": 30, "num_classes": 6,
                                         "separation": 1.5}, ("mlp", "cnn"), 3),
    "synthetic_teacher10": ("synthetic", {"dim": 50, "num_classes": 10, "teacher_width": 64,
                                          "num_samples": 3000}, ("mlp",), 2),
    "hmm_long": ("hmm_sequences", {"length": 40, "min_length": 20, "num_states": 5,
                                   "num_symbols": 16}, ("position_softmax", "hmm"), 2),
}
FRESH_LRS = LRS | {"nesterov": (0.01, 0.03, 0.1)}
FRESH_NOISE = (0.0, 0.0, 0.1, 0.2, 0.3, 0.5)


def design_fresh(i: int) -> dict[str, Any]:
    """The ``i``-th configuration of the fresh held-out set (deterministic in ``i``; seeds and
    HMM chains disjoint from corpus v2's)."""
    rng = random.Random(50_000 + i)
    names = list(FRESH_DATA)
    data = rng.choices(names, [FRESH_DATA[n][3] for n in names])[0]
    source, data_kw, models, _ = FRESH_DATA[data]
    model = rng.choice(models)
    opt = rng.choice(list(FRESH_LRS))
    full = rng.random() < 0.3
    conv = model in ("cnn", "vgg")
    schedule = rng.choice(["constant", "step", "cosine", "warmup_cosine"])
    cfg: dict[str, Any] = {
        "data": data, "source": source, "model": model, "optimizer": opt,
        "lr": rng.choice(FRESH_LRS[opt]) * (3.0 if full and opt in ("sgd", "momentum", "nesterov") else 1.0),
        "schedule": schedule, "label_noise": 0.0 if model == "hmm" else rng.choice(FRESH_NOISE),
        "batch": "full" if full else "mini",
        "batch_size": 0 if full else rng.choice([64, 128] if conv else [32, 64, 128]),
        "epochs": (rng.choice([80, 120] if conv else [80, 150, 200]) if full
                   else rng.choice([40, 60] if model == "vgg" else [40, 60, 80, 120])),
        "train_fraction": rng.choice([0.25, 0.5] if conv else [0.25, 0.5, 1.0]),
        "width": rng.choice(["small", "large"]), "seed": 50_000 + i, "data_kw": dict(data_kw),
    }
    if schedule == "warmup_cosine":
        cfg["scheduler"], cfg["schedule_kw"] = "cosine", {"warmup_epochs": 5}
    if source == "hmm_sequences":
        cfg["data_kw"]["hmm_seed"] = 20 + i % 5  # chains corpus v2 (hmm_seed 0..4) never drew
    if model == "hmm":
        cfg["lr"] = {"sgd": 1.0, "momentum": 0.3, "nesterov": 0.3, "adam": 0.05, "adamw": 0.05}[opt]
    cfg["id"] = (f"fresh-{i:04d}-{data}-{model}-{opt}-{schedule}-n{cfg['label_noise']}-"
                 f"{cfg['batch']}{cfg['batch_size'] or ''}-e{cfg['epochs']}")
    return cfg


COST = {"mlp": 1.0, "position_softmax": 1.0, "cnn": 3.0, "crf": 3.0, "hmm": 4.0, "resnet": 10.0,
        "vgg": 10.0}


def est_cost(cfg: dict[str, Any]) -> float:
    """Relative CPU cost of a design point (measured per-run seconds on this machine, roughly)."""
    return COST[cfg["model"]] * cfg["epochs"] * cfg["train_fraction"]


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


def build(path: Path, runs: int, budget_s: float, start: int = 0, cheap_first: bool = False,
          design_fn: Callable[[int], dict[str, Any]] = design) -> int:
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
        order.sort(key=lambda i: est_cost(design_fn(i)))
    for i in order:
        cfg = design_fn(i)
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


SETS = {"v2": (CORPUS_V2, design), "fresh": (CORPUS_FRESH, design_fresh)}


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=SETS, default="v2",
                    help="v2: the tuning corpus; fresh: the held-out set made after tuning")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: experiments/data/early_stopping_corpus_<set>.jsonl")
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
        from shiftlab.experiments.early_stopping_corpus_v1 import build_v1

        build_v1(CORPUS_V1, 100, args.budget_s)
        return 0
    path, design_fn = SETS[args.set]
    build(args.out or default_corpus_out(path), args.runs, args.budget_s, args.start,
          args.cheap_first, design_fn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
