#!/usr/bin/env bash
# Issue 12 on the GPU machine: recipes compared on held-out conversations, several seeds side by side.
#
#   VARIANTS="name:key=value,key=value name2:..." bash bench/holdout_experiment_device.sh SECONDS SEED [SEED ...]
#   (SEP=';' separates a variant's overrides by ';' instead, for values that hold commas, e.g. rl.rewards=[...])
#
# For each seed, one warm-up (`train.py experiment=pack_smollm2 stage=warmup`) per distinct set of `warmup.*`
# overrides among the variants (most share the plain one), then every variant's pipeline from its warm-up (the
# folder is copied in, so the pipeline skips the stage): GRPO with the variant's overrides, then the table on
# holdout_val (where settings are chosen), holdout_test and CAsT dev. The warm-up row is evaluated in the first
# variant of each warm-up (WARMUP_ROW=false leaves it out), the untuned row in the first variant only
# (UNTUNED_ROW=false leaves it out: it does not depend on the seed). Runs share the GPUs in turn and the CPU cores evenly.
# Expects what bench/pack_experiment_device.sh expects (wheels in /tmp/site, the pack in /tmp/data, the GGUF).
# COMMON="key=value ..." adds overrides to every run, the warm-ups included (e.g. model.gradient_checkpointing=false).
# KEEP_ADAPTERS=true also brings back each variant's final GRPO adapter (the rl/adapter folder: weights, card,
# tokenizer) as adapters.tgz.part-*, for evaluating it again on a CPU (`python -m cqr_lightning.evaluate
# rewriter=model model.adapter=...`); about 20 MB a run, so three runs at most fit beside the results (64 MiB a call).
# A variant may be a bare name (no ':' and no overrides): the experiment's settings as they are.
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
source "$(dirname "$0")/phase_curves.sh"  # $phase_curves: our GRPO phases' seconds in rl/curves.csv
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
    trainer.accelerator=gpu "$phase_curves" "${common[@]}" "$@" >>"$log" 2>&1
}

warmup_overrides() {  # warmup_overrides OVERRIDES: the variant's warmup.* overrides, joined by the separator
  local -a args
  local kept=""
  IFS="${SEP:-,}" read -r -a args <<<"$1"
  for arg in "${args[@]}"; do
    [[ $arg == warmup.* ]] && kept+="$arg${SEP:-,}"
  done
  printf %s "$kept"
}

warm_dir() {  # warm_dir SEED WARMUP_OVERRIDES: the plain warm-up's folder, or one named after its overrides
  if [ -z "$2" ]; then echo "$runs/warm$1"; else echo "$runs/warm$1-$(printf %s "$2" | md5sum | cut -c1-8)"; fi
}

run_seed() {  # run_seed INDEX SEED: its warm-ups side by side, then its variants side by side
  local index=$1 seed=$2 k=0 v=0
  local -A warmups=() evaluated=()
  local -a warm_of=()  # each variant's warm-up folder, by the variant's index
  for variant in "${variants[@]}"; do
    local extra
    extra=$(warmup_overrides "${variant#*:}")
    warm_of+=("$(warm_dir "$seed" "$extra")")
    warmups["${warm_of[-1]}"]=$extra
  done
  for warm in "${!warmups[@]}"; do
    local -a wargs
    IFS="${SEP:-,}" read -r -a wargs <<<"${warmups[$warm]}"
    train $(((index + k) % gpus)) "$warm" "$warm.log" "seed=$seed" stage=warmup "${wargs[@]}" &
    k=$((k + 1))
  done
  wait
  for variant in "${variants[@]}"; do
    local name=${variant%%:*} overrides=""
    [[ $variant == *:* ]] && overrides=${variant#*:}
    local run_dir="$runs/$name-seed$seed" warm=${warm_of[$v]}
    local untuned=$([ $v -eq 0 ] && [ "${UNTUNED_ROW:-true}" = true ] && echo true || echo false)
    local warm_row=$([ -z "${evaluated[$warm]:-}" ] && [ "${WARMUP_ROW:-true}" = true ] && echo true || echo false)
    evaluated[$warm]=1
    v=$((v + 1))
    [ -f "$warm/warmup/adapter/adapter_model.safetensors" ] || continue  # not trained before the deadline
    mkdir -p "$run_dir"
    [ -d "$run_dir/warmup" ] || cp -r "$warm/warmup" "$run_dir/warmup"
    local -a args
    IFS="${SEP:-,}" read -r -a args <<<"$overrides"  # SEP=';' when an override holds commas (a list)
    train $(((index * ${#variants[@]} + v - 1) % gpus)) "$run_dir" "$run_dir.log" "seed=$seed" \
      "eval.untuned_row=$untuned" "eval.warmup_row=$warm_row" "${args[@]}" &
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
if [ "${KEEP_ADAPTERS:-false}" = true ]; then
  (cd "$runs" && find . -path '*-seed*/rl/adapter/*' -type f -print0 | tar czf - --null -T -) |
    split -b 15M - "$OUT/adapters.tgz.part-"
fi
ls -la "$OUT"
