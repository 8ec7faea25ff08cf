#!/usr/bin/env bash
# Issue 16 on the GPU machine, one H200: time to quality on the real model, ours against TRL's
# GRPOTrainer. One warm-up (`train.py experiment=pack_smollm2 stage=warmup`), then from that adapter, one after the
# other on the same GPU: our GRPO and TRL's (bench/trl_real_model.py: the same configuration, reward and turns),
# then the pipeline's tables for both adapters. WARMUP_ONLY=1 stops after the warm-up.
#
#   bash bench/trl_real_model_device.sh SEED [key=value ...]    (extra overrides go to both trainers)
#   OURS="key=value ..." adds overrides to ours only, e.g. OURS="rl.static_decoding=true rl.static_prompt_bucket=512
#   rl.static_cache_at_full_length=true rl.static_decoding_loop=true rl.shared_prompt_passes=true" (the knobs that
#   have no TRL counterpart: static decoding, our decoding loop, each prompt once a group in the loss passes; the extra
#   overrides, e.g. rl.micro_batch_size=128, which is also TRL's per_device_train_batch_size, go to both).
#
# Order: the warm-up, ours' training (`train.py stage=rl` from the warm-up adapter), TRL's training
# (`bench/trl_real_model.py --train-only`), then ours' tables and TRL's, side by side (each side's once its adapter
# exists). SECONDS_LIMIT (default 560) stops whatever runs at that many seconds after the start, so that the results
# still come back within a device call; calling again on the same machine skips the phases that finished and starts
# a cut one afresh, so that each training's wall time stays one uninterrupted run. With the warm-up done by an earlier
# call, the two trainings run in one call.
# KEEP_ADAPTERS=1 also brings back ours' and TRL's trained adapters as ours_adapter.tar.part-* and
# trl_adapter.tar.part-* (ours 23 MB: float32 LoRA weights; TRL's 13 MB: bf16; in parts of at most 15 MiB, which
# `cat SIDE_adapter.tar.part-* | tar x` joins), so that a table the deadline cut can be finished on a CPU
# (`python bench/trl_real_model.py ... model.adapter=WARM run_dir=TRL_FOLDER`).
# UNSLOTH=1 then runs the same through Unsloth (bench/trl_real_model.py --unsloth) once TRL's has finished, in a
# further call that carried .gpu_whl_unsloth and ran `bench/prepare_device_carry.sh --install`.
#
# Expects what bench/holdout_experiment_device.sh expects (wheels with TRL and datasets in /tmp/site, the pack in
# /tmp/data, the GGUF). "to adapter" = seconds from the process start to the trained adapter on disk (model
# loading included, evaluation not). Small results are tarred to $OUT/trl_real_model.tgz.
set -u
seed=$1
shift
runs=${RUNS:-/tmp/trl_real}
mkdir -p "$runs"
deadline=$(($(date +%s) + ${SECONDS_LIMIT:-560}))
export PYTHONPATH=/tmp/site:$PWD CQR_CACHE_DIR=/tmp/cqr_cache PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
source "$(dirname "$0")/phase_curves.sh"  # $phase_curves: our GRPO phases' seconds in rl/curves.csv
read -r -a ours_only <<<"${OURS:-}"
common=(experiment=pack_smollm2 "seed=$seed" data.dir=/tmp/data logger=none trainer.accelerator=gpu "$@")
if [ ! -f "$runs/model_cached" ]; then  # once a machine: a later call's ~15 s go to the trainings
  python3 bench/cache_pack_model.py >>"$runs/prepare.log" 2>&1 || { tail -30 "$runs/prepare.log"; exit 1; }
  touch "$runs/model_cached"
fi

to_adapter() {  # RUN_DIR START: seconds from START to the trained adapter's file
  local file="$1/rl/adapter/adapter_model.safetensors"
  [ -f "$file" ] && echo $(($(stat -c %Y "$file") - $2)) || echo "none"
}

until_deadline() {  # until_deadline COMMAND...: run it, stopped (SIGTERM, then SIGKILL) at the deadline
  local left=$((deadline - $(date +%s)))
  [ "$left" -gt 20 ] || { echo "no time left for: $*"; return 124; }
  timeout --signal=TERM --kill-after=20 "$left" "$@"
}

adapter=$runs/warm/warmup/adapter
if [ ! -f "$adapter/adapter_model.safetensors" ]; then
  until_deadline python3 train.py "${common[@]}" stage=warmup "run_dir=$runs/warm" >>"$runs/warm.log" 2>&1
  [ -f "$adapter/adapter_model.safetensors" ] || { tail -30 "$runs/warm.log"; exit 1; }
fi
[ -z "${WARMUP_ONLY:-}" ] || { grep -E "kept|done" "$runs/warm.log" | tail -3; exit 0; }

# Both trainers train first, back to back, from the same warm-up; the tables follow, so that the two trainings fit
# one call. A phase cut by the deadline starts afresh in the next call; a trained one is not trained again.
if [ ! -f "$runs/ours/rl/adapter/adapter_model.safetensors" ]; then
  rm -rf "$runs/ours" && mkdir -p "$runs/ours" && cp -r "$runs/warm/warmup" "$runs/ours/warmup"
  started=$(date +%s)
  until_deadline python3 train.py "${common[@]}" stage=rl "model.adapter=$runs/ours/warmup/adapter" \
    "run_dir=$runs/ours" "$phase_curves" "${ours_only[@]}" >"$runs/ours.log" 2>&1
  echo "== ours: exit $?, to adapter $(to_adapter "$runs/ours" "$started") s, all $(($(date +%s) - started)) s" \
    | tee -a "$runs/times.txt"
  grep -E "Error" "$runs/ours.log" | tail -8
fi

if [ -f "$runs/ours/rl/adapter/adapter_model.safetensors" ] && [ ! -f "$runs/trl/rl/adapter/adapter_model.safetensors" ]; then
  rm -rf "$runs/trl"
  started=$(date +%s)
  until_deadline python3 bench/trl_real_model.py --train-only "${common[@]}" "model.adapter=$adapter" \
    "run_dir=$runs/trl" >"$runs/trl.log" 2>&1
  echo "== TRL: exit $?, to adapter $(to_adapter "$runs/trl" "$started") s, all $(($(date +%s) - started)) s" \
    | tee -a "$runs/times.txt"
  grep -E "train_seconds|Error" "$runs/trl.log" | tail -4
fi

# The two sides' tables run side by side (the GPU and the 16 cores have room for both; one after the other they took
# about 53 s each, 20 of them starting up, which cut TRL's last table at the deadline in the seed-4 call). Each side's
# tables need only its own adapter: when TRL's training fails (seed 5: a sampling assert at step 35), ours' still run.
if [ -f "$runs/ours/rl/adapter/adapter_model.safetensors" ] && [ ! -f "$runs/ours/eval/summary.json" ]; then
  # the pipeline in ours' folder finds the warm-up and GRPO finished and only evaluates (model.adapter as its
  # `stage=rl` recorded it, or the folder's settings check stops the run)
  until_deadline python3 train.py "${common[@]}" "run_dir=$runs/ours" "model.adapter=$runs/ours/warmup/adapter" \
    eval.untuned_row=false eval.warmup_row=false "${ours_only[@]}" >>"$runs/ours_tables.log" 2>&1 &
fi
trl_tabled() { grep -q '"tables"' "$runs/trl/trl_summary.json" 2>/dev/null; }
if [ -f "$runs/trl/rl/adapter/adapter_model.safetensors" ] && ! trl_tabled; then
  until_deadline python3 bench/trl_real_model.py "${common[@]}" "model.adapter=$adapter" "run_dir=$runs/trl" \
    >>"$runs/trl_tables.log" 2>&1 &
fi
wait
grep -hE "after GRPO|after TRL GRPO|searched with|Error" "$runs/ours_tables.log" "$runs/trl_tables.log" 2>/dev/null \
  | tail -16

if [ -n "${UNSLOTH:-}" ] && [ -f "$runs/trl/trl_summary.json" ] && [ ! -f "$runs/unsloth/trl_summary.json" ]; then
  rm -rf "$runs/unsloth"
  started=$(date +%s)
  until_deadline env PYTHONPATH="/tmp/site_unsloth:$PYTHONPATH" HF_HUB_OFFLINE=1 python3 bench/trl_real_model.py \
    --unsloth "${common[@]}" "model.adapter=$adapter" "run_dir=$runs/unsloth" >"$runs/unsloth.log" 2>&1
  echo "== Unsloth: exit $?, to adapter $(to_adapter "$runs/unsloth" "$started") s, all $(($(date +%s) - started)) s" \
    | tee -a "$runs/times.txt"
  grep -E "after Unsloth GRPO|searched with|train_seconds|Unsloth step|Error" "$runs/unsloth.log" | tail -12
fi

cd "$runs" && find . \( -name '*.log' -o -name 'summary.json' -o -name 'trl_summary.json' -o -name 'curves.csv' \
  -o -name 'rewrites.jsonl' -o -name 'metrics.json' -o -name times.txt \) -size -8M | tar czf "$OUT/trl_real_model.tgz" -T -
# each trained adapter in a tar of its own, cut into parts: a file comes back up to 16 MiB (the seed-6 call lost
# ours' whole 23-MB tar)
if [ -n "${KEEP_ADAPTERS:-}" ]; then
  for side in ours trl; do
    [ -d "$side/rl/adapter" ] && tar cf - "$side/rl/adapter" | split -b 15M - "$OUT/${side}_adapter.tar.part-"
  done
fi
ls -la "$OUT"
