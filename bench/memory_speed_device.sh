#!/usr/bin/env bash
# Issue 16 on the GPU machine, in one call on one H200 (about 5-7 minutes): our GRPO step's time and peak memory
# with rl.logprob_chunk_size off ("none") and on, at the 256-token workload (4 prompts x G=8, micro-batch 8) and
# at the paper's lengths (2 prompts x G=8, prompts filling 1,536 tokens, responses 1,024, micro-batch 4), both
# with fast_sampling + static_decoding and the entropy bonus on (rl.entropy_coef 0.001, the default config).
# Each workload is one process (bench/memory_speed.py): a warm-up step, then the settings in turn.
#
#   bash bench/memory_speed_device.sh [DATA] [CHUNKS]  DATA: the pack's corpus/dev (default /tmp/data);
#                                                      CHUNKS: chunk sizes in tokens to try, each optionally with
#                                                      '+release' (rl.release_sampling_copy); default 1024,256
# With the wheels and data not yet under /tmp/site and DATA: a call carrying .gpu_whl, .gpu_whl_rest and .benchdata
# (about 60 MB with the tracked files, under the 64 MiB a call carries) that runs
# `bash bench/prepare_device_carry.sh --install` first. They are built here by bench/prepare_device_carry.sh. Logs and JSON summaries go to $OUT.
# EXTRA adds options of bench/memory_speed.py to both workloads (e.g. EXTRA="--no-upcast --static-bucket 256").
# PAPER_SECONDS (default 240) bounds the paper-length process (a warm-up step of about 55 s, then about 19 s a step).
# DRY_RUN=1 runs both workloads on the CPU with the tiny model, 1 prompt, 4-token responses (checks the script only).
set -u
data=${1:-/tmp/data}
chunks=${2:-1024,256}
out=${OUT:-/tmp/memory_speed}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
dry=()
if [ "${DRY_RUN:-0}" = 1 ]; then
  dry=(--tiny-cpu --prompts 1 --response 4 --max-prompt 256 --rounds 1)
  export PYTHONPATH=$PWD
else
  if [ ! -d /tmp/site/bitsandbytes ] || [ ! -f "$data/corpus.jsonl" ]; then
    bash bench/prepare_device_carry.sh --install >"$out/install.log" 2>&1 || { tail -5 "$out/install.log"; exit 1; }
  fi
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt"
  python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" \
    >>"$out/gpu.txt" 2>&1
fi
python=${PYTHON:-python3}
read -r -a extra <<<"${EXTRA:-}"  # e.g. EXTRA="--no-upcast --static-bucket 256"
common=(--data "$data" --group 8 --fast --static --entropy-coef 0.001 --chunk-sizes "none,$chunks" --out "$out"
  "${extra[@]}")

measure() {  # LABEL SECONDS ARGS...
  local label=$1 seconds=$2 started
  shift 2
  started=$(date +%s)
  timeout --signal=KILL "$seconds" "$python" bench/memory_speed.py "${common[@]}" --label "$label" "$@" "${dry[@]}" \
    >"$out/$label.log" 2>&1
  echo "== $label: exit $?, $(($(date +%s) - started)) s"
  grep -E "^step |Error|error" "$out/$label.log" | tail -8
}

workloads=" ${WORKLOADS:-r256 paper} "  # WORKLOADS=paper runs the paper's lengths only
[[ $workloads == *" r256 "* ]] && measure r256 200 --prompts 4 --response 256 --micro-batch 8 --rounds 2
[[ $workloads == *" paper "* ]] &&
  measure paper "${PAPER_SECONDS:-240}" --prompts 2 --response 1024 --max-prompt 1536 --long-context \
    --micro-batch 4 --rounds 1
