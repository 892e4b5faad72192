#!/usr/bin/env bash
# Proves on a GPU everything the CPU cannot (DESIGN section 5), from a fresh checkout:
#
#   bash benchmarks/gpu_proof.sh OUTDIR [tests|sanitize|bench|all]
#
#   tests     pytest -m gpu (every GPU-marked test)                       -> OUTDIR/tests.{log,xml}
#   sanitize  compute-sanitizer memcheck, racecheck and synccheck over every CUDA op on small
#             shapes (benchmarks/sanitize_driver.py), for each loader present -> OUTDIR/sanitize-*.log
#   bench     the pytest-benchmark suite's GPU rows (-m gpu)                -> OUTDIR/bench.{log,json}
#
# Builds the extension first if it is missing or was built without CUDA. Each stage runs under a
# 9-minute limit. Writes OUTDIR/summary.txt; exits non-zero if any stage failed, and at once on
# a machine without a GPU.
set -uo pipefail

usage() {
  echo "usage: bash benchmarks/gpu_proof.sh OUTDIR [tests|sanitize|bench|all]" >&2
  exit 2
}

[ $# -ge 1 ] || usage
STAGE="${2:-all}"
case "$STAGE" in tests | sanitize | bench | all) ;; *) usage ;; esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1" || exit 1
OUTDIR="$(cd "$1" && pwd)"
PY="${PYTHON:-python}"
STAGE_LIMIT="${VTOK_STAGE_LIMIT:-540}"
cd "$ROOT" || exit 1

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_proof: no NVIDIA GPU on this machine (nvidia-smi lists none): nothing here can be proven" >&2
  exit 1
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_proof: torch sees no CUDA device (a CPU-only torch build?): install a CUDA build of torch" >&2
  exit 1
fi

SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
FAILED=0
record() { # stage, status, detail
  printf '%-10s %-6s %s\n' "$1" "$2" "$3" | tee -a "$SUMMARY"
  [ "$2" = ok ] || FAILED=1
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null || echo "not a git checkout"
  nvidia-smi
} >"$OUTDIR/machine.txt" 2>&1

# ---------------------------------------------------------------- build
has_cuda_extension() {
  "$PY" - <<'PYEOF'
import sys
from vtok_kernels import _extension
module = _extension.get()
sys.exit(0 if module is not None and module.built_with_cuda else 1)
PYEOF
}
if ! has_cuda_extension >/dev/null 2>&1; then
  echo "gpu_proof: building the extension (log: $OUTDIR/build.log)"
  if MAX_JOBS="${MAX_JOBS:-$(nproc)}" timeout "$STAGE_LIMIT" "$PY" -m pip install --no-build-isolation -e . \
    >"$OUTDIR/build.log" 2>&1 && has_cuda_extension >>"$OUTDIR/build.log" 2>&1; then
    record build ok "vtok_kernels._C with CUDA"
  else
    # The CuPy loader can still run the kernels; the stages below say what is missing.
    record build FAIL "no CUDA extension; see build.log"
  fi
fi
"$PY" -m vtok_kernels info >"$OUTDIR/info.txt" 2>&1 || true

# ---------------------------------------------------------------- stages
run_tests() {
  timeout "$STAGE_LIMIT" "$PY" -m pytest tests -m gpu -q -rs -p no:cacheprovider \
    --junitxml="$OUTDIR/tests.xml" >"$OUTDIR/tests.log" 2>&1
  local status=$?
  if [ $status -eq 0 ]; then
    record tests ok "$(tail -n 1 "$OUTDIR/tests.log")"
  else
    record tests FAIL "exit $status ($( [ $status -eq 124 ] && echo 'over the time limit; ')$(tail -n 1 "$OUTDIR/tests.log"))"
  fi
}

find_sanitizer() {
  local candidate
  for candidate in "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda/bin/compute-sanitizer \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  # The PyPI wheel nvidia-cuda-sanitizer-api ships the tool inside site-packages.
  "$PY" - <<'PYEOF' 2>/dev/null
import pathlib, site, sys
for root in site.getsitepackages():
    for path in pathlib.Path(root, "nvidia").glob("**/compute-sanitizer"):
        if path.is_file():
            print(path)
            sys.exit(0)
sys.exit(1)
PYEOF
}

run_sanitize() {
  local sanitizer
  if ! sanitizer="$(find_sanitizer)"; then
    record sanitize FAIL "compute-sanitizer not found (CUDA toolkit, or pip install nvidia-cuda-sanitizer-api-cu12)"
    return
  fi
  local loaders=()
  local name
  for name in extension cupy-nvrtc; do
    if "$PY" -c "import sys; from vtok_kernels.backends import cuda; sys.exit(cuda.loader_reason('$name') is not None)" \
      2>/dev/null; then
      loaders+=("$name")
    fi
  done
  if [ ${#loaders[@]} -eq 0 ]; then
    record sanitize FAIL "no loader for the cuda backend (see info.txt)"
    return
  fi
  local started=$SECONDS tool loader status
  for loader in "${loaders[@]}"; do
    for tool in memcheck racecheck synccheck; do
      local left=$((STAGE_LIMIT - (SECONDS - started)))
      if [ $left -le 0 ]; then
        record "sanitize" FAIL "stage time limit reached before $tool/$loader"
        return
      fi
      local log="$OUTDIR/sanitize-$tool-$loader.log"
      timeout "$left" "$sanitizer" --tool "$tool" --error-exitcode 1 --print-limit 50 \
        "$PY" benchmarks/sanitize_driver.py --loader "$loader" >"$log" 2>&1
      status=$?
      if [ $status -eq 0 ]; then
        record "$tool" ok "$loader: $(grep -E 'ERROR SUMMARY|cases ran' "$log" | tr '\n' ' ')"
      else
        record "$tool" FAIL "$loader: exit $status, see $(basename "$log")"
      fi
    done
  done
}

run_bench() {
  timeout "$STAGE_LIMIT" "$PY" -m pytest benchmarks -m gpu --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUTDIR/bench.json" >"$OUTDIR/bench.log" 2>&1
  local status=$?
  case $status in
    0)
      record bench ok "$(tail -n 1 "$OUTDIR/bench.log")"
      # The committed form: record JSON, markdown table and plot, plus the downstream attention
      # time per sequence; copy OUTDIR/results/* into benchmarks/results/ and commit them.
      if "$PY" -m benchmarks.records "$OUTDIR/bench.json" --results "$OUTDIR/results" >"$OUTDIR/records.log" 2>&1 &&
        "$PY" -m benchmarks.token_economy --device cuda --out "$OUTDIR/results" >>"$OUTDIR/records.log" 2>&1; then
        record records ok "written to $OUTDIR/results"
      else
        record records FAIL "see records.log"
      fi
      ;;
    5) record bench FAIL "no GPU benchmarks collected under benchmarks/ (-m gpu)" ;;
    *) record bench FAIL "exit $status, see bench.log" ;;
  esac
}

case "$STAGE" in
  tests) run_tests ;;
  sanitize) run_sanitize ;;
  bench) run_bench ;;
  all)
    run_tests
    run_sanitize
    run_bench
    ;;
esac

echo "gpu_proof: logs and records in $OUTDIR"
exit $FAILED
