#!/usr/bin/env bash
# Issue 5 on the GPU machine: our GRPO step and TRL's GRPOTrainer on the same workload, back to back.
#
#   bash bench/speed_device.sh DATA VARIANT[:SECONDS] ...
#
# VARIANT is one of: static (ours, fast_sampling + static_decoding), bucket (the same with the prompts padded to a
# multiple of 256 tokens rather than to 1,536: rl.static_prompt_bucket=256), bucket_gqa (bucket, and SDPA reads the
# grouped key/value heads itself instead of transformers repeating them: TRANSFORMERS_SDPA_FORCE_GQA=1, which
# transformers leaves off on CUDA when a mask is given), bucket_bf16 (bucket, with the policy's unquantized weights
# kept in bf16: model.upcast_non_quantized=false), loop (bucket, decoded by our own loop rather than transformers'
# generate: rl.static_decoding_loop=true; its log names any reason torch.compile skipped CUDA graphs), loop_gqa (loop
# with TRANSFORMERS_SDPA_FORCE_GQA=1), fast (ours, fast_sampling), plain (ours,
# 4-bit generate), trl (TRL's GRPOTrainer), unsloth (the same trainer through Unsloth: its wheels from
# `bench/prepare_device_carry.sh --unsloth-wheels`, installed under /tmp/site_unsloth; after one of ours, which builds the
# random checkpoint). Each runs the 256-token workload of bench/RESULTS.md (4 prompts x G=8,
# 3 steps) in its own process, stopped after SECONDS (default 300). Expects the wheels of
# bench/prepare_device_carry.sh installed under /tmp/site. Logs and JSON summaries go to $OUT.
set -u
data=$1
shift
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
workload=(--data "$data" --prompts 4 --group 8 --response 256 --steps 3 --out "$OUT")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, trl; print(torch.__version__, transformers.__version__, peft.__version__, trl.__version__)" >>"$OUT/gpu.txt" 2>&1
for item in "$@"; do
  variant=${item%%:*}
  seconds=300
  [ "$variant" != "$item" ] && seconds=${item#*:}
  case $variant in
    static) command=(env TORCH_LOGS=recompiles python3 bench/grpo_step.py "${workload[@]}" --fast --static) ;;
    bucket) command=(env TORCH_LOGS=recompiles python3 bench/grpo_step.py "${workload[@]}" --fast --static --static-bucket 256) ;;
    bucket_gqa) command=(env TORCH_LOGS=recompiles TRANSFORMERS_SDPA_FORCE_GQA=1 python3 bench/grpo_step.py "${workload[@]}"
      --fast --static --static-bucket 256) ;;
    loop) command=(env TORCH_LOGS=recompiles,perf_hints python3 bench/grpo_step.py "${workload[@]}" --fast --static --static-bucket 256
      --loop) ;;
    loop_gqa) command=(env TORCH_LOGS=recompiles,perf_hints TRANSFORMERS_SDPA_FORCE_GQA=1 python3 bench/grpo_step.py "${workload[@]}"
      --fast --static --static-bucket 256 --loop) ;;
    bucket_bf16) command=(env TORCH_LOGS=recompiles python3 bench/grpo_step.py "${workload[@]}" --fast --static
      --static-bucket 256 --no-upcast) ;;
    fast) command=(python3 bench/grpo_step.py "${workload[@]}" --fast) ;;
    plain) command=(python3 bench/grpo_step.py "${workload[@]}") ;;
    trl) command=(python3 bench/trl_grpo_step.py "${workload[@]}") ;;
    unsloth) command=(env PYTHONPATH="/tmp/site_unsloth:$PYTHONPATH" HF_HUB_OFFLINE=1 python3 bench/trl_grpo_step.py
      "${workload[@]}" --unsloth) ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  started=$(date +%s)
  timeout --signal=KILL "$seconds" "${command[@]}" >"$OUT/$variant.log" 2>&1
  echo "== $variant: exit $?, $(($(date +%s) - started)) s"
  grep -E "^step |TRL step|Unsloth step|generated_tokens_per_s|peak_allocated|peak_reserved|Error|error" "$OUT/$variant.log" | tail -12
done
