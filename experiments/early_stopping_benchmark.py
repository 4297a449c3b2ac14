"""Benchmark of early-stopping rules on a corpus of real learning curves.

Why replay: a stopping rule only reads the curve, so each configuration is trained once to a
fixed long horizon, its per-epoch train/val/test loss and accuracy are cached, and every rule is
replayed on the cached curves (thousands of decisions in seconds, no retraining).

Corpus: the spine's data modules (digits, mnist1d, synthetic teacher) and models (mlp, cnn),
label noise {0, 0.2, 0.4}, optimizers {momentum SGD, Adam}, batch sizes {32, 128}, trained with
a plain PyTorch loop (constant learning rate, no early stopping) for ``--epochs`` epochs. The loop
matches what the Lightning module logs per epoch (train/loss = mean over the epoch's mini-batches,
val/test on the full split after the epoch) at a fraction of the CPU time.

Metrics per rule, on the held-out half of the corpus (configurations split in two at random with
``--split-seed``; the curvature rule's defaults are tuned on the other half):
``epochs``  mean fraction of the horizon trained (stop_epoch + 1) / horizon;
``regret``  test loss at the restored epoch minus the best test loss of the whole run (and the
            same for test accuracy, best minus restored, in points).

Usage::

    python -m experiments.early_stopping_benchmark --build            # train the corpus (~20 min)
    python -m experiments.early_stopping_benchmark --use-cache        # replay, table, plot
    python -m experiments.early_stopping_benchmark --use-cache --tune # re-tune curvature defaults
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parent
CORPUS = ROOT / "data" / "early_stopping_corpus.json"
OUT = ROOT.parent / "outputs" / "early_stopping_benchmark"

GRID = {
    "data": ["digits", "mnist1d", "synthetic"],
    "model": ["mlp", "cnn"],
    "label_noise": [0.0, 0.2, 0.4],
    "optimizer": ["momentum", "adam"],
    "batch_size": [32, 128],
}
LR = {"momentum": 0.05, "adam": 1e-3}


# ------------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------------
def corpus_configs() -> list[dict[str, Any]]:
    keys = list(GRID)
    out = []
    for i, values in enumerate(itertools.product(*(GRID[k] for k in keys))):
        cfg = dict(zip(keys, values))
        cfg["lr"] = LR[cfg["optimizer"]]
        cfg["seed"] = i
        cfg["id"] = "{data}-{model}-n{label_noise}-{optimizer}-b{batch_size}".format(**cfg)
        out.append(cfg)
    return out


def _datamodule(cfg: dict[str, Any]):
    from trainers.data import DigitsDataModule, MNIST1DDataModule, SyntheticDataModule

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


def _model(cfg: dict[str, Any], dm):
    from trainers.models.cnn import CNN
    from trainers.models.mlp import MLP

    if cfg["model"] == "mlp":
        return MLP(dm.input_shape, dm.num_classes, hidden=(128, 128))
    return CNN(dm.input_shape, dm.num_classes, channels=(32, 32, 32))


def train_curve(cfg: dict[str, Any], epochs: int) -> dict[str, list[float]]:
    """Train one configuration for ``epochs`` epochs; return per-epoch curves."""
    import torch
    import torch.nn.functional as F

    from trainers.optim import create_optimizer

    torch.manual_seed(cfg["seed"])
    dm = _datamodule(cfg)
    model = _model(cfg, dm)
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


def build_corpus(path: Path, epochs: int, budget_s: float, limit: int | None = None) -> dict:
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
    todo = [c for c in corpus_configs() if c["id"] not in done]
    random.Random(0).shuffle(todo)  # any prefix covers the grid evenly
    if limit is not None:
        todo = todo[:limit]
    t0 = time.time()
    for cfg in todo:
        if time.time() - t0 > budget_s:
            print(f"budget of {budget_s:.0f} s spent; {len(corpus['runs'])} runs cached")
            break
        t1 = time.time()
        run = dict(cfg, **train_curve(cfg, epochs))
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


# ------------------------------------------------------------------------------------------------
# replay and scoring
# ------------------------------------------------------------------------------------------------
def split_runs(runs: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Split configurations in two halves at random (seeded): (tune, report). The halves are
    drawn over the whole grid, so a run's side does not depend on which runs were built."""
    ids = sorted({c["id"] for c in corpus_configs()} | {r["id"] for r in runs})
    random.Random(seed).shuffle(ids)
    tune_ids = set(ids[: len(ids) // 2])
    return ([r for r in runs if r["id"] in tune_ids], [r for r in runs if r["id"] not in tune_ids])


def score(rule_name: str, kwargs: dict[str, Any], runs: list[dict]) -> dict[str, float]:
    """Replay one rule on every run; mean fraction of the horizon used and mean regrets."""
    from callbacks.early_stopping import make_rule, replay

    fracs, rl, ra, stops = [], [], [], []
    for run in runs:
        if rule_name == "none":
            val = run["val_loss"]
            stop, best = len(val) - 1, min(range(len(val)), key=val.__getitem__)
        else:
            d = replay(make_rule(rule_name, **kwargs), run["val_loss"], run["train_loss"])
            stop, best = d.stop_epoch, d.best_epoch
        tl, ta = run["test_loss"], run["test_acc"]
        stops.append(stop + 1)
        fracs.append((stop + 1) / len(tl))
        rl.append(tl[best] - min(tl))
        ra.append(100.0 * (max(ta) - ta[best]))

    def se(xs: list[float]) -> float:
        return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0

    return {"epochs": statistics.fmean(fracs), "epochs_se": se(fracs),
            "regret_loss": statistics.fmean(rl), "regret_loss_se": se(rl),
            "regret_acc": statistics.fmean(ra), "regret_acc_se": se(ra),
            "regret_loss_median": statistics.median(rl), "n": len(runs),
            "per_run": {"epochs": stops, "regret_loss": rl, "regret_acc": ra}}


BASELINES: list[tuple[str, str, dict[str, Any]]] = (
    [("no stopping (best val)", "none", {})]
    + [(f"patience={p}", "patience", {"patience": p}) for p in (3, 5, 10, 20)]
    + [(f"GL_{a:g}", "gl", {"alpha": a}) for a in (1, 2, 5, 10)]
    + [(f"PQ_{a:g}", "pq", {"alpha": a}) for a in (0.5, 1, 2)]
    + [(f"UP_{s_}", "up", {"s": s_}) for s_ in (2, 3, 4)]
)

TUNE_GRID = {
    "window": [8, 12, 16],
    "half_life": [None, 4.0, 8.0],
    "z": [1.5, 2.0, 3.0],
    "z_plateau": [0.0, 0.5, 1.0],
    "min_delta": [0.002, 0.005, 0.01, 0.02],
    "lookahead": [10.0, 30.0],
    "min_behind": [2, 4, 6],
    "plateau_behind": [2, 4, 6],
    "warmup": [5, 10],
    "confirm": [1, 2, 3],
    "robust": [0, 2],
    "restore": ["raw", "smoothed"],
}


def tune(runs: list[dict], reference: dict[str, float], samples: int, seed: int
         ) -> tuple[dict[str, Any], list[dict]]:
    """Random search over TUNE_GRID on ``runs``. Pick the fewest epochs among settings whose
    loss and accuracy regrets do not exceed ``reference`` (patience=10 on the same runs); if
    none qualifies, the lowest loss regret."""
    keys = list(TUNE_GRID)
    grid = list(itertools.product(*(TUNE_GRID[k] for k in keys)))
    rng = random.Random(seed)
    picks = rng.sample(grid, min(samples, len(grid)))
    table = []
    for i, values in enumerate(picks):
        kw = dict(zip(keys, values))
        sc = score("curvature", kw, runs)
        sc.pop("per_run")
        table.append({"kwargs": kw, **sc})
        if (i + 1) % 50 == 0:
            print(f"  tuned {i + 1}/{len(picks)}", flush=True)
    ok = [t for t in table if t["regret_loss"] <= reference["regret_loss"]
          and t["regret_acc"] <= reference["regret_acc"]]
    best = (min(ok, key=lambda t: (t["epochs"], t["regret_loss"])) if ok
            else min(table, key=lambda t: t["regret_loss"]))
    return best["kwargs"], table


def pareto(rows: list[dict]) -> set[str]:
    """Names of rows not dominated in (epochs, regret_loss)."""
    front = set()
    for a in rows:
        dominated = any(b is not a and b["epochs"] <= a["epochs"]
                        and b["regret_loss"] <= a["regret_loss"]
                        and (b["epochs"] < a["epochs"] or b["regret_loss"] < a["regret_loss"])
                        for b in rows)
        if not dominated:
            front.add(a["name"])
    return front


def plot_pareto(rows: list[dict], front: set[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    fam_colors = {"curvature": "tab:red", "patience": "tab:blue", "gl": "tab:green",
                  "pq": "tab:purple", "up": "tab:orange", "none": "black"}
    for r in rows:
        c = fam_colors.get(r["rule"], "gray")
        ax.errorbar(r["epochs"], r["regret_loss"], xerr=r["epochs_se"], yerr=r["regret_loss_se"],
                    fmt="*" if r["rule"] == "curvature" else "o", color=c,
                    ms=14 if r["rule"] == "curvature" else 6, alpha=0.9)
        ax.annotate(r["name"], (r["epochs"], r["regret_loss"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    fr = sorted((r for r in rows if r["name"] in front), key=lambda r: r["epochs"])
    ax.plot([r["epochs"] for r in fr], [r["regret_loss"] for r in fr], "k--", lw=0.8,
            label="Pareto front")
    ax.set_xlabel("mean fraction of the horizon trained")
    ax.set_ylabel("mean test-loss regret at the restored epoch (log)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(corpus: dict, curvature_kwargs: dict[str, Any], split_seed: int, out: Path,
           tuned: bool) -> dict:
    tune_runs, test_runs = split_runs(corpus["runs"], split_seed)
    rows = []
    for name, rule, kw in BASELINES + [("curvature (ours)", "curvature", curvature_kwargs)]:
        rows.append({"name": name, "rule": rule, "kwargs": kw, **score(rule, kw, test_runs)})
    front = pareto(rows)
    ref = next(r for r in rows if r["name"] == "patience=10")
    cur = rows[-1]
    goal = {
        "on_pareto_front": cur["name"] in front,
        "regret_loss_le_patience10": cur["regret_loss"] <= ref["regret_loss"],
        "regret_acc_le_patience10": cur["regret_acc"] <= ref["regret_acc"],
        "epochs_ratio_vs_patience10": cur["epochs"] / ref["epochs"],
    }
    # paired over the same runs: curvature minus patience=10
    d_ep = [a - b for a, b in zip(cur["per_run"]["epochs"], ref["per_run"]["epochs"])]
    d_rl = [a - b for a, b in zip(cur["per_run"]["regret_loss"], ref["per_run"]["regret_loss"])]
    goal["paired_epochs_diff"] = statistics.fmean(d_ep)
    goal["paired_epochs_diff_se"] = statistics.stdev(d_ep) / math.sqrt(len(d_ep))
    goal["paired_regret_loss_diff"] = statistics.fmean(d_rl)
    goal["paired_regret_loss_diff_se"] = statistics.stdev(d_rl) / math.sqrt(len(d_rl))
    goal["runs_curvature_stops_earlier"] = sum(x < 0 for x in d_ep)
    goal["runs_curvature_higher_regret"] = sum(x > 1e-12 for x in d_rl)
    goal["met"] = (goal["on_pareto_front"] and goal["regret_loss_le_patience10"]
                   and goal["epochs_ratio_vs_patience10"] <= 0.75)
    horizon = corpus["epochs"]
    lines = [
        f"Corpus: {len(corpus['runs'])} runs x {horizon} epochs ({corpus.get('machine', '?')}); "
        f"report half: {len(test_runs)} runs, tuning half: {len(tune_runs)} runs "
        f"(split seed {split_seed}).",
        f"Curvature settings{' (tuned on the other half)' if tuned else ''}: "
        + ", ".join(f"{k}={v}" for k, v in curvature_kwargs.items()),
        "",
        "| rule | epochs (frac. of horizon) | test-loss regret | test-acc regret (points) | Pareto |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["epochs"]):
        lines.append(f"| {r['name']} | {r['epochs']:.3f} +- {r['epochs_se']:.3f} | "
                     f"{r['regret_loss']:.4f} +- {r['regret_loss_se']:.4f} | "
                     f"{r['regret_acc']:.2f} +- {r['regret_acc_se']:.2f} | "
                     f"{'yes' if r['name'] in front else ''} |")
    lines += ["", f"Curvature vs patience=10: epochs ratio {goal['epochs_ratio_vs_patience10']:.2f}, "
              f"loss regret {cur['regret_loss']:.4f} vs {ref['regret_loss']:.4f}, "
              f"acc regret {cur['regret_acc']:.2f} vs {ref['regret_acc']:.2f} points; "
              f"on Pareto front: {goal['on_pareto_front']}; goal (front, regret <= patience=10, "
              f"<= 75% of its epochs) met: {goal['met']}.",
              f"Paired over the {len(test_runs)} held-out runs (curvature - patience=10): epochs "
              f"{goal['paired_epochs_diff']:+.1f} +- {goal['paired_epochs_diff_se']:.1f}, test-loss regret "
              f"{goal['paired_regret_loss_diff']:+.4f} +- {goal['paired_regret_loss_diff_se']:.4f}; "
              f"curvature stops earlier on {goal['runs_curvature_stops_earlier']} runs and has higher "
              f"regret on {goal['runs_curvature_higher_regret']}."]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "goal": goal,
                                                  "curvature_kwargs": curvature_kwargs}, indent=1))
    plot_pareto(rows, front, out / "pareto.png",
                f"Early-stopping rules on {len(test_runs)} held-out learning curves "
                f"({horizon}-epoch horizon)")
    print(text)
    return {"rows": rows, "goal": goal}


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", action="store_true", help="train (or extend) the corpus")
    ap.add_argument("--use-cache", action="store_true", help="replay the cached corpus")
    ap.add_argument("--tune", action="store_true",
                    help="re-tune the curvature defaults on the tuning half first")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--budget-s", type=float, default=1200.0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--tune-samples", type=int, default=400)
    args = ap.parse_args(list(argv) if argv is not None else None)
    if not (args.build or args.use_cache):
        ap.error("pass --build (train the corpus) and/or --use-cache (replay it)")
    if args.build:
        build_corpus(args.corpus, args.epochs, args.budget_s, args.limit)
    if not args.corpus.exists():
        raise SystemExit(f"--corpus={args.corpus} does not exist; build it with --build")
    corpus = json.loads(args.corpus.read_text())
    from callbacks.early_stopping import CurvatureRule

    kwargs: dict[str, Any] = {}
    if args.tune:
        tune_runs, _ = split_runs(corpus["runs"], args.split_seed)
        ref = score("patience", {"patience": 10}, tune_runs)
        print(f"tuning on {len(tune_runs)} runs; patience=10 there: "
              f"{ {k: v for k, v in ref.items() if k != 'per_run'} }")
        kwargs, table = tune(tune_runs, ref, args.tune_samples, args.split_seed)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tuning.json").write_text(json.dumps({"reference": ref, "table": table},
                                                         indent=1))
        print(f"tuned: {kwargs}")
    else:
        d = CurvatureRule()
        kwargs = {k: getattr(d, k) for k in TUNE_GRID}
    report(corpus, kwargs, args.split_seed, args.out, tuned=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
