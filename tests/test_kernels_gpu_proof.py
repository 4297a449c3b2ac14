"""The GPU proof tooling (kernels/gpu_proof.sh, shiftlab.kernels.bench, shiftlab.kernels.bench_step) checked on CPU.

The GPU machine has torch + triton but no hydra/omegaconf/wandb/mnist1d, and its time is short:
these tests make sure the script's parts import there and run end to end on tiny shapes here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # CPU: run the Triton kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of kernels

import pytest

REPO = Path(__file__).resolve().parent.parent

BLOCKED_IMPORTS = '''
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"hydra", "omegaconf", "wandb", "mnist1d"}:
            raise ImportError(f"{name} is not on the GPU machine")
sys.meta_path.insert(0, _Block())
'''


def test_proof_modules_import_without_hydra_and_friends():
    """kernels, shiftlab.kernels.bench, shiftlab.kernels.bench_step and the models/norms that bench_step builds."""
    code = BLOCKED_IMPORTS + (
        "import shiftlab.kernels, shiftlab.kernels.bench, shiftlab.kernels.bench_step\n"
        "for norm in ('batchnorm', 'triton_bn'):\n"
        "    m = shiftlab.kernels.bench_step.build_model(norm, 8, 4, 8, 'cpu')\n"
        "    print(norm, sorted({type(x).__name__ for x in m.modules() if 'Norm' in type(x).__name__}))\n"
        "assert 'hydra' not in sys.modules and 'omegaconf' not in sys.modules\n")
    # this process's own import path first: the subprocess must import the same shiftlab
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in sys.path if p] + [str(REPO)]),
               TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batchnorm ['BatchNorm2d']" in r.stdout and "triton_bn ['TritonBatchNorm2d']" in r.stdout


def test_bench_step_smoke(tmp_path):
    from shiftlab.kernels import bench_step

    assert bench_step.main([str(tmp_path), "--smoke", "--modes", "eager"]) == 0
    data = json.loads((tmp_path / "step.json").read_text())
    assert [(r["norm"], r["mode"]) for r in data["rows"]] == [("batchnorm", "eager"), ("triton_bn", "eager")]
    for r in data["rows"]:
        assert len(r["step_ms"]) == 2 and r["step_ms_median"] > 0
        assert all(torch.isfinite(torch.tensor(r["losses_first_last"])))
    # same seed, same init: the first loss agrees between the two norms (bf16 autocast)
    (a, _), (b, _) = (r["losses_first_last"] for r in data["rows"])
    assert abs(a - b) < 2e-2 * max(1.0, abs(a))
    assert set(data["speedup_triton_vs_torch_bn"]) == {"eager"}


def test_bench_step_rejects_unknown_norm(capsys):
    from shiftlab.kernels import bench_step

    with pytest.raises(SystemExit) as e:
        bench_step.parse(["x", "--norms", "groupnorm"])
    assert e.value.code == 2
    assert "--norms=groupnorm is not allowed; allowed: batchnorm, triton_bn" in capsys.readouterr().err


def _row(op, dtype, shape, ours, eager, compile_, pct=50.0):
    def t(ms, p=None):
        return {"fwd": ms / 3, "bwd": 2 * ms / 3, "fwd_bwd": ms, "fwd_bwd_pct_copy": p}

    return {"op": op, "dtype": dtype, "layout": "nhwc", "shape": shape, "ours": t(ours, pct),
            "eager": t(eager), "compile": t(compile_)}


def test_bench_report_targets_from_partial_json(tmp_path):
    """--report rebuilds the summary, the target table and the plot from whatever rows exist."""
    from shiftlab.kernels import bench

    rows = [_row("bn", "bf16", [128, 64, 112, 112], 1.0, 1.5, 0.9, pct=85.0),
            _row("bn", "bf16", [128, 1024, 14, 14], 1.0, 1.0, 1.1, pct=75.0),
            _row("ln", "bf16", [4096, 1024], 1.0, 0.9, 1.0),
            _row("ln", "bf16", [4096, 8192], 1.0, 1.3, 1.0)]
    meta = {"device": "test", "copy_peak": {"gbs": 1000.0}}
    (tmp_path / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    assert bench.main([str(tmp_path), "--report"]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    got = {t["target"]: (t["met"], t["value"]) for t in data["targets"]}
    assert got["BN bf16 >= 1.3x eager"] == (False, pytest.approx(1.5 ** 0.5))  # geomean of 1.5 and 1.0
    assert got["BN bf16 >= 1.0x torch.compile"] == (False, pytest.approx((0.9 * 1.1) ** 0.5))
    assert got["BN bf16 >= 80% of copy bandwidth (large shapes)"] == (False, 75.0)
    assert got["LN bf16 >= 1.0x eager at N = 1024"] == (False, pytest.approx(0.9))
    assert got["LN bf16 >= 1.2x eager at N >= 4096"] == (True, pytest.approx(1.3))
    assert got["BN+ReLU bf16 >= 1.15x torch.compile"] == (None, None)
    md = (tmp_path / "bench.md").read_text()
    assert "Device: test" in md and "| bn/bf16 |" in md and "**no**" in md
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_gpu_proof_script_parses():
    r = subprocess.run(["bash", "-n", str(REPO / "kernels" / "gpu_proof.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cpu_run_is_marked_not_meaningful(tmp_path):
    """A CPU (interpreter / fallback) run: every target "not meaningful" (neither met nor
    missed), the table and bench.md say so, and the figure is drawn on a log ratio axis."""
    from shiftlab.kernels import bench_report

    rows = [_row("bn", "bf16", [2, 3, 5, 7], 1.0, 152.0, 0.5), _row("ln", "bf16", [8, 1024], 1.0, 1e-4, 1.0)]
    for r in rows:
        r["eager_backend"] = "native"
    meta = {"device": "cpu", "backend": "triton-interpreter", "copy_peak": {"gbs": 10.0}}
    bench_report.write_outputs(tmp_path, meta, rows, final=True)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert all(t["met"] is None and "not meaningful" in t["note"] for t in data["targets"])
    md = (tmp_path / "bench.md").read_text()
    assert md.startswith("**CPU smoke run") and "**no**" not in md and "| yes |" not in md
    assert "not meaningful" in bench_report.fmt_row(rows[0], smoke=True)
    assert "not meaningful" not in bench_report.fmt_row(rows[0], smoke=False)
    assert (tmp_path / "bench.png").stat().st_size > 0
    # a GPU run with the same rows is judged against the targets
    gpu = dict(meta, device="NVIDIA H100", backend="triton")
    assert not bench_report.is_smoke(gpu) and bench_report.is_smoke(meta)
    assert bench_report.check_targets(bench_report.summarize(rows), smoke=False)[0]["met"] is True


def test_ratio_axis_limits_and_ticks():
    from shiftlab.kernels.bench_report import _bar_limits, _ratio_ticks

    lo, hi = _bar_limits([152.0, 0.5])
    assert lo == pytest.approx(1 / hi) and hi > 152.0 and lo < 1 / 152.0
    assert _ratio_ticks(lo, hi) == [0.01, 0.1, 1.0, 10.0, 100.0]
    lo, hi = _bar_limits([1.1, 0.9])
    assert (lo, hi) == pytest.approx((2 ** -1.25, 2 ** 1.25)) and _ratio_ticks(lo, hi) == [0.5, 1.0, 2.0]


def test_gpu_stage_collects_without_hydra():
    """gpu_proof.sh's pytest stage runs with --noconftest on a machine without hydra/omegaconf:
    the kernel test files must collect there (tests/conftest.py would import Hydra)."""
    code = BLOCKED_IMPORTS + (
        "import pytest\n"
        "sys.exit(pytest.main(['--noconftest', '-p', 'no:hydra_pytest', '-p', 'no:cacheprovider', '-m', 'gpu',\n"
        "                      '--collect-only', '-q', 'tests/test_kernels_bn.py', 'tests/test_kernels_ln.py']))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in sys.path if p] + [str(REPO)]),
               TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "test_gpu_matches_torch" in r.stdout and "test_gpu_layernorm" in r.stdout
    assert "--noconftest" in (REPO / "kernels" / "gpu_proof.sh").read_text()
