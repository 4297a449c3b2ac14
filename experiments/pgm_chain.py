"""Chain models as trainable model families, measured against the known optimum.

(a) HMM, unsupervised: gradient descent on log p(x) through the spine (mini-batch and exact
    full-batch, Adam and SGD) vs Baum-Welch EM, from the same random starts; per-token
    log-likelihood of the training set against epochs and against training wall time, beside
    the true model's value.
(b) Supervised tagging: linear-chain CRF vs a per-position softmax with the same encoder,
    across emission-noise levels, against the Bayes-optimal decoder (posterior marginals of the
    true HMM): accuracy, sequence accuracy, log p(y | x) per token, ECE.

    nice -n 10 .venv/bin/python experiments/pgm_chain.py [--seeds 3] [--out outputs/pgm_chain]

Writes PNGs, results.json and summary.md into the output directory. CPU, a few minutes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch

from shiftlab.experiments import harness
from shiftlab.trainers.models.chain import em, metrics
from shiftlab.trainers.models.hmm import HMM, true_model_scores


# (label, overrides) of the gradient-descent variants in part (a). Learning rates from a short
# sweep on seed 0 (mini Adam {0.02, 0.05, 0.15}, mini SGD {1, 3, 10}, full Adam {0.05, 0.15},
# full SGD {10, 30, 100}: 100 diverged, 30 oscillated); the loss is the per-token NLL.
GD_VARIANTS = {
    "GD mini-batch Adam": ["batching=mini", "batching.batch_size=64", "optimizer=adam", "optimizer.lr=0.05"],
    "GD mini-batch SGD": ["batching=mini", "batching.batch_size=64", "optimizer=sgd", "optimizer.lr=5.0"],
    "GD full-batch Adam": ["batching=full", "optimizer=adam", "optimizer.lr=0.15"],
    "GD full-batch SGD": ["batching=full", "optimizer=sgd", "optimizer.lr=20.0"],
}


# On top of the harness's quiet overrides: no callbacks, CPU (the study's timings are CPU timings).
QUIET = ["callbacks=none", "trainer.accelerator=cpu"]


class LikelihoodTrace(L.Callback):
    """Per epoch: cumulative training wall time (optimizer work only: the evaluation below is
    excluded) and the per-token log-likelihood of the whole training set."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.mask = x, x >= 0
        self.n_tok = float(self.mask.sum())
        self.train_time, self._t0 = 0.0, 0.0
        self.rows: list[dict] = []

    @torch.no_grad()
    def _record(self, pl_module, epoch: int) -> None:
        ll = metrics.log_likelihood(pl_module.model, self.x, None)
        self.rows.append({"epoch": epoch, "time": self.train_time, "ll": float(ll.sum()) / self.n_tok})

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(pl_module, 0)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.train_time += time.perf_counter() - self._t0
        self._record(pl_module, trainer.current_epoch + 1)


def run_hmm_gd(base: list[str], variant: list[str], seed: int, epochs: int):
    """One gradient-descent run through the spine's data module, module, optimizer, batching."""
    cfg = harness.compose(QUIET + base + variant + [f"seed={seed}", "data.seed=0", f"trainer.max_epochs={epochs}",
                                             "module.track_train_acc=false", "scheduler=constant"])
    dm, module = harness.build(cfg, seed=seed)
    init = module.model.params()
    trace = LikelihoodTrace(dm.train_set.x)
    harness.fit_bare(module, dm, epochs, [trace])
    return dm, module.model, init, trace.rows


def score_hmm(model, dm) -> dict:
    perm = metrics.fit_permutation(model, dm.val_set.x, dm.val_set.y)
    s, _ = metrics.evaluate(model, dm.test_set.x, dm.test_set.y, dm.true_params, perm)
    return {k: s[k] for k in ("acc", "seq_acc", "ll_per_token", "true_ll_per_token", "bayes_acc", "ece")}


def part_a(seeds: list[int], gd_epochs: dict[str, int], em_iters: int, base: list[str]) -> dict:
    curves: dict[str, list] = {name: [] for name in [*GD_VARIANTS, "Baum-Welch EM"]}
    finals: dict[str, list] = {name: [] for name in curves}
    true_train_ll = None
    for seed in seeds:
        for name, variant in GD_VARIANTS.items():
            kind = "full" if "full" in name else "mini"
            dm, model, init, rows = run_hmm_gd(base, variant, seed, gd_epochs[kind])
            curves[name].append(rows)
            finals[name].append(score_hmm(model, dm) | {"train_ll_per_token": rows[-1]["ll"],
                                                          "train_time_s": rows[-1]["time"]})
            print(f"[a] seed {seed} {name:20s} train ll/token {rows[-1]['ll']:.4f} "
                  f"({rows[-1]['time']:.1f} s, {len(rows) - 1} epochs)", flush=True)
        x, mask = dm.train_set.x, dm.train_set.x >= 0
        if true_train_ll is None:
            true_train_ll = float(true_model_scores(dm.true_params, x, mask)["log_px"].sum() / mask.sum())
        init32 = em.HMMParams(*(p.float() for p in (init.start, init.trans, init.emit)))
        fitted, hist = em.baum_welch(x, mask, init32, iterations=em_iters, dtype=torch.float32)
        rows = [{"epoch": i, "time": t, "ll": ll} for i, (t, ll) in enumerate(zip(hist.wall_time, hist.per_token))]
        # EM's clock starts before its first E-step; shift so that t=0 is the initial evaluation
        t0 = rows[0]["time"]
        for r in rows:
            r["time"] -= t0
        curves["Baum-Welch EM"].append(rows)
        finals["Baum-Welch EM"].append(score_hmm(HMM.from_params(fitted), dm)
                                       | {"train_ll_per_token": rows[-1]["ll"], "train_time_s": rows[-1]["time"]})
        print(f"[a] seed {seed} {'Baum-Welch EM':20s} train ll/token {rows[-1]['ll']:.4f} "
              f"({rows[-1]['time']:.1f} s, {len(rows) - 1} iterations)", flush=True)
    return {"curves": curves, "finals": finals, "true_train_ll_per_token": true_train_ll,
            "data": dm.describe()}


def part_b(noise_levels: list[float], seeds: list[int], epochs: int, out: Path) -> list[dict]:
    rows = []
    for noise in noise_levels:
        for model_name in ("crf", "softmax"):
            for seed in seeds:
                run_dir = out / "runs" / f"{model_name}_noise{noise}_seed{seed}"
                s = harness.run(QUIET + [f"experiment=pgm_{model_name}", f"data.emission_noise={noise}",
                                         f"seed={seed}", "data.seed=0", f"trainer.max_epochs={epochs}"], run_dir)
                row = {"model": model_name, "emission_noise": noise, "seed": seed, "wall_time_s": s["_wall_s"]}
                row.update({k.split("/", 1)[1]: s[k] for k in s if k.startswith("test/") and k != "test/confusion_matrix"
                            and isinstance(s[k], float)})
                rows.append(row)
                print(f"[b] noise {noise} {model_name:7s} seed {seed}: acc {row['acc']:.4f} "
                      f"(Bayes {row['bayes_acc']:.4f}) seq {row['seq_acc']:.3f} ece {row['ece']:.3f}", flush=True)
    return rows


def _mean(v: list[float]) -> float:
    return harness.mean_std(v)[0]


def _pm(v: list[float], digits: int) -> str:
    """Mean ± sd over random starts / seeds (harness, pandas)."""
    return harness.fmt_mean_std(v, 1.0, digits)


def plot_a(res: dict, out: Path) -> list[Path]:
    plt = harness.plt()
    paths = []
    colors = dict(zip(res["curves"], ["C0", "C1", "C2", "C3", "k"]))
    for xkey, fname, xlabel in (("epoch", "hmm_ll_vs_epoch.png", "epoch (EM: iteration)"),
                                ("time", "hmm_ll_vs_time.png", "training wall time [s]")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, runs in res["curves"].items():
            for i, rows in enumerate(runs):
                ax.plot([r[xkey] for r in rows], [r["ll"] for r in rows], color=colors[name], alpha=0.8, lw=1.2,
                        label=name if i == 0 else None)
        ax.axhline(res["true_train_ll_per_token"], color="grey", ls="--", lw=1, label="true model")
        lo = min(min(r["ll"] for r in runs[0][1:]) for runs in res["curves"].values())
        ax.set_ylim(lo - 0.02, res["true_train_ll_per_token"] + 0.03)
        if xkey == "epoch":
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("train log-likelihood per token")
        ax.set_title("HMM: gradient descent vs Baum-Welch (one line per random start)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(harness.savefig(fig, out / fname, dpi=110))
    return paths


def plot_b(rows: list[dict], out: Path) -> Path:
    plt = harness.plt()
    levels = sorted({r["emission_noise"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label in ((axes[0], "acc", "per-position accuracy"), (axes[1], "seq_acc", "sequence accuracy"),
                           (axes[2], "ll_per_token", "log p(y | x) per token")):
        for model, color in (("crf", "C0"), ("softmax", "C1")):
            stats = [harness.mean_std([r[key] for r in rows if r["model"] == model and r["emission_noise"] == n])
                     for n in levels]
            harness.plot_mean_spread(ax, levels, [m for m, _, _ in stats], [sd for _, sd, _ in stats],
                                     label=f"{model} (mean ± sd over seeds)", color=color)
        ceil = {"acc": "bayes_acc", "seq_acc": "bayes_seq_acc", "ll_per_token": "true_ll_per_token"}[key]
        ys = [_mean([r[ceil] for r in rows if r["emission_noise"] == n]) for n in levels]
        ax.plot(levels, ys, marker="s", ls="--", color="grey", label="Bayes / true model")
        ax.set_xlabel("emission noise")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("CRF vs per-position softmax (same encoder) against the Bayes-optimal ceiling")
    return harness.savefig(fig, out / "crf_vs_softmax.png", dpi=110)


def summary_md(a: dict, b: list[dict], args, wall: float) -> str:
    lines = ["# pgm_chain: chain HMMs and CRFs against the known optimum", "",
             f"Command: `nice -n 10 .venv/bin/python experiments/pgm_chain.py --seeds {args.seeds}`; "
             f"Machine: {harness.machine()}; total {wall:.0f} s.", "",
             "## (a) HMM: gradient descent vs Baum-Welch EM", "",
             f"Data: {json.dumps(a['data'])}.", "",
             f"True model's train log-likelihood per token: {a['true_train_ll_per_token']:.4f}. "
             "Mean ± sd over random starts (the same initial parameters for every method within a start); "
             "test accuracy after Hungarian matching on the validation split.", "",
             "| method | train ll/token | gap to true | train time [s] | test acc | Bayes acc | test seq acc | test ECE |",
             "|---|---|---|---|---|---|---|---|"]
    for name, fs in a["finals"].items():
        m = {k: _mean([f[k] for f in fs]) for k in fs[0]}
        pm = {k: _pm([f[k] for f in fs], d) for k, d in (("train_ll_per_token", 4), ("train_time_s", 1), ("acc", 4),
                                                           ("seq_acc", 3), ("ece", 3))}
        lines.append(f"| {name} | {pm['train_ll_per_token']} | {a['true_train_ll_per_token'] - m['train_ll_per_token']:.4f} "
                     f"| {pm['train_time_s']} | {pm['acc']} | {m['bayes_acc']:.4f} | {pm['seq_acc']} | {pm['ece']} |")
    lines += ["", "Per start (train ll/token): " + "; ".join(
        f"{name}: " + ", ".join(f"{f['train_ll_per_token']:.4f}" for f in fs) for name, fs in a["finals"].items()), "",
        "![ll vs epoch](hmm_ll_vs_epoch.png) ![ll vs time](hmm_ll_vs_time.png)", "",
        "## (b) CRF vs per-position softmax, same encoder (mean ± sd over seeds)", "",
        "| emission noise | model | test acc | Bayes acc | gap | seq acc | Bayes seq acc | ll/token | true ll/token | ECE |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for noise in sorted({r["emission_noise"] for r in b}):
        for model in ("crf", "softmax"):
            rs = [r for r in b if r["model"] == model and r["emission_noise"] == noise]
            m = {k: _mean([r[k] for r in rs]) for k in ("acc", "bayes_acc", "seq_acc", "bayes_seq_acc",
                                                         "ll_per_token", "true_ll_per_token", "ece")}
            pm = {k: _pm([r[k] for r in rs], d) for k, d in (("acc", 4), ("seq_acc", 3), ("ll_per_token", 4), ("ece", 3))}
            lines.append(f"| {noise} | {model} | {pm['acc']} | {m['bayes_acc']:.4f} | {m['bayes_acc'] - m['acc']:.4f} "
                         f"| {pm['seq_acc']} | {m['bayes_seq_acc']:.3f} | {pm['ll_per_token']} "
                         f"| {m['true_ll_per_token']:.4f} | {pm['ece']} |")
    lines += ["", "![crf vs softmax](crf_vs_softmax.png)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="random starts in (a); runs per cell in (b) = min(2, seeds)")
    ap.add_argument("--mini-epochs", type=int, default=30)
    ap.add_argument("--full-epochs", type=int, default=300)
    ap.add_argument("--em-iters", type=int, default=100)
    ap.add_argument("--crf-epochs", type=int, default=25)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    ap.add_argument("--out", type=str, default="outputs/pgm_chain")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = ["experiment=pgm_hmm"]
    a = part_a(list(range(args.seeds)), {"mini": args.mini_epochs, "full": args.full_epochs}, args.em_iters, base)
    plot_a(a, out)
    b = part_b(args.noise, list(range(min(2, args.seeds))), args.crf_epochs, out)
    plot_b(b, out)
    wall = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps({"a": a, "b": b}, indent=1))
    (out / "summary.md").write_text(summary_md(a, b, args, wall))
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
