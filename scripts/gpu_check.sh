#!/usr/bin/env bash
# Every GPU test and a short train-step benchmark, in one run on a GPU machine (repo root).
#
# Usage: scripts/gpu_check.sh [PART ...]        (no PART: tests kernels bench)
#   tests    every test marked `gpu` (python -m pytest -m gpu tests) and the attention tests
#            whose tolerances depend on the device (tests/models/test_attention.py)
#   kernels  the Pallas 4-bit kernel tests with the kernels compiled for the GPU
#            (tests/quant/test_kernels.py, test_gemv.py, tests/models/test_in_place.py)
#   bench    python -m benchmarks.train_step --shape llama-8b --batch 1 --seq 2048 --rank 16
#   "CMD"    any other argument is run as a shell command (say another benchmark:
#            "python3 -m benchmarks.generate --out \$W"); $W is the work directory
#
# The wheels in .whl/ (bitsandbytes, ml_collections, qwix, tensorboardX, gguf, pytest-xdist,
# execnet: `kernels` then runs on GPU_WORKERS=4 pytest workers sharing the GPU) are installed
# into /tmp/site first. Each part runs under its own time limit (PART_TIMEOUT, default 240 s).
# On an H200 (session 6) `tests` took 202 s and `kernels`, on one process, ran past 270 s (48
# tests done): the workers are meant to bring it under its limit (not yet measured), else run
# the parts in separate calls with a larger PART_TIMEOUT. Written to $OUT (when set, at most 8
# files; updated after each part, so a run stopped at its limit still returns what is done):
# summary.txt (environment, and each part's exit code, seconds and last result lines),
# tests.log, kernels.log, bench.log, train_step.jsonl and logs.tgz (every log, the extra
# commands' too). Exit code: the number of parts that failed. The summary's first line gives the
# commit and a hash of the sources (`source_hash` below: compare it with a checkout's).
set -u
cd "$(dirname "$0")/.."
W=${W:-/tmp/gpu_check}
PART_TIMEOUT=${PART_TIMEOUT:-240}
mkdir -p "$W"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
source_hash() {  # sha1 of every .py file under qlora_jax/, tests/, benchmarks/ (sorted paths)
  find qlora_jax tests benchmarks -name '*.py' | LC_ALL=C sort | xargs cat | sha1sum | cut -c1-12
}
SUMMARY=$W/summary.txt
{
  # The device's copy of the tree may carry stale git metadata (session 8: every run read the
  # same commit): the hash of the sources themselves names the code that ran (the same command
  # on a checkout gives the same hash).
  echo "gpu_check $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null) sources $(source_hash) parts: ${*:-tests kernels bench}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tail -1
  python3 -c "import pytest; print('pytest', pytest.__version__)" 2>&1 | tail -1
} > "$SUMMARY"
cat "$SUMMARY"

save() {  # copy what is done so far to $OUT
  [ -n "${OUT:-}" ] || return 0
  cp "$SUMMARY" "$OUT/"
  for f in tests.log kernels.log bench.log train_step.jsonl; do
    [ -f "$W/$f" ] && cp "$W/$f" "$OUT/"
  done
  tar czf "$OUT/logs.tgz" -C "$W" --exclude='*.pb' --exclude='*.json.gz' . 2>/dev/null
}

PYTEST="python3 -m pytest -q -p no:cacheprovider -rfEs --durations=15"
XDIST=""
if python3 -c "import xdist" >/dev/null 2>&1; then
  XDIST="-n ${GPU_WORKERS:-4}"
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
fi
failed=0
n=0
run_part() {  # NAME COMMAND
  local name=$1 cmd=$2 t0 rc
  echo "== $name $(date -u +%T): $cmd" | tee -a "$SUMMARY"
  t0=$(date +%s)
  timeout "$PART_TIMEOUT" bash -c "$cmd" > "$W/$name.log" 2>&1
  rc=$?
  echo "rc=$rc $(( $(date +%s) - t0 )) s" | tee -a "$SUMMARY"
  grep -E '^RESULT|^\{|passed|failed|error|Error|^FAILED|^ERROR' "$W/$name.log" | cut -c1-600 \
    | tail -8 | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  save
}

[ $# -gt 0 ] || set -- tests kernels bench
for part in "$@"; do
  case "$part" in
    tests)
      run_part tests "$PYTEST -m gpu tests && $PYTEST tests/models/test_attention.py" ;;
    kernels)
      # Compiling dominates these tests (~5 s each on one process): several pytest workers share
      # the GPU (no preallocation, so each takes only what it uses) when pytest-xdist is there.
      run_part kernels "$PYTEST $XDIST tests/quant/test_kernels.py tests/quant/test_gemv.py tests/models/test_in_place.py" ;;
    bench)
      run_part bench "python3 -m benchmarks.train_step --shape llama-8b --batch 1 --seq 2048 \
--rank 16 --steps 6 --out $W" ;;
    *)
      n=$((n + 1))
      run_part "cmd_$n" "W=$W; ${part}" ;;
  esac
done
echo "parts failed: $failed" | tee -a "$SUMMARY"
save
exit "$failed"
