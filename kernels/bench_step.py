"""End-to-end training-step time: a CIFAR ResNet with ``norm=batchnorm`` vs ``norm=triton_bn``.

    python -m shiftlab.kernels.bench_step OUT_DIR [--depth 18] [--width 64] [--batch 256] [--steps 20]
                                        [--modes eager,compile] [--dtype bf16|fp32] [--layout nhwc|nchw]
    python -m shiftlab.kernels.bench_step OUT_DIR --smoke     # tiny CPU run: checks the script, not the speed

Why: kernel micro-benchmarks miss launch overhead, layout changes and what torch.compile fuses
around the norm; a full SGD step (forward, cross-entropy, backward, optimizer) on synthetic
CIFAR-shaped batches (3x32x32, 10 classes) shows what a training run would gain. The ResNet and
both norms come from ``trainers`` (the same code ``norm=batchnorm`` / ``norm=triton_bn`` build),
which import with torch alone. Writes ``OUT_DIR/step.json``, rewritten after each configuration.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batchnorm", "triton_bn")
MODES = ("eager", "compile")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shiftlab.kernels.bench_step", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", nargs="?", default="outputs/bench_step")
    p.add_argument("--depth", type=int, default=18, help="ResNet depth: 18 or 6n+2")
    p.add_argument("--width", type=int, default=64, help="channels of the first stage")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image", type=int, default=32, help="image side (CIFAR: 32)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile happens here)")
    p.add_argument("--norms", default=",".join(NORMS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="bf16: autocast")
    p.add_argument("--layout", default="nhwc", choices=("nhwc", "nchw"))
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--smoke", action="store_true", help="tiny CPU configuration (depth 8, width 4, 8x8)")
    a = p.parse_args(argv)
    for key, allowed in (("norms", NORMS), ("modes", MODES)):
        vals = [v for v in getattr(a, key).split(",") if v]
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            p.error(f"--{key}={','.join(bad)} is not allowed; allowed: {', '.join(allowed)}")
        setattr(a, key, vals)
    if a.smoke:
        a.depth, a.width, a.batch, a.image, a.steps, a.warmup = 8, 4, 4, 8, 2, 1
    return a


def build_model(norm: str, depth: int, width: int, image: int, device: str) -> nn.Module:
    """The project's CIFAR ResNet with the named norm from the project's norm registry."""
    from shiftlab.trainers.models.resnet import ResNet
    from shiftlab.trainers.norms import norm_builder

    torch.manual_seed(0)  # same initial weights for every norm
    return ResNet((3, image, image), 10, depth=depth, base_width=width, norm=norm_builder(norm)).to(device)


def speedups(rows: list[dict]) -> dict[str, float]:
    """batchnorm step time / triton_bn step time, per mode where both were measured."""
    out = {}
    for mode in MODES:
        t = {r["norm"]: r["step_ms_median"] for r in rows if r["mode"] == mode}
        if len(t) == 2:
            out[mode] = t["batchnorm"] / t["triton_bn"]
    return out


def time_steps(step, n: int, cuda: bool) -> list[float]:
    """Per-step milliseconds: CUDA events on the GPU, a wall clock elsewhere."""
    out = []
    for _ in range(n):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def run_config(a: argparse.Namespace, norm: str, mode: str, device: str) -> dict:
    cuda = device == "cuda"
    fmt = torch.channels_last if a.layout == "nhwc" else torch.contiguous_format
    model = build_model(norm, a.depth, a.width, a.image, device).to(memory_format=fmt)
    fwd = torch.compile(model, backend=a.backend) if mode == "compile" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.batch, 3, a.image, a.image, generator=g).to(device).to(memory_format=fmt)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=a.dtype == "bf16")
    losses: list[float] = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t0
    ms = time_steps(step, a.steps, cuda)
    med = statistics.median(ms)
    return {"norm": norm, "mode": mode, "step_ms_median": med, "step_ms_min": min(ms), "step_ms": ms,
            "images_per_s": a.batch / med * 1e3, "warmup_s": warm_s,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "losses_first_last": [float(losses[0]), float(losses[-1])],
            "bn_modules": sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not a.smoke:
        print("shiftlab.kernels.bench_step: no CUDA device; nothing to measure (use --smoke for a CPU check).")
        return 0
    device = "cuda" if cuda else "cpu"
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from . import backend_name
    from .bench_report import is_smoke

    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "backend": backend_name(device),
            "torch": torch.__version__, "argv": sys.argv[1:],
            "config": {k: getattr(a, k) for k in ("depth", "width", "batch", "image", "steps", "warmup",
                                                  "dtype", "layout", "backend")}}
    rows: list[dict] = []
    for mode in a.modes:
        for norm in a.norms:
            r = run_config(a, norm, mode, device)
            rows.append(r)
            print(f"{mode:<8} {norm:<10} {r['step_ms_median']:9.3f} ms/step  {r['images_per_s']:10.0f} img/s"
                  f"  (warm-up {r['warmup_s']:.1f} s)", flush=True)
            result = {"meta": meta, "rows": rows, "speedup_triton_vs_torch_bn": speedups(rows)}
            (out / "step.json").write_text(json.dumps(result, indent=1))
    note = "  (CPU smoke run: not meaningful)" if is_smoke(meta) else ""
    print(f"speedup of triton_bn over batchnorm per mode: {speedups(rows)}{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
