#!/usr/bin/env bash
# One-shot GPU check of the Triton and CUDA backends (issue 4). Run from anywhere on a
# machine with an NVIDIA GPU (H100/H200 intended), a CUDA build of torch, triton and nvcc:
#
#   bash bench/gpu_check.sh            # PYTHON=... to pick the interpreter, OUT=dir for results
#
# Steps (each bounded by `timeout`, 13.5 minutes at most in all; expected well under 8 on an H100/H200):
#   1. environment report (GPU, torch/triton/nvcc versions)
#   2. build the CUDA extension (torch.utils.cpp_extension, cached in TORCH_EXTENSIONS_DIR)
#   3. the GPU tests: tests/backends/test_triton.py + tests/backends/test_cuda.py (bfloat16 included), with a
#      size heuristic instead of Triton autotuning so that compiles stay few
#   3b. NaN/Inf propagation on the GPU (tests/backends/test_gpu_nan.py: triton and cuda against
#      torch autograd, forward and backward)
#   3c. the study's four architectures (batched; the cnn in its grouped-convolution layout), one training
#      step each on image, events, series and text stems, against the CPU (bench/gpu_models_check.py)
#   4. the benchmark table (bench/gpu_bench.py, autotuned): fused vs plain F.linear+ReLU vs
#      naive energy vs torch.compile at 4096x4096 bf16 and at the study's MLP sizes, the
#      batched G=10 form vs a loop of 10 models, and the batched CNN's conv epilogue
#      (grouped conv + activation_energy(groups=10) vs a loop of 10 members). Written to
#      $OUT/gpu_table.md.
# Exit status: non-zero if the build or the tests failed (the table is still attempted).
set -uo pipefail
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4
"$PYTHON" - <<'PY' 2>&1
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY
command -v nvcc >/dev/null && nvcc --version | tail -1
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

stamp "build the CUDA extension"
timeout 150 "$PYTHON" - <<'PY' 2>&1 | tail -20
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

stamp "GPU tests"
MINACTION_TRITON_AUTOTUNE=0 timeout 180 "$PYTHON" -m pytest -q -x -p no:cacheprovider \
  tests/backends/test_triton.py tests/backends/test_cuda.py --durations=5 2>&1 | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stamp "NaN/Inf tests"
MINACTION_TRITON_AUTOTUNE=0 timeout 150 "$PYTHON" -m pytest -q -x -p no:cacheprovider \
  tests/backends/test_gpu_nan.py --durations=3 2>&1 | tail -12
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stamp "the study's architectures on the GPU (one training step each, batched, against the CPU)"
timeout 90 "$PYTHON" bench/gpu_models_check.py --device cuda 2>&1 | tail -20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stamp "benchmark"
timeout 240 "$PYTHON" bench/gpu_bench.py --out "$OUT/gpu_table.md" 2>&1 | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stamp "done (status $status); table in $OUT/gpu_table.md"
exit $status
