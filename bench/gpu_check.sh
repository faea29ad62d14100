#!/usr/bin/env bash
# One-shot GPU check of the Triton and CUDA backends (issue 4). Run from anywhere on a
# machine with an NVIDIA GPU (H100/H200 intended), a CUDA build of torch, triton and nvcc:
#
#   bash bench/gpu_check.sh [check|bench|all]   # PYTHON=... to pick the interpreter, OUT=dir for results
#
# `check` runs steps 1-3c (each bounded by `timeout`: 9.5 minutes at most, so it fits a 10-minute
# command limit), `bench` runs steps 1 and 4 (4.5 minutes at most), `all` (the default) both in turn.
# On a lent machine with a 10-minute limit per command, run `check`, then `bench` as a second call.
#   1. environment report (GPU, torch/triton/nvcc versions); CUDA_HOME from /usr/local/cuda when unset and
#      the nvcc on PATH is a wrapper outside a toolkit (torch would take the folder above it)
#   2. build the CUDA extension (torch.utils.cpp_extension, cached in TORCH_EXTENSIONS_DIR)
#   3. the GPU tests: tests/backends/test_cuda.py, then tests/backends/test_triton.py (bfloat16 included; each
#      with its own timeout, so one failing or slow file hides nothing of the other), with a size heuristic
#      instead of Triton autotuning so that compiles stay few
#   3b. NaN/Inf propagation on the GPU (tests/backends/test_gpu_nan.py: triton and cuda against
#      torch autograd, forward and backward)
#   3c. the study's four architectures (batched; the cnn in its grouped-convolution layout), one training
#      step each on image, events, series and text stems, against the CPU (bench/gpu_models_check.py:
#      a float64 pass, and a float32 pass that runs the GPU kernels themselves)
#   4. the benchmark table (bench/gpu_bench.py, autotuned): fused vs plain F.linear+ReLU vs
#      naive energy vs torch.compile at 4096x4096 bf16 and at the study's MLP sizes, the
#      batched G=10 form vs a loop of 10 models, and the batched CNN's conv epilogue
#      (grouped conv + activation_energy(groups=10) vs a loop of 10 members). Written to
#      $OUT/gpu_table.md.
# Exit status: 1 if the build, a test or the benchmark failed (the later steps still run); 2 for a bad
# argument or where no CUDA GPU (or no torch) is visible.
set -uo pipefail
MODE=${1:-all}
case "$MODE" in check|bench|all) ;; *) echo "usage: bash bench/gpu_check.sh [check|bench|all]" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
ROOT=$(pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PYTHON="$ROOT/.venv/bin/python"
  else
    PYTHON=python3
  fi
fi
OUT=${OUT:-/tmp/minaction_gpu_check}
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$OUT/torch_extensions}
export MINACTION_VERBOSE_BUILD=${MINACTION_VERBOSE_BUILD:-0}
START=$(date +%s)
status=0
stamp() { echo "== [$(( $(date +%s) - START ))s] $*"; }

stamp "environment"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4
else
  echo "nvidia-smi: not on PATH"
fi
"$PYTHON" - <<'PY' 2>&1 | tail -3
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
command -v nvcc >/dev/null && nvcc --version | tail -1
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  tk=$(dirname "$(dirname "$(command -v nvcc)")")
  if [ ! -f "$tk/include/cuda_runtime_api.h" ] && [ -f /usr/local/cuda/include/cuda_runtime_api.h ]; then
    export CUDA_HOME=/usr/local/cuda
    echo "CUDA_HOME=$CUDA_HOME (the nvcc on PATH is outside a toolkit: $(command -v nvcc))"
  fi
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "torch is not importable with $PYTHON: set PYTHON to an interpreter with a CUDA build of torch and triton"
  exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU visible to torch ($PYTHON): nothing to check here; the CI checks cover the kernels without one"
  exit 2
fi

stamp "minaction importable?"
if ! "$PYTHON" -c "import minaction, minaction.kernels, minaction._csrc" 2>"$OUT/import.err"; then
  echo "minaction is not importable with $PYTHON; trying an editable install (offline)"; tail -2 "$OUT/import.err"
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" 2>&1 | tail -3
  if ! "$PYTHON" -c "import minaction, minaction.kernels, minaction._csrc" 2>/dev/null; then
    # last resort: a throw-away package tree mapping kernels/ and csrc/ where setup.py puts them
    echo "editable install failed; using a package shim under $OUT/shim"
    rm -rf "$OUT/shim" && mkdir -p "$OUT/shim" && cp -r "$ROOT/minaction" "$OUT/shim/minaction"
    ln -s "$ROOT/kernels" "$OUT/shim/minaction/kernels" && ln -s "$ROOT/csrc" "$OUT/shim/minaction/_csrc"
    export PYTHONPATH="$OUT/shim:$PYTHONPATH"
  fi
fi
"$PYTHON" -c "import minaction, minaction.kernels as k; print('minaction from', minaction.__file__, '| kernels', k.__file__)"

if [ "$MODE" != bench ]; then
stamp "build the CUDA extension"
timeout 120 "$PYTHON" - <<'PY' 2>&1 | tail -20
import time, torch
t = time.time()
from minaction.backends import cuda
from minaction.backends import select as backend
try:
    cuda.load()
    print(f"cuda extension built/loaded in {time.time() - t:.1f}s")
    ok = True
except Exception as exc:
    print("CUDA EXTENSION BUILD FAILED:", type(exc).__name__, exc)
    ok = False
for name in ("triton", "cuda"):
    print(name, backend.available(name, "cuda"))
raise SystemExit(0 if ok else 1)
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stamp "GPU tests: the cuda backend"
MINACTION_TRITON_AUTOTUNE=0 timeout 90 "$PYTHON" -m pytest -q -p no:cacheprovider \
  tests/backends/test_cuda.py --durations=5 2>&1 | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stamp "GPU tests: the triton backend (each new shape compiles: the slow step)"
MINACTION_TRITON_AUTOTUNE=0 timeout 210 "$PYTHON" -m pytest -q -p no:cacheprovider \
  tests/backends/test_triton.py --durations=5 2>&1 | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stamp "NaN/Inf tests"
MINACTION_TRITON_AUTOTUNE=0 timeout 90 "$PYTHON" -m pytest -q -p no:cacheprovider \
  tests/backends/test_gpu_nan.py --durations=3 2>&1 | tail -12
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stamp "the study's architectures on the GPU (one training step each, batched, against the CPU)"
timeout 60 "$PYTHON" bench/gpu_models_check.py --device cuda 2>&1 | tail -45
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

[ "$MODE" = check ] && { stamp "done (status $status)"; exit $status; }
stamp "benchmark"
timeout 270 "$PYTHON" bench/gpu_bench.py --out "$OUT/gpu_table.md" 2>&1 | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stamp "done (status $status); table in $OUT/gpu_table.md"
exit $status
