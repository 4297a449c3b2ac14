"""Benchmark the Triton norms against eager PyTorch and torch.compile.

    python -m shiftlab.kernels.bench OUT_DIR [--ops bn,bn_relu,bn_add_relu,ln] [--dtypes bf16,fp32]
                                   [--batches 128,256] [--quick] [--compile static|dynamic|off]
    python -m shiftlab.kernels.bench OUT_DIR --report      # summary, targets, png again from bench.json

Writes ``OUT_DIR/bench.json`` (every row + summary, rewritten after each row so a run cut short
keeps what it measured), ``OUT_DIR/bench.png`` (speedups on a log axis) and ``OUT_DIR/bench.md``
(the issue's targets, met or missed), and prints a table; those three are built by
:mod:`.bench_report`. Dtypes are the outer loop (all of bf16 first).
Liger-Kernel's LayerNorm is timed as a peer on the LayerNorm shapes when ``liger_kernel`` imports.
Times are medians of ``triton.testing.do_bench`` in ms: ``fwd`` (training-mode forward with
autograd recording), ``bwd`` (backward of a retained graph) and ``fwd_bwd``.

Byte model (N elements of s bytes; parameters and statistics ignored):
BatchNorm fwd 3Ns (stats pass reads x, normalize pass reads x and writes y; +Ns per residual),
bwd 5Ns (reduce pass reads x, dy; dx pass reads x, dy, writes dx; +2Ns with a residual: read r,
write dr); LayerNorm fwd 2Ns, bwd 3Ns. Achieved GB/s = bytes / time, reported as a % of a
``copy_`` of the same tensor measured in the same run (2Ns / time).

Without CUDA it exits with a message, unless ``--cpu`` is given: then it runs a tiny smoke
configuration with a wall-clock timer (in the Triton interpreter when ``TRITON_INTERPRET=1``),
which checks the script, not the speed: such a run is marked "not meaningful" in the table,
``bench.md`` and the figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .bench_report import SMOKE_NOTE, fmt_row, is_smoke, write_outputs

# ResNet-50 (torchvision, 224x224) BatchNorm shapes (C, H, W), each listed once.
RESNET50_BN = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28),
               (512, 28, 28), (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14),
               (512, 7, 7), (2048, 7, 7)]
LN_M = [2048, 4096, 8192, 16384]
LN_N = [1024, 2048, 4096, 8192, 16384]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BN_OPS = ("bn", "bn_relu", "bn_add_relu")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shiftlab.kernels.bench", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", nargs="?", default="outputs/bench")
    p.add_argument("--ops", default="bn,bn_relu,ln",
                   help="comma list of bn, bn_relu, bn_add_relu, ln")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp16, fp32")
    p.add_argument("--batches", default="128,256", help="BatchNorm batch sizes")
    p.add_argument("--layouts", default="nchw,nhwc", help="comma list of nchw, nhwc")
    p.add_argument("--quick", action="store_true", help="a few shapes per op")
    p.add_argument("--compile", default="static", choices=("static", "dynamic", "off"),
                   help="torch.compile baseline: one graph per shape, dynamic shapes, or none")
    p.add_argument("--warmup", type=int, default=10, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=40, help="do_bench repetitions (ms)")
    p.add_argument("--cpu", action="store_true", help="smoke run without CUDA (tiny shapes)")
    p.add_argument("--report", action="store_true",
                   help="only rebuild summary, bench.md and bench.png from OUT_DIR/bench.json")
    a = p.parse_args(argv)
    for key, allowed in (("ops", BN_OPS + ("ln",)), ("dtypes", tuple(DTYPES)),
                         ("layouts", ("nchw", "nhwc"))):
        vals = [v for v in getattr(a, key).split(",") if v]
        bad = [v for v in vals if v not in allowed]
        if bad:
            p.error(f"--{key}={','.join(bad)} is invalid; allowed: {', '.join(allowed)}")
        setattr(a, key, vals)
    a.batches = [int(b) for b in a.batches.split(",") if b]
    return a


class Timer:
    """Median time in ms: ``do_bench`` on CUDA, a wall clock on CPU (smoke runs only)."""

    def __init__(self, cuda: bool, warmup: int, rep: int) -> None:
        self.cuda, self.warmup, self.rep = cuda, warmup, rep

    def __call__(self, fn: Callable[[], object], grad_to_none=None) -> float:
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep,
                                                 grad_to_none=grad_to_none, return_mode="median"))
        fn()
        ts = []
        for _ in range(3):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)


def eager_bn_backend(x: torch.Tensor, m: nn.BatchNorm2d) -> str:
    sel = getattr(torch._C, "_select_batch_norm_backend", None)
    if sel is None:
        return "unknown"
    try:
        return str(sel(x, m.weight, m.bias, m.running_mean, m.running_var, True, m.eps)).split(".")[-1]
    except Exception as e:  # pragma: no cover - depends on the torch build
        return f"unknown ({type(e).__name__})"


def peak_mib(fn: Callable[[], object], cuda: bool) -> float | None:
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def with_bandwidth(r: dict, bytes_: dict, copy_gbs: float) -> dict:
    """Add GB/s and % of the device-copy bandwidth to a timing row (ms per phase)."""
    for phase in ("fwd", "bwd", "fwd_bwd"):
        gbs = bytes_[phase] / max(r[phase], 1e-9) / 1e6
        r[f"{phase}_gbs"] = gbs
        r[f"{phase}_pct_copy"] = 100 * gbs / copy_gbs
    return r


def measure(timer: Timer, forward: Callable[[], torch.Tensor], dy: torch.Tensor, leaves: list,
            cuda: bool) -> dict:
    """fwd, bwd and fwd+bwd medians plus the fwd+bwd peak memory of one implementation."""
    def fb():
        forward().backward(dy)

    out = {"fwd": timer(forward, grad_to_none=leaves)}
    out["bwd"] = retained_backward(timer, forward, dy, leaves)
    out["bwd_method"] = "retain_graph" if out["bwd"] is not None else "fwd_bwd - fwd"
    out["fwd_bwd"] = timer(fb, grad_to_none=leaves)
    if out["bwd"] is None:
        out["bwd"] = max(out["fwd_bwd"] - out["fwd"], 0.0)
    for t in leaves:
        t.grad = None
    out["peak_mib"] = peak_mib(fb, cuda)
    return out


def retained_backward(timer: Timer, forward: Callable[[], torch.Tensor], dy: torch.Tensor,
                      leaves: list) -> float | None:
    """Backward of one retained graph, timed; None when the graph refuses a second backward
    (some compiled graphs do). The graph lives in this frame only, so it is freed on return."""
    y = forward()
    try:
        return timer(lambda: y.backward(dy, retain_graph=True), grad_to_none=leaves)
    except RuntimeError:
        return None


def copy_reference(timer: Timer, x: torch.Tensor) -> tuple[float, float]:
    """``(ms, GB/s)`` of a ``copy_`` of ``x`` into a fresh tensor: the bandwidth a row is
    compared with (2 bytes moved per byte of ``x``)."""
    dst = torch.empty_like(x)
    ms = timer(lambda: dst.copy_(x))
    return ms, 2 * x.numel() * x.element_size() / ms / 1e6


def compiled(fn: Callable, mode: str) -> Callable | None:
    if mode == "off":
        return None
    return torch.compile(fn, dynamic=(mode == "dynamic"))


def bn_rows(a: argparse.Namespace, op: str, dtype_name: str, device: str, timer: Timer,
            emit: Callable[[dict], None]) -> None:
    from . import TritonBatchNorm2d, TritonBatchNormReLU2d

    dtype = DTYPES[dtype_name]
    cuda = device == "cuda"
    shapes = RESNET50_BN if not (a.quick or a.cpu) else [RESNET50_BN[0], RESNET50_BN[8]]
    batches = a.batches if not a.cpu else [2]
    if a.cpu:
        shapes = [(3, 5, 7)]
    relu = op != "bn"
    for batch in batches:
        for C, H, W in shapes:
            for layout in a.layouts:
                fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
                x = torch.randn(batch, C, H, W, device=device, dtype=dtype).to(memory_format=fmt)
                x.requires_grad_()
                dy = torch.randn_like(x)
                res = torch.randn_like(x).requires_grad_() if op == "bn_add_relu" else None
                ours = (TritonBatchNormReLU2d if relu else TritonBatchNorm2d)(C).to(device)
                ref = nn.BatchNorm2d(C).to(device)

                def eager(ref=ref, x=x, res=res):
                    y = ref(x)
                    if res is not None:
                        y = y + res
                    return F.relu(y) if relu else y

                def ours_fn(ours=ours, x=x, res=res):
                    return ours(x, res)

                impls: dict[str, Callable] = {"ours": ours_fn, "eager": eager}
                comp = compiled(eager, a.compile)
                if comp is not None:
                    impls["compile"] = comp
                leaves_of = {"ours": [x, ours.weight, ours.bias], "eager": [x, ref.weight, ref.bias],
                             "compile": [x, ref.weight, ref.bias]}
                if res is not None:
                    for v in leaves_of.values():
                        v.append(res)
                n_el, s = x.numel(), x.element_size()
                extra = 1 if res is not None else 0
                bytes_ = {"fwd": (3 + extra) * n_el * s, "bwd": (5 + 2 * extra) * n_el * s}
                bytes_["fwd_bwd"] = bytes_["fwd"] + bytes_["bwd"]
                t_copy, copy_gbs = copy_reference(timer, x)
                row = {"op": op, "dtype": dtype_name, "layout": layout, "shape": [batch, C, H, W],
                       "eager_backend": eager_bn_backend(x.detach(), ref), "copy_ms": t_copy,
                       "copy_gbs": copy_gbs, "bytes": bytes_}
                for name, fn in impls.items():
                    row[name] = with_bandwidth(measure(timer, fn, dy, leaves_of[name], cuda), bytes_, copy_gbs)
                emit(row)
                del x, dy, res


def ln_rows(a: argparse.Namespace, dtype_name: str, device: str, timer: Timer,
            emit: Callable[[dict], None]) -> None:
    from . import TritonLayerNorm

    dtype = DTYPES[dtype_name]
    cuda = device == "cuda"
    grid = [(m, n) for m in LN_M for n in LN_N]
    if a.quick:
        grid = [(4096, 1024), (4096, 4096), (8192, 8192), (4096, 16384)]
    if a.cpu:
        grid = [(8, 64)]
    for M, N in grid:
        x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        ours = TritonLayerNorm(N, device=device, dtype=dtype)
        ref = nn.LayerNorm(N, device=device, dtype=dtype)
        impls: dict[str, Callable] = {"ours": lambda: ours(x), "eager": lambda: ref(x)}
        comp = compiled(lambda: ref(x), a.compile)
        if comp is not None:
            impls["compile"] = comp
        leaves_of = {"ours": [x, ours.weight, ours.bias], "eager": [x, ref.weight, ref.bias],
                     "compile": [x, ref.weight, ref.bias]}
        peer = liger_layernorm(N, device, dtype)
        if peer is not None:
            impls["liger"] = lambda: peer(x)
            leaves_of["liger"] = [x, peer.weight, peer.bias]
        n_el, s = x.numel(), x.element_size()
        bytes_ = {"fwd": 2 * n_el * s, "bwd": 3 * n_el * s, "fwd_bwd": 5 * n_el * s}
        t_copy, copy_gbs = copy_reference(timer, x)
        row = {"op": "ln", "dtype": dtype_name, "layout": "rows", "shape": [M, N],
               "eager_backend": "native", "copy_ms": t_copy, "copy_gbs": copy_gbs, "bytes": bytes_}
        for name, fn in impls.items():
            try:
                r = measure(timer, fn, dy, leaves_of[name], cuda)
            except Exception as e:  # a peer that fails here is reported, not fatal
                if name != "liger":
                    raise
                row["liger_error"] = f"{type(e).__name__}: {e}"[:300]
                continue
            row[name] = with_bandwidth(r, bytes_, copy_gbs)
        emit(row)


def liger_layernorm(N: int, device: str, dtype: torch.dtype) -> nn.Module | None:
    """Liger-Kernel's Triton LayerNorm (same eps and affine init as ours), or None if absent."""
    try:
        from liger_kernel.transformers import LigerLayerNorm
    except Exception:
        return None
    return LigerLayerNorm(N, eps=1e-5, bias=True).to(device=device, dtype=dtype)


def copy_peak(device: str, cuda: bool, timer: "Timer") -> dict:
    """Device-to-device ``copy_`` of 1 GiB (1 MiB on CPU): the bandwidth ceiling of this run."""
    n = (1 << 30) if cuda else (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return {"bytes_moved": 2 * n, "ms": ms, "gbs": 2 * n / ms / 1e6}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    out = Path(a.out_dir)
    if a.report:
        data = json.loads((out / "bench.json").read_text())
        write_outputs(out, data["meta"], data["rows"], final=True)
        print((out / "bench.md").read_text() if data["rows"] else "no rows in bench.json")
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and not a.cpu:
        print("shiftlab.kernels.bench: no CUDA device; nothing to measure (use --cpu for a smoke run).")
        return 0
    device = "cuda" if cuda else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer(cuda, a.warmup, a.rep)
    from . import backend_name

    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "backend": backend_name(device),
            "torch": torch.__version__, "argv": sys.argv[1:], "compile": a.compile}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    meta["liger"] = liger_layernorm(8, device, torch.float32) is not None
    meta["copy_peak"] = copy_peak(device, cuda, timer)
    print(f"shiftlab.kernels.bench on {meta['device']} (kernels backend: {meta['backend']}); copy_ peak "
          f"{meta['copy_peak']['gbs']:.0f} GB/s; Liger peer: {meta['liger']}", flush=True)
    rows: list[dict] = []
    dtypes = a.dtypes if not a.cpu else ["fp32"]
    smoke = is_smoke(meta)
    if smoke:
        print(f"*** {SMOKE_NOTE} ***", flush=True)

    def emit(row: dict) -> None:
        rows.append(row)
        print(fmt_row(row, smoke), flush=True)
        write_outputs(out, meta, rows, final=False)

    for dt in dtypes:
        for op in a.ops:
            if op == "ln":
                ln_rows(a, dt, device, timer, emit)
            else:
                bn_rows(a, op, dt, device, timer, emit)
    summary = write_outputs(out, meta, rows, final=True)
    print(json.dumps(summary, indent=1))
    print((out / "bench.md").read_text())
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
