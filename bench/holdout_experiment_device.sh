#!/usr/bin/env bash
# Issue 12 on the GPU machine: recipes compared on held-out conversations, several seeds side by side.
#
#   VARIANTS="name:key=value,key=value name2:..." bash bench/holdout_experiment_device.sh SECONDS SEED [SEED ...]
#   (SEP=';' separates a variant's overrides by ';' instead, for values that hold commas, e.g. rl.rewards=[...])
#
# For each seed, one warm-up (`train.py experiment=pack_smollm2 stage=warmup`), then every variant's pipeline from
# that warm-up (its folder is copied in, so the pipeline skips the stage): GRPO with the variant's overrides, then
# the table on holdout_val (where settings are chosen), holdout_test and CAsT dev. The untuned and warm-up rows are
# evaluated in the first variant only (UNTUNED_ROW=false leaves the untuned row out: it does not depend on the seed). Runs share the GPUs in turn and the CPU cores evenly.
# Expects what bench/pack_experiment_device.sh expects (wheels in /tmp/site, the pack in /tmp/data, the GGUF).
# COMMON="key=value ..." adds overrides to every run, the warm-ups included (e.g. model.gradient_checkpointing=false).
# Every run is stopped with SIGTERM (it saves its current step) SECONDS after the start; calling again resumes.
set -u
seconds=$1
shift
seeds=("$@")
read -r -a variants <<<"${VARIANTS:-qr_filter:rl.skip_turns_solved_at_rank=1}"
read -r -a common <<<"${COMMON:-}"
runs=${RUNS:-/tmp/runs}
mkdir -p "$runs"
export PYTHONPATH=/tmp/site:$PWD CQR_CACHE_DIR=/tmp/cqr_cache PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
started=$(date +%s)
deadline=$((started + seconds))

python3 bench/cache_pack_model.py >>"$runs/prepare.log" 2>&1 || { tail -30 "$runs/prepare.log"; exit 1; }

gpus=$(nvidia-smi -L | wc -l)
jobs=$((${#seeds[@]} * ${#variants[@]}))
threads=$(($(nproc) / jobs))
threads=$((threads > 0 ? threads : 1))

train() {  # train GPU RUN_DIR LOG [key=value ...]: one train.py call, stopped at the deadline
  local gpu=$1 run_dir=$2 log=$3
  shift 3
  local left=$((deadline - $(date +%s)))
  [ "$left" -gt 30 ] || return 1
  CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=$threads timeout --signal=TERM --kill-after=60 "$left" \
    python3 train.py experiment=pack_smollm2 "run_dir=$run_dir" data.dir=/tmp/data logger=none \
    trainer.accelerator=gpu "${common[@]}" "$@" >>"$log" 2>&1
}

run_seed() {  # run_seed INDEX SEED: its warm-up, then its variants side by side
  local index=$1 seed=$2
  train $((index % gpus)) "$runs/warm$seed" "$runs/warm$seed.log" "seed=$seed" stage=warmup || return
  [ -f "$runs/warm$seed/warmup/adapter/adapter_model.safetensors" ] || return
  local v=0
  for variant in "${variants[@]}"; do
    local name=${variant%%:*} overrides=${variant#*:}
    local run_dir="$runs/$name-seed$seed" first=$([ $v -eq 0 ] && echo true || echo false)
    mkdir -p "$run_dir"
    [ -d "$run_dir/warmup" ] || cp -r "$runs/warm$seed/warmup" "$run_dir/warmup"
    local -a args
    IFS="${SEP:-,}" read -r -a args <<<"$overrides"  # SEP=';' when an override holds commas (a list)
    train $(((index * ${#variants[@]} + v) % gpus)) "$run_dir" "$run_dir.log" "seed=$seed" \
      "eval.untuned_row=$([ "${UNTUNED_ROW:-true}" = true ] && echo "$first" || echo false)" "eval.warmup_row=$first" "${args[@]}" &
    v=$((v + 1))
  done
  wait
}

for i in "${!seeds[@]}"; do
  run_seed "$i" "${seeds[$i]}" &
done
wait
echo "seeds ${seeds[*]}, variants ${variants[*]}: $(($(date +%s) - started)) s"
for log in "$runs"/*-seed*.log; do
  echo "== $(basename "$log" .log)"
  grep -E "Error|error:|searched with|raw question|human rewrite|untuned|after " "$log" | tail -16
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
# results only (weights, checkpoints, run files and MLflow stores stay behind), in parts under the 16 MiB a file
# may have to come back
tar czf - --exclude='*.safetensors' --exclude='*.ckpt' --exclude='*.bin' --exclude='*.pt' --exclude='*.trec' \
  --exclude=checkpoints --exclude=mlruns -C "$runs" . | split -b 15M - "$OUT/runs.tgz.part-"
ls -la "$OUT"
