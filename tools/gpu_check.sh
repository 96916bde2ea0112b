#!/usr/bin/env bash
# vae_fast's GPU check, for one machine with a GPU and at most ~9 minutes (`make gpu-check`):
#
#   env        the GPU, nvcc, torch and the tools found
#   build      the extension with CUDA for sm_90 against this machine's torch (offline:
#              pip install --no-build-isolation --no-deps -e .)
#   smoke      tools/gpu_check_driver.py: every kernel path, CUDA against the CPU kernels
#   train      an eager training step under torch.cuda.set_sync_debug_mode("error"), and
#              one captured in a CUDA graph and replayed (tests/test_cuda.py; and
#              tests/test_autograd.py's no-sync step)
#   test       tests/test_cuda.py and the CUDA cases of the suite (pytest -k cuda)
#   memcheck   compute-sanitizer memcheck on the driver (small shapes)
#   racecheck  compute-sanitizer racecheck on the driver (shared memory of the reductions)
#   bench      fused elbo forward+backward, fp32 and bf16, at 65536x784x32,
#              4096x12288x128 and 256x49152x256, against eager, torch.compile and a copy
#   sass       registers per kernel, and whether the 16-byte stores reached the SASS
#   ncu        (not run by default) Nsight Compute on the benchmark-sized calls
#
# Run from the repository root:   OUT=dir bash tools/gpu_check.sh   (or make gpu-check)
#
# Read OUT/SUMMARY.md first: one line per stage (status, seconds, its key line), then
# the lines worth reading from the logs, then the benchmark table. OUT defaults to
# ./gpu-check-out; it receives at most 8 files (what a device run brings back): SUMMARY.md,
# build.log, tests.log, sanitizer.log, bench.log, bench.json, bench.md, sass.log.
#
# Environment: PYTHON (python3: the interpreter with the CUDA torch), BUDGET (seconds
# for the whole script, default 530), STAGES (default below; e.g. STAGES="build ncu" on a
# still-warm machine: the build is then incremental), TORCH_CUDA_ARCH_LIST (9.0),
# DRY_RUN=1 (or --dry-run: print each stage's commands, run nothing).
#
# It builds into the environment of PYTHON (an editable install), so it refuses to run
# where that torch sees no GPU: on a CPU machine it would replace a CPU build others use.

set -u -o pipefail
START=$SECONDS
BUDGET=${BUDGET:-530}
STAGES=${STAGES:-"env build sass smoke train test bench memcheck racecheck benchcompile"}
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-}
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT=${OUT:-$PWD/gpu-check-out}

if [ ! -f pyproject.toml ] || [ ! -d csrc/cuda ]; then
  echo "FATAL: run from the vae_fast repository root (no pyproject.toml / csrc/cuda in $PWD)" >&2
  exit 2
fi
[ -n "$DRY_RUN" ] || mkdir -p "$OUT" || exit 2
[ -n "$DRY_RUN" ] || OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d -t vae_fast_gpu_check.XXXXXX)
CUR=""
finish() {  # also on SIGTERM / the overall timeout: name the stage that was cut off
  [ -n "$CUR" ] && [ -f "$OUT/SUMMARY.md" ] && echo "| $CUR | INTERRUPTED (outer timeout) | $((SECONDS - t0)) | see ${LOG[$CUR]}.log |" >>"$OUT/SUMMARY.md"
  rm -rf "$WORK"
}
trap finish EXIT
SUMMARY=$OUT/SUMMARY.md
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_NO_INDEX=1 PIP_BREAK_SYSTEM_PACKAGES=1
export PYTHONFAULTHANDLER=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

# x CMD...: runs CMD, or with DRY_RUN prints it.
x() {
  if [ -n "$DRY_RUN" ]; then
    printf '  $'
    printf ' %q' "$@"
    echo
  else
    "$@"
  fi
}
left() { echo $((BUDGET - (SECONDS - START))); }

# ---- the CUDA toolkit: nvcc on PATH, CUDA_HOME/CUDACXX consistent
find_nvcc() {
  local c
  for c in "${CUDACXX:-}" "$(command -v nvcc 2>/dev/null)" "${CUDA_HOME:-/nonexistent}/bin/nvcc" \
    /usr/local/cuda/bin/nvcc $(printf '%s\n' /usr/local/cuda-*/bin/nvcc | sort -V -r); do
    [ -n "$c" ] && [ -x "$c" ] && { readlink -f "$c"; return 0; }
  done
  return 1
}
if NVCC=$(find_nvcc); then
  export CUDA_HOME=${NVCC%/bin/nvcc} CUDACXX=$NVCC
  export CUDA_PATH=$CUDA_HOME PATH=$CUDA_HOME/bin:$PATH
else
  NVCC="" CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
fi
tool() {  # a CUDA tool from the toolkit, PATH or the usual Nsight folders
  local t=$1 c
  for c in "$CUDA_HOME/bin/$t" "$(command -v "$t" 2>/dev/null)" $(ls -d "$CUDA_HOME"/compute-sanitizer/"$t" \
    /usr/local/cuda*/bin/"$t" /opt/nvidia/nsight-compute/*/"$t" 2>/dev/null); do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
  done
  echo "$t"  # not found: named as is (a dry run prints it; a real run fails on it)
  return 1
}

# ---- stages: each writes its output to stdout (kept in $WORK/<stage>.log)

stage_env() {
  x date
  x nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  echo "nvcc: ${NVCC:-NOT FOUND}"
  [ -n "$NVCC" ] && x "$NVCC" --version
  x "$PY" -c '
import importlib.util, sys, torch
print("python", sys.version.split()[0], sys.executable)
for m in ("numpy", "pytest", "hypothesis", "xdist", "pytest_timeout", "scikit_build_core", "pybind11", "cmake", "ninja"):
    print(f"  {m:18s}", "present" if importlib.util.find_spec(m) else "MISSING")
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
'
  local tv nv
  tv=$("$PY" -c "import torch; print((torch.version.cuda or '').split('.')[0])" 2>/dev/null)
  nv=$("$NVCC" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  if [ -n "$tv" ] && [ -n "$nv" ] && [ "$tv" != "$nv" ]; then
    echo "WARNING: nvcc is CUDA $nv but torch was built with CUDA $tv"
  fi
  echo "compute-sanitizer: $(tool compute-sanitizer)  ncu: $(tool ncu)  cuobjdump: $(tool cuobjdump)"
}

stage_build() {
  [ -n "$NVCC" ] || [ -n "$DRY_RUN" ] || { echo "no nvcc found"; return 1; }
  # The architectures go through TORCH_CUDA_ARCH_LIST (see csrc/cuda/cuda_arch.cmake).
  export VAE_FAST_CUDA=ON TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
  export CMAKE_BUILD_PARALLEL_LEVEL
  # cuRAND's headers: from the toolkit, else from torch's nvidia-curand wheel.
  if ! ls "$CUDA_HOME"/include/curand_kernel.h "$CUDA_HOME"/targets/*/include/curand_kernel.h >/dev/null 2>&1; then
    local inc
    inc=$("$PY" -c "import sys, glob; print(next((d for p in sys.path for d in glob.glob(p + '/nvidia/*/include') if glob.glob(d + '/curand_kernel.h')), ''))")
    if [ -n "$inc" ]; then
      mkdir -p "$WORK/curand" && ln -sf "$inc"/curand*.h "$WORK/curand/"
      export CPATH="$WORK/curand${CPATH:+:$CPATH}"
      echo "cuRAND headers from $inc"
    else
      echo "WARNING: no curand_kernel.h in the toolkit or a wheel: reparameterize.cu will not compile"
    fi
  fi
  echo "VAE_FAST_CUDA=$VAE_FAST_CUDA TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  x "$PY" -m pip install --no-build-isolation --no-deps -v -e . || return 1
  x "$PY" -c "from vae_fast import _C; print('vae_fast._C', _C.__file__, 'with_cuda', _C.with_cuda); assert _C.with_cuda"
}

stage_smoke() {
  x "$PY" tools/gpu_check_driver.py --device cuda --dtypes float32,bfloat16,float16,float64
}

pytest_args() {  # parallel workers and a per-test limit where the plugins are there
  "$PY" -c "import xdist" 2>/dev/null && printf '%s\n' -n 4
  "$PY" -c "import pytest_timeout" 2>/dev/null && printf '%s\n' --timeout=60 --timeout-method=thread
}

stage_train() {
  local extra=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra=(--timeout=60 --timeout-method=thread)
  x "$PY" -m pytest tests/test_cuda.py tests/test_autograd.py -k "cuda and training_step" -v -rfE \
    -p no:cacheprovider "${extra[@]}"
}

stage_test() {
  local extra
  mapfile -t extra < <(pytest_args)
  # test_cuda_source_compiles is nvcc again (the build just did it); the training steps
  # ran in their own stage.
  export OMP_NUM_THREADS=4  # 4 workers x 16 threads would oversubscribe the 16 cores
  x "$PY" -m pytest tests -k "cuda and not source_compiles and not training_step and not test_build" -v -rfE \
    -p no:cacheprovider --durations=10 "${extra[@]}"
}

# A caching allocator hides overruns inside its blocks: turned off under the sanitizer.
sanitize() {
  local san
  san=$(tool compute-sanitizer) || [ -n "$DRY_RUN" ] || { echo "no compute-sanitizer"; return 1; }
  x env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$1" --print-limit 30 --error-exitcode 9 \
    "${@:2}" "$PY" tools/gpu_check_driver.py --device cuda --small --dtypes float32,bfloat16
}
stage_memcheck() { sanitize memcheck --leak-check no --report-api-errors no; }
stage_racecheck() { sanitize racecheck --report-api-errors no; }

stage_bench() {
  x "$PY" bench/ops.py --device cuda --ops elbo_bernoulli elbo_gaussian --modes full \
    --dtype float32 bfloat16 --sizes 65536x784x32 4096x12288x128 256x49152x256 \
    --providers vae_fast eager roof \
    --vae-backend fused --no-sweep --no-memory --min-time 0.05 --rounds 3 --warmup 2 \
    --json "$OUT/bench.json" --markdown "$OUT/bench.md"
}

# Global stores per kernel, from the SASS: STG.E.128 is one 16-byte store; a float or
# 16-bit kernel whose body shows only 4-byte STG.E had its vectors split.
sass_stores() {
  "$1" -sass "$2" | awk '
    function flush(  k, s) { if (name == "") return; s = ""; for (k in n) s = s k "=" n[k] " "; print s "\t" name; delete n }
    /Function :/ { flush(); name = $3 }
    /STG\.E/ { match($0, /STG\.E[.A-Z0-9]*/); n[substr($0, RSTART, RLENGTH)]++ }
    END { flush() }' | c++filt | sed -E 's/vae_fast::cuda:://g; s/\(anonymous namespace\):://g' | cut -c1-220
}

stage_benchcompile() {  # torch.compile's 6 cold compiles: last, on what is left
  x "$PY" bench/ops.py --device cuda --ops elbo_bernoulli --modes full --dtype float32 bfloat16 \
    --sizes 65536x784x32 4096x12288x128 256x49152x256 --providers vae_fast compile \
    --vae-backend fused --no-sweep --no-memory --min-time 0.05 --rounds 3 --warmup 2 \
    --json "$OUT/bench.json" --append --markdown "$OUT/bench.md"
}

stage_sass() {
  local so cuobj
  cuobj=$(tool cuobjdump) || [ -n "$DRY_RUN" ] || { echo "no cuobjdump"; return 1; }
  so=$("$PY" -c "from vae_fast import _C; print(_C.__file__)" 2>/dev/null) || so="<vae_fast._C>"
  x "$cuobj" -res-usage "$so" || return 1
  x sass_stores "$cuobj" "$so"
}

stage_ncu() {
  local ncu
  ncu=$(tool ncu) || [ -n "$DRY_RUN" ] || { echo "no ncu"; return 1; }
  x "$ncu" --clock-control none --target-processes all -k "regex:rows_kernel|elbo_loss|reparameterize" -c 12 \
    --section SpeedOfLight --section LaunchStats --section Occupancy \
    "$PY" tools/gpu_check_driver.py --device cuda --profile
}

# ---- run
declare -A CAP=([benchcompile]=200 [env]=30 [build]=240 [smoke]=90 [train]=90 [test]=240 [memcheck]=150 [racecheck]=120
  [bench]=180 [sass]=40 [ncu]=150)
declare -A MIN=([benchcompile]=60 [env]=5 [build]=60 [smoke]=20 [train]=20 [test]=60 [memcheck]=45 [racecheck]=45
  [bench]=60 [sass]=10 [ncu]=40)
declare -A LOG=([benchcompile]=bench [env]=build [build]=build [smoke]=tests [train]=tests [test]=tests [memcheck]=sanitizer
  [racecheck]=sanitizer [bench]=bench [sass]=sass [ncu]=bench)
export -f x tool pytest_args sanitize sass_stores stage_env stage_build stage_smoke stage_train stage_test stage_memcheck \
  stage_racecheck stage_bench stage_benchcompile stage_sass stage_ncu
export PY OUT WORK NVCC CUDA_HOME DRY_RUN

if [ -n "$DRY_RUN" ]; then
  for s in $STAGES; do
    echo "== $s (limit ${CAP[$s]:-?}s; log $OUT/${LOG[$s]:-?}.log)"
    [ -n "${CAP[$s]:-}" ] && "stage_$s"
  done
  exit 0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "FATAL: $PY has no torch that sees a GPU (PYTHON=... picks the interpreter); nothing run" | tee "$SUMMARY" >&2
  exit 2
fi

{
  echo "# vae_fast GPU check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with local changes)'), stages: $STAGES, budget ${BUDGET}s"
  echo
  echo "| stage | status | seconds | key line |"
  echo "| --- | --- | --- | --- |"
} >"$SUMMARY"
row() { echo "| $1 | $2 | $3 | $4 |" >>"$SUMMARY"; }

FAILED="" BUILD_OK=1
for s in $STAGES; do
  [ -n "${CAP[$s]:-}" ] || { row "$s" "unknown stage" - -; continue; }
  if [ "$BUILD_OK" = 0 ] && [ "$s" != env ]; then row "$s" "skipped (no CUDA build)" 0 ""; continue; fi
  t=$(($(left) - 5))
  [ "$t" -gt "${CAP[$s]}" ] && t=${CAP[$s]}
  if [ "$t" -lt "${MIN[$s]}" ]; then row "$s" "skipped ($(left)s left)" 0 ""; continue; fi
  t0=$SECONDS CUR=$s
  { echo; echo "======== $s (limit ${t}s, started at $((SECONDS - START))s)"; } >>"$OUT/${LOG[$s]}.log"
  timeout -k 10 "$t" bash -c "stage_$s" 2>&1 | tee "$WORK/$s.log" >>"$OUT/${LOG[$s]}.log"
  rc=${PIPESTATUS[0]} CUR=""
  echo "======== $s: rc=$rc, $((SECONDS - t0))s" >>"$OUT/${LOG[$s]}.log"
  if [ $rc -eq 0 ]; then
    st=ok
  elif [ $rc -eq 124 ]; then
    st="TIMEOUT (${t}s)"
  else
    st="FAILED (rc=$rc)"
  fi
  [ $rc -eq 0 ] || FAILED="$FAILED $s"
  [ "$s" = build ] && [ $rc -ne 0 ] && BUILD_OK=0
  key=$(grep -aE '[0-9]+ (passed|failed)|DRIVER:|ERROR SUMMARY|RACECHECK SUMMARY|error:|Error|vae_fast._C' "$WORK/$s.log" |
    tail -1 | cut -c1-160 | tr '|' '/')
  row "$s" "$st" $((SECONDS - t0)) "$key"
done
{
  echo
  echo "Failed: ${FAILED:- none}. Total $((SECONDS - START))s. Logs: build.log (env, build), tests.log (smoke, train, test), sanitizer.log, bench.log, sass.log."
  echo
  echo "## Worth reading"
  echo
  echo '```'
  grep -ahE -m 15 "CMake Error|: error|error:|undefined reference|no kernel image" "$OUT"/build.log 2>/dev/null
  grep -ahE "^(FAILED|ERROR) |FAILED tests|Timeout|crashed|MISMATCH|DRIVER:|ERROR SUMMARY|RACECHECK SUMMARY|Invalid|out of bounds|[0-9]+ (passed|failed)|WARNING" \
    "$OUT"/build.log "$OUT"/tests.log "$OUT"/sanitizer.log 2>/dev/null | sort -u | head -60
  echo '```'
  if [ -f "$OUT/bench.md" ]; then
    echo
    echo "## Benchmark (bench.md)"
    echo
    cat "$OUT/bench.md"
  fi
} >>"$SUMMARY"
[ -z "$FAILED" ]
