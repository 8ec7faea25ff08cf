#!/usr/bin/env bash
# Issue 16 on the GPU machine, one call on one GPU (about 4 minutes): bench/profile_step.py on the 256-token
# workload (4 prompts x G=8, fast_sampling + static_decoding), where each phase's time goes, per decoding step.
#
#   bash bench/profile_device.sh [DATA] [EXTRA ARGS...]     (e.g. --prompts 2 --response 1024 --long-context
#                                                            --micro-batch 4 --label paper for the paper's lengths)
# With the wheels and data not yet under /tmp/site and DATA: a call carrying .gpu_whl, .gpu_whl_rest and .benchdata
# (about 60 MB with the tracked files, under the 64 MiB a call carries) that runs
# `bash bench/prepare_device_carry.sh --install` first. They are built here by bench/prepare_device_carry.sh. JSON and tables go to $OUT.
set -u
data=${1:-/tmp/data}
shift || true
out=${OUT:-/tmp/profile}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ ! -d /tmp/site/bitsandbytes ] || [ ! -f "$data/corpus.jsonl" ]; then
  bash bench/prepare_device_carry.sh --install >"$out/install.log" 2>&1 || { tail -5 "$out/install.log"; exit 1; }
fi
cd bench
PYTHONPATH=/tmp/site:$(cd .. && pwd) timeout --signal=KILL "${SECONDS_LIMIT:-400}" python3 profile_step.py \
  --data "$data" --prompts 4 --group 8 --response 256 --micro-batch 8 --fast --static --entropy-coef 0.001 \
  --out "$out" "$@" >"$out/profile.log" 2>&1
echo "exit $?"
tail -60 "$out/profile.log"
