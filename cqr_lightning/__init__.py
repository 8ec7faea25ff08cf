"""cqr-lightning: train conversational query rewriters with the ConvSearch-R1 recipe."""

import os

# JAX, when installed, is imported by bm25s for its top-k selection and then claims 75% of the GPU's memory
# (seen on an H100: 60 GiB beside an 18 GiB GRPO step). This project never computes with JAX: keep it on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Fewer fragmented blocks between generation and training: reserved memory stays near allocated
# (18.8 GiB reserved for 18.2 allocated at 1536/1024/G=8, against 23.9 reserved without it).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

__version__ = "0.1.0"
