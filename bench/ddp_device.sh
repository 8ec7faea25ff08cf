#!/usr/bin/env bash
# Issue 13 on a two-GPU machine: GRPO on the pack on one GPU, then with trainer=ddp trainer.devices=2, at the same
# global batch (rl.batch_size prompts a step, split over the processes), from no warm-up.
#
#   bash bench/ddp_device.sh [STEPS] [SECONDS_PER_RUN]        (defaults: 12 steps, 240 s a run; one call < 9 min)
#
# Expects what bench/pack_experiment_device.sh expects (wheels in /tmp/site, the pack in /tmp/data, the GGUF).
# Steps per second are timed between the step-2 and the last step rows of each run's curves.csv (polled every
# 0.2 s; the first steps compile and warm caches), so model loading and validation are left out. Each run validates
# once, after its last step, on all of holdout_val. Samples differ between the two runs: each generation call is
# seeded by its first prompt, and one GPU samples 16 prompts a call where each DDP process samples 8
# (rl.generation_batch_size=8 would make them the same). Logs and run folders (no weights) go to $OUT.
set -u
steps=${1:-12}
seconds=${2:-240}
runs=${RUNS:-/tmp/ddp_runs}
mkdir -p "$runs" "$OUT"
export PYTHONPATH=/tmp/site:$PWD CQR_CACHE_DIR=/tmp/cqr_cache PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1

python3 bench/cache_pack_model.py >>"$runs/prepare.log" 2>&1 || { tail -30 "$runs/prepare.log"; exit 1; }

run() {  # run NAME [key=value ...]: one GRPO run, timed from its curves
  local name=$1
  shift
  local dir="$runs/$name" log="$runs/$name.log" curves="$runs/$name/rl/curves.csv"
  rm -rf "$dir"
  timeout --signal=TERM --kill-after=30 "$seconds" python3 train.py experiment=pack_smollm2 stage=rl \
    pipeline.warmup=false "run_dir=$dir" data.dir=/tmp/data logger=none trainer.accelerator=gpu seed=0 \
    "rl.max_steps=$steps" "rl.val_every_n_steps=$steps" rl.checkpoint_every_n_steps=1000 rl.table_every_n_steps=0 \
    "$@" >"$log" 2>&1 &
  local pid=$! first="" last=""
  while kill -0 "$pid" 2>/dev/null; do
    if [ -z "$first" ] && grep -q "^2,train/reward_mean" "$curves" 2>/dev/null; then first=$(date +%s.%N); fi
    if [ -z "$last" ] && grep -q "^$steps,train/reward_mean" "$curves" 2>/dev/null; then last=$(date +%s.%N); fi
    sleep 0.2
  done
  wait "$pid"
  echo "== $name (exit $?)"
  grep -E "Error|error:" "$log" | tail -5
  if [ -n "$first" ] && [ -n "$last" ]; then
    python3 -c "print(f'steps/s {($steps - 2) / ($last - $first):.3f} (steps 2 to $steps)')"
  else
    echo "steps/s: not measured (the run did not reach step $steps in ${seconds} s)"
  fi
  echo "validation MRR@3 (holdout_val) after step $steps: $(grep 'val/mrr_at_3' "$curves" 2>/dev/null | tail -1 | cut -d, -f3)"
}

started=$(date +%s)
only=" ${ONLY:-one_gpu ddp_2gpu} "  # ONLY=one_gpu or ONLY=ddp_2gpu runs one of the two (e.g. to share the machine)
read -r -a extra <<<"${EXTRA:-}"  # EXTRA="rl.batch_size=64" adds the same overrides to both runs
[[ $only == *" one_gpu "* ]] && run one_gpu trainer.devices=1 "${extra[@]}"
[[ $only == *" ddp_2gpu "* ]] && run ddp_2gpu trainer=ddp trainer.devices=2 "${extra[@]}"
echo "total $(($(date +%s) - started)) s"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
cp "$runs"/*.log "$OUT"/
tar czf "$OUT/runs.tgz" --exclude='*.safetensors' --exclude='*.ckpt' --exclude='*.bin' -C "$runs" .
