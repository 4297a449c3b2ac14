#!/usr/bin/env bash
# GPU proof of the Triton norm kernels (issue 16), in one call of at most ~8 minutes:
#   1. the @pytest.mark.gpu kernel tests (CUDA correctness, fp16/bf16, determinism, compile, large means)
#   2. python -m shiftlab.kernels.bench: bn, bn_relu, bn_add_relu, ln in bf16 then fp32 (ResNet-50 / LayerNorm
#      shapes, --quick set) vs eager and torch.compile (+ Liger-Kernel's LayerNorm when importable),
#      with a 1 GiB copy_ bandwidth reference measured in the same run; bench.md has the targets
#   3. python -m shiftlab.kernels.bench_step: ResNet-18 training step on CIFAR-shaped batches,
#      norm=batchnorm vs norm=triton_bn, eager and compiled
# Needs torch + triton only (no hydra/omegaconf/wandb). From the repository root:
#   bash kernels/gpu_proof.sh                         # on the GPU machine (no install needed)
#   bash kernels/gpu_proof.sh --smoke                 # CPU: tiny shapes in the Triton interpreter
# Env: OUT (./outputs/gpu_proof), PY (python3), TOTAL_S (470: whole-script budget; each stage is
#      cut at its cap or when the later stages' reserve would be eaten, whichever is first;
#      time a stage leaves unused goes to the next), PYTEST_S (cap 120), STEP_RESERVE_S (150),
#      BENCH_ARGS / STEP_ARGS (replace the defaults), WHEELS (.whl): a liger_kernel-*.whl there is
#      installed into /tmp/gpu_proof_site for the Liger peer.
# Files in $OUT (7, flat): gpu_proof.log proof.json pytest.xml bench.json bench.md bench.png step.json
set -u
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-./outputs/gpu_proof}
PY=${PY:-python3}
mkdir -p "$OUT"
# No install on the GPU machine: a namespace shim makes the folders importable as shiftlab.*
SHIM=$(mktemp -d)/shim; mkdir -p "$SHIM/shiftlab"
for d in kernels trainers callbacks configs; do ln -s "$PWD/$d" "$SHIM/shiftlab/$d"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/gpu_proof_inductor}
exec > >(tee "$OUT/gpu_proof.log") 2>&1

if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    BENCH_ARGS=${BENCH_ARGS:---cpu --ops bn,bn_relu,bn_add_relu,ln --compile off}
    STEP_ARGS=${STEP_ARGS:---smoke --modes eager}
    : "${TOTAL_S:=1500}" "${PYTEST_S:=300}" "${STEP_RESERVE_S:=300}"
else
    BENCH_ARGS=${BENCH_ARGS:---ops bn,bn_relu,bn_add_relu,ln --dtypes bf16,fp32 --quick --batches 128 --warmup 5 --rep 20}
    STEP_ARGS=${STEP_ARGS:---depth 18 --width 64 --batch 256 --steps 20 --warmup 3}
    : "${TOTAL_S:=470}" "${PYTEST_S:=120}" "${STEP_RESERVE_S:=150}"
fi
left() { echo $((TOTAL_S - SECONDS - $1)); }  # seconds left after keeping $1 in reserve

WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/liger_kernel-*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_proof_site "$WHEELS"/liger_kernel-*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_proof_site"
fi

STAGES=""
FAILED=""
stage() {  # stage NAME BUDGET_S CMD...: run with a time limit, record rc and seconds
    local name=$1 budget=$2 t0=$SECONDS rc
    shift 2
    if [ "$budget" -lt 5 ]; then
        echo "=== $name: skipped, no time left"
        STAGES="$STAGES${STAGES:+,}\"$name\": {\"rc\": null, \"seconds\": 0, \"budget\": $budget}"
        return
    fi
    echo "=== $name (budget ${budget}s): $*"
    timeout -k 10 "$budget" "$@"
    rc=$?
    [ "$rc" -ne 0 ] && FAILED="$FAILED $name"
    echo "=== $name: rc=$rc after $((SECONDS - t0)) s"
    STAGES="$STAGES${STAGES:+,}\"$name\": {\"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"budget\": $budget}"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
stage import 60 $PY -c "import shiftlab.kernels as kernels, shiftlab.kernels.bench, shiftlab.kernels.bench_step; print('kernels backend:', kernels.backend_name('cuda'))"
p=$(left $((STEP_RESERVE_S + 120)))
# --noconftest: tests/conftest.py composes Hydra configs (hydra/omegaconf are not on the GPU machine);
# the kernel tests use no fixture of it and set TRITON_INTERPRET themselves where there is no CUDA.
stage pytest_gpu $((p < PYTEST_S ? p : PYTEST_S)) $PY -m pytest --noconftest -m gpu tests/test_kernels_bn.py \
    tests/test_kernels_ln.py -q -p no:cacheprovider --junitxml="$OUT/pytest.xml"
# shellcheck disable=SC2086  # BENCH_ARGS / STEP_ARGS are word lists
stage bench "$(left $((STEP_RESERVE_S + 20)))" $PY -m shiftlab.kernels.bench "$OUT" $BENCH_ARGS
[ -f "$OUT/bench.json" ] && stage bench_report 30 $PY -m shiftlab.kernels.bench "$OUT" --report
# shellcheck disable=SC2086
stage step "$(left 10)" $PY -m shiftlab.kernels.bench_step "$OUT" $STEP_ARGS

STAGES_JSON="{$STAGES}" $PY - "$OUT/proof.json" <<'EOF'
import json, os, subprocess, sys
import torch
info = {"stages": json.loads(os.environ["STAGES_JSON"]), "torch": torch.__version__,
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET")}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=20).stdout[:20000]
except Exception as e:
    info["nvidia_smi"] = repr(e)
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info["stages"]))
EOF
echo "outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
[ -z "$FAILED" ] || { echo "stages failed or cut short:$FAILED"; exit 1; }
