#!/usr/bin/env bash
# One device call: install the carried wheels, then run the benchmark lines of a plan in order.
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_session.sh PLAN_FILE
# PLAN_FILE: one command a line; '#' lines skipped; $W in a line is the run's work directory.
# Everything is written under W (default /tmp/run); after each line W/*.jsonl and a tarball of
# W (logs, profile summaries, HLO; raw traces left out) are copied to $OUT when it is set.
set -u
W=${W:-/tmp/run}
mkdir -p "$W"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl .whl2/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$W/gpu.txt"
# The host CPU too: the bitsandbytes peer launches its kernels from eager PyTorch, so its speed
# may follow the host (session 3 saw it 1.3-1.9x faster than in earlier sessions).
lscpu 2>/dev/null | grep -E 'Model name|^CPU\(s\)' | tee -a "$W/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$W/gpu.txt"
i=0
while IFS= read -r line; do
  case "$line" in ''|'#'*) continue;; esac
  i=$((i+1))
  line=${line//\$W/$W}
  echo "== [$i] $(date +%T) $line"
  bash -c "$line" > "$W/log_$i.txt" 2>&1
  echo "rc=$? $(date +%T)"
  grep -E '^\{|^qlora_jax /|passed|failed|Error' "$W/log_$i.txt" | cut -c1-1200 | tail -6
  if [ -n "${OUT:-}" ]; then  # keep what is done so far, should a later line run past the limit
    cp "$W"/*.jsonl "$OUT/" 2>/dev/null
    tar czf "$OUT/run.tgz" -C "$W" --exclude='*.pb' --exclude='*.json.gz' . 2>/dev/null
  fi
done < "$1"
if [ -n "${OUT:-}" ]; then
  t=$(ls "$W"/prof_8b/plugins/profile/*/perfetto_trace.json.gz 2>/dev/null | head -1)
  [ -n "$t" ] && [ "$(stat -c %s "$t")" -lt 15000000 ] && cp "$t" "$OUT/perfetto_8b.json.gz"
fi
