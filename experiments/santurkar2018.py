"""Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch Normalization Help Optimization?".

One command: ``python -m shiftlab.experiments.santurkar2018`` (CPU scale: mnist1d + 1-D CNN, then the
25-layer deep linear network); ``--scale gpu`` runs the paper's VGG / CIFAR-10 setup
(``configs/experiment/santurkar2018_vgg.yaml``). Writes PNGs and SUMMARY.md into ``--out``.

(a) train accuracy of none vs batchnorm vs noisy_bn; (b) gradient ICS per layer (Def. 2.1),
BN vs none; (c) loss-landscape measures, BN vs none; (d) the deep linear network (25 layers of
10x10, 1000 Gaussian samples, full-batch GD) with and without BN, ICS per layer.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shiftlab.experiments import harness
from shiftlab.experiments.harness import (base_parser, output_dir, epoch_series, median, plt, probe_history, run, series,
                                setup_threads, write_report)

NORMS = ("none", "batchnorm", "noisy_bn")
COLORS = {"none": "C3", "batchnorm": "C0", "noisy_bn": "C2"}


# ------------------------------------------------------------------------------- (a)-(c): CNN runs
def cnn_runs(out: Path, scale: str, quick: bool, reuse: bool) -> dict[str, Path]:
    exp = "santurkar2018" if scale == "cpu" else "santurkar2018_vgg"
    dirs = {}
    for norm in NORMS:
        extra = ["trainer.max_epochs=3"] if quick else []
        d = out / f"{exp}_{norm}"
        run([f"experiment={exp}", f"norm={norm}", "test=false"] + extra, d, reuse=reuse)
        dirs[norm] = d
    return dirs


def _ics_layers(hist: list[dict[str, Any]]) -> list[str]:
    return sorted({k[:-3] for h in hist for k in h if k.endswith("/l2")}, key=lambda n: [int(t) if t.isdigit() else t
                                                                                         for t in n.split(".")])


def figures_cnn(out: Path, dirs: dict[str, Path]) -> dict[str, Any]:
    p = plt()
    m: dict[str, Any] = {}
    # (a) training accuracy
    fig, ax = p.subplots(figsize=(5, 3.5))
    for norm, d in dirs.items():
        s, v = epoch_series(d, "train/acc")
        ax.plot(s, [100 * a for a in v], color=COLORS[norm], label=norm)
        m[f"acc/{norm}"] = v
        m[f"acc_steps/{norm}"] = s
    ax.set_xlabel("step")
    ax.set_ylabel("training accuracy (%)")
    ax.set_title("(a) train accuracy (epoch means)")
    ax.legend()
    harness.savefig(fig, out / "fig_a_train_accuracy.png")
    # (b) ICS per layer
    hists = {n: probe_history(d, "gradient_ics") for n, d in dirs.items()}
    layers = _ics_layers(hists["batchnorm"])
    fig, axes = p.subplots(2, len(layers), figsize=(3 * len(layers), 5.2), squeeze=False)
    for j, layer in enumerate(layers):
        for norm in ("none", "batchnorm", "noisy_bn"):
            for i, key in enumerate(("l2", "cos")):
                s, v = series(hists[norm], f"{layer}/{key}")
                axes[i][j].plot(s, v, color=COLORS[norm], label=norm, lw=1)
                m[f"ics/{norm}/{layer}/{key}"] = median(v)
        axes[0][j].set_title(f"weight layer {layer}", fontsize=9)
        axes[1][j].set_xlabel("step")
    axes[0][0].set_ylabel("||G - G'||_2")
    axes[1][0].set_ylabel("cos(G, G')")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("(b) gradient ICS (Def. 2.1)")
    harness.savefig(fig, out / "fig_b_ics.png")
    m["ics_layers"] = layers
    # (c) landscape
    lands = {n: probe_history(d, "landscape") for n, d in dirs.items()}
    fig, axes = p.subplots(1, 3, figsize=(12, 3.4))
    for norm in ("none", "batchnorm"):
        s, lo = series(lands[norm], "loss_min")
        _, hi = series(lands[norm], "loss_max")
        axes[0].fill_between(s, lo, hi, color=COLORS[norm], alpha=0.4, label=norm)
        s, dlo = series(lands[norm], "grad_diff_min")
        _, dhi = series(lands[norm], "grad_diff_max")
        axes[1].fill_between(s, dlo, dhi, color=COLORS[norm], alpha=0.4, label=norm)
        s, b = series(lands[norm], "beta_smoothness")
        axes[2].plot(s, b, color=COLORS[norm], label=norm)
        for key in ("loss_range", "grad_diff_max", "beta_smoothness"):
            m[f"land/{norm}/{key}"] = median(series(lands[norm], key)[1])
    for ax, t in zip(axes, ("loss landscape (range of L)", "gradient predictiveness", "effective beta-smoothness")):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.suptitle("(c) landscape along the gradient, eta in [0.5, 4] x lr")
    harness.savefig(fig, out / "fig_c_landscape.png")
    return m


# ------------------------------------------------------------------------------- (d): deep linear net
def deep_linear_net(norm: str, depth: int, width: int, seed: int) -> nn.Module:
    """``depth`` bias-free ``width x width`` linear layers, a norm layer after each but the last.
    Weights ~ N(0, 1/width) so the product neither explodes nor vanishes at initialisation."""
    from shiftlab.trainers.norms import create_norm_layer

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(width, width, bias=False)
        nn.init.normal_(lin.weight, std=1 / math.sqrt(width))
        layers.append(lin)
        if i < depth - 1:
            layers.append(create_norm_layer(norm, width, 0))
    return nn.Sequential(*layers)


def run_dln(norm: str, steps: int, lr: float, probe_every: int, seed: int = 0) -> dict[str, Any]:
    """Full-batch GD on ``y = A x`` (1000 Gaussian samples), loss = half the summed squared error."""
    from shiftlab.callbacks.covariate_shift import gradient_ics

    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1000, 10, generator=g)
    a = torch.randn(10, 10, generator=g) / math.sqrt(10)
    y = x @ a.T
    model = deep_linear_net(norm, 25, 10, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def loss_fn(pred, target):
        return 0.5 * ((pred - target) ** 2).sum()

    losses, ics = [], []
    t0 = time.perf_counter()
    for step in range(steps):
        if probe_every and step % probe_every == 0:
            res = gradient_ics(model, loss_fn, x, y, opt)
            ics.append({"step": step, **{f"{k}/{m}": v[m] for k, v in res.items() for m in ("l2", "cos")}})
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()) / 1000)  # per-sample, for plotting
        if not math.isfinite(losses[-1]):
            break
    return {"losses": losses, "ics": ics, "seconds": time.perf_counter() - t0}


def figures_dln(out: Path, dln: dict[str, dict[str, Any]]) -> dict[str, Any]:
    p = plt()
    m: dict[str, Any] = {}
    # ICS keys are Sequential indices (every other one with norms); plot against the layer number i
    fig, axes = p.subplots(1, 3, figsize=(13, 3.4))
    for norm, col in (("none", "C3"), ("batchnorm", "C0")):
        r = dln[norm]
        axes[0].semilogy(r["losses"], color=col, label=norm)
        names = sorted({k[:-3] for h in r["ics"] for k in h if k.endswith("/l2")}, key=int)
        med_l2 = [median(series(r["ics"], f"{n}/l2")[1]) for n in names]
        med_cos = [median(series(r["ics"], f"{n}/cos")[1]) for n in names]
        idx = list(range(2, len(names) + 2))
        axes[1].semilogy(idx, med_l2, "o-", color=col, label=norm, ms=3)
        axes[2].plot(idx, med_cos, "o-", color=col, label=norm, ms=3)
        m[f"dln/{norm}/final_loss"] = r["losses"][-1] if r["losses"] else float("nan")
        m[f"dln/{norm}/cos_median"] = median(med_cos)
        m[f"dln/{norm}/l2_median"] = median(med_l2)
        m[f"dln/{norm}/cos_by_layer"] = med_cos
    axes[0].set_title("DLN training loss (per sample)", fontsize=9)
    axes[0].set_xlabel("step")
    axes[1].set_title("median ||G - G'||_2 over training", fontsize=9)
    axes[2].set_title("median cos(G, G') over training", fontsize=9)
    for ax in axes[1:]:
        ax.set_xlabel("layer i")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle("(d) 25-layer deep linear network, full-batch GD")
    harness.savefig(fig, out / "fig_d_deep_linear_ics.png")
    return m


# ------------------------------------------------------------------------------- report
def verdicts(m: dict[str, Any], dln_lr: float) -> list[tuple[str, str, str, str]]:
    rows = []
    fin = {n: 100 * m[f"acc/{n}"][-1] for n in NORMS}
    third = {n: 100 * m[f"acc/{n}"][max(0, len(m[f'acc/{n}']) // 3 - 1)] for n in NORMS}
    held_a = (fin["noisy_bn"] >= fin["batchnorm"] - 3 and min(third["batchnorm"], third["noisy_bn"]) >= third["none"] + 3)
    rows.append(("(a) noisy BN nearly matches BN; both train far faster than no BN",
                 f"final train acc none/BN/noisy = {fin['none']:.1f}/{fin['batchnorm']:.1f}/{fin['noisy_bn']:.1f}%; "
                 f"after 1/3 of training {third['none']:.1f}/{third['batchnorm']:.1f}/{third['noisy_bn']:.1f}%",
                 "yes" if held_a else "no",
                 "criterion: noisy BN within 3 points of BN at the end, and both >= 3 points above none after a third of training"))
    layers = m["ics_layers"]
    cos_bn = median([m[f"ics/batchnorm/{l}/cos"] for l in layers])
    cos_no = median([m[f"ics/none/{l}/cos"] for l in layers])
    l2_bn = median([m[f"ics/batchnorm/{l}/l2"] for l in layers])
    l2_no = median([m[f"ics/none/{l}/l2"] for l in layers])
    cos_nz = median([m[f"ics/noisy_bn/{l}/cos"] for l in layers])
    held_b = cos_bn <= cos_no + 0.05
    rows.append(("(b) BN does not reduce gradient ICS",
                 f"median over layers of the median cos(G,G'): BN {cos_bn:.3f} vs none {cos_no:.3f} "
                 f"(noisy BN {cos_nz:.3f}); "
                 f"||G-G'||: BN {l2_bn:.3g} vs none {l2_no:.3g}",
                 "yes" if held_b else "no",
                 "criterion: BN's cos(G,G') not higher than no-BN's by more than 0.05 (a higher cos = less ICS); "
                 "||G-G'|| is scale dependent (BN changes gradient magnitudes), so it is reported but not judged"))
    keys = ("loss_range", "grad_diff_max", "beta_smoothness")
    smaller = [m[f"land/batchnorm/{k}"] < m[f"land/none/{k}"] for k in keys]
    rows.append(("(c) BN makes the landscape smoother (less loss variation, more predictive gradients, smaller beta)",
                 "; ".join(f"{k}: BN {m[f'land/batchnorm/{k}']:.3g} vs none {m[f'land/none/{k}']:.3g}" for k in keys),
                 "yes" if all(smaller) else ("partly" if any(smaller) else "no"),
                 "medians over the probes of the run; held = BN smaller on all three"))
    if "dln/batchnorm/cos_median" in m:
        c_bn, c_no = m["dln/batchnorm/cos_median"], m["dln/none/cos_median"]
        rows.append(("(d) deep linear net: BN does not reduce ICS",
                     f"median cos(G,G') BN {c_bn:.4f} vs none {c_no:.4f}; final loss/sample BN "
                     f"{m['dln/batchnorm/final_loss']:.4g} vs none {m['dln/none/final_loss']:.4g} (lr {dln_lr:g})",
                     "yes" if c_bn <= c_no + 0.05 else "no", "same criterion as (b)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dln-steps", type=int, default=10000)
    p.add_argument("--dln-lr", type=float, default=1e-6)
    p.add_argument("--dln-probe-every", type=int, default=100)
    p.add_argument("--skip-cnn", action="store_true")
    args = p.parse_args(argv)
    setup_threads(args.threads)
    out = output_dir("santurkar2018", args.quick, args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    m: dict[str, Any] = {}
    figs = []
    if not args.skip_cnn:
        m.update(figures_cnn(out, cnn_runs(out, args.scale, args.quick, args.reuse)))
        figs += ["fig_a_train_accuracy.png", "fig_b_ics.png", "fig_c_landscape.png"]
    steps = 1000 if args.quick else args.dln_steps
    cache = out / "dln.json"
    key = {"steps": steps, "lr": args.dln_lr, "probe_every": args.dln_probe_every}
    cached = json.loads(cache.read_text()) if args.reuse and cache.exists() else {}
    if cached.get("key") == key:
        dln = cached["runs"]
    else:
        dln = {n: run_dln(n, steps, args.dln_lr, args.dln_probe_every) for n in ("none", "batchnorm")}
        cache.write_text(json.dumps({"key": key, "runs": dln}))
    for n, r in dln.items():
        print(f"[dln {n}] {r['seconds']:.1f}s final loss/sample {r['losses'][-1]:.4g}", flush=True)
    m.update(figures_dln(out, dln))
    figs.append("fig_d_deep_linear_ics.png")
    rows = verdicts(m, args.dln_lr) if not args.skip_cnn else []
    notes = [
        "Scale: " + ("mnist1d (4000 train+val samples), 1-D CNN with 4 conv blocks of 32 channels, SGD lr 0.1, "
                     "batch 128, constant lr, 30 epochs (~850 steps) -- not the paper's VGG/CIFAR-10 (15k steps); "
                     "`--scale gpu` runs that config (configs/experiment/santurkar2018_vgg.yaml)."
                     if args.scale == "cpu" else "VGG-11 / CIFAR-10, SGD lr 0.1, batch 128, 39 epochs."),
        "Training accuracy is the per-epoch mean of the mini-batch accuracies in training mode (noise on for noisy BN).",
        "ICS and landscape probes run every 25 steps on the batch of that step, on a deep copy of the model "
        "(training mode, batch statistics); the run itself is unaffected (tested bit-identical).",
        "Deep linear network: 25 bias-free 10x10 layers, N(0, 1/10) init, BN after each but the last, "
        "targets y = A x with a random A, loss = half the *summed* squared error over the 1000 samples "
        f"(our choice; the paper's target and loss scaling are not restated here), full-batch GD, lr {args.dln_lr:g}, "
        f"{steps} steps, ICS of layers 2..25 every {args.dln_probe_every} steps.",
        "Single seed per configuration: differences of a point or two are within seed noise.",
    ]
    if args.quick:
        notes.insert(0, "QUICK run (--quick): a pipeline smoke test, not a reproduction.")
    cmd = "python -m shiftlab.experiments.santurkar2018 " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(out, "Santurkar et al. 2018 -- BatchNorm, ICS and the loss landscape", cmd.strip(), rows, notes,
                 figs, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
