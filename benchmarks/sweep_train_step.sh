#!/usr/bin/env bash
# Ablations of the 8B QLoRA step (one H100 call): each line is one configuration of ours.
# Usage: bash benchmarks/sweep_train_step.sh OUT_DIR
set -u
out=${1:-benchmarks/out}
base="--shape llama-8b --batch 1 --seq 2048 --rank 16 --steps 4 --out $out"
for extra in "" "--impl xla" "--remat dots_saveable" "--remat none" "--loss-chunk 2048" \
             "--loss-chunk 256" "--adapter-dtype bfloat16" "--offload-state"; do
  echo "== $extra"
  timeout 120 python3 -m benchmarks.train_step $base $extra 2>&1 | grep -v '^qlora_jax /'
done
