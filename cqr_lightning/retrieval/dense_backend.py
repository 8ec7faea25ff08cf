"""Dense retrieval: any Hugging Face encoder, exact inner-product search over a flat faiss index.

The encoder is loaded with `AutoModel`/`AutoTokenizer` from a local folder (or a hub id already in the local
cache; nothing is downloaded).  A text's vector is the first token's hidden state (`pooling: cls`) or the
mask-weighted mean of all hidden states (`pooling: mean`), optionally L2-normalised (then inner product is
cosine similarity).  Queries and passages may get different prefixes ("query: " / "passage: " for E5-style
models).

ANCE (the paper's dense retriever) is `pooling: ance` (conf/retriever/ance.yaml): the first token's hidden state
through the checkpoint's projection head (a linear layer and a LayerNorm, `embeddingHead`/`norm`), which
`AutoModel` does not load and cqr_lightning/retrieval/projection_head.py reads from the same weight files.

On disk an index is `embeddings.npy` (float32, one row per passage, saved without pickle) and
`passage_ids.json`.  The faiss index is rebuilt in memory on load and moved to the GPU when faiss was built
with GPU support and a GPU is visible.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cqr_lightning.errors import ConfigError, RetrievalError
from cqr_lightning.io_utils import write_json
from cqr_lightning.retrieval.base import Retriever, SearchHit, truncate_words
from cqr_lightning.retrieval.corpus import count_passages, read_corpus

EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "passage_ids.json"
POOLINGS = ("cls", "mean", "ance")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# Passages are read in chunks of this many batches and sorted by length inside a chunk, so batches hold
# texts of similar length (less padding) while memory stays bounded for big collections.
_CHUNK_BATCHES = 32


@dataclass(frozen=True)
class DenseSettings:
    model: str | None = None
    pooling: str = "cls"
    normalize: bool = False
    query_prefix: str = ""
    passage_prefix: str = ""
    max_length: int = 512
    batch_size: int = 64
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self):
        if not self.model:
            raise ConfigError("retriever.model must name the encoder (a local folder or a cached hub id)")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"retriever.pooling={self.pooling!r}: choose one of {', '.join(POOLINGS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"retriever.dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.max_length < 1 or self.batch_size < 1:
            raise ConfigError("retriever.max_length and retriever.batch_size must be positive")

    def index_settings(self) -> dict:
        """What the stored vectors depend on (query-side settings and the device do not count)."""
        fields = ("model", "pooling", "normalize", "passage_prefix", "max_length", "dtype")
        return {**{name: getattr(self, name) for name in fields}, "model_fingerprint": model_fingerprint(self.model)}


def model_fingerprint(model: str) -> str:
    """Identify the encoder's weights, so a retrained model at the same path gets a new index.

    For a local folder: config.json plus the size, first and last MiB of each weight file; for a hub id,
    the id itself (the cached snapshot is immutable).
    """
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return f"id:{model}"
    digest = hashlib.sha1()
    for path in sorted(folder.iterdir()):
        if path.name == "config.json":
            digest.update(path.read_bytes())
        elif path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size};".encode())
            with open(path, "rb") as f:
                digest.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                digest.update(f.read(1 << 20))
    return f"sha1:{digest.hexdigest()}"


class TextEncoder:
    """Batched, pooled (and optionally normalised) embeddings from a Hugging Face encoder."""

    def __init__(self, settings: DenseSettings):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.settings = settings
        self.device = _resolve_device(settings.device)
        dtype = _resolve_dtype(settings.dtype, self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(settings.model, local_files_only=True)
            self.model = AutoModel.from_pretrained(settings.model, local_files_only=True, dtype=getattr(torch, dtype))
        except OSError as exc:
            raise ConfigError(
                f"retriever.model={settings.model!r} could not be loaded offline: {exc}. Point it at a folder "
                "holding config.json, the weights and the tokenizer files."
            ) from exc
        self.model.to(self.device).eval()
        self.head = None
        if settings.pooling == "ance":
            from cqr_lightning.retrieval.projection_head import load_projection_head

            self.head = load_projection_head(settings.model, int(self.model.config.hidden_size)).to(self.device)
        limit = self.tokenizer.model_max_length
        self.max_length = min(settings.max_length, limit) if limit and limit < 1_000_000 else settings.max_length

    @property
    def dim(self) -> int:
        if self.head is not None:
            return int(self.head[0].out_features)
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], prefix: str = "") -> np.ndarray:
        """[len(texts), dim] float32 vectors, in input order."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        bs = self.settings.batch_size
        for start in range(0, len(texts), bs):
            out[start : start + bs] = self._encode_batch([prefix + t for t in texts[start : start + bs]])
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # [B, L, H]
            if self.settings.pooling in ("cls", "ance"):
                pooled = hidden[:, 0]  # [B, H]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            pooled = pooled.float()
            if self.head is not None:
                pooled = self.head(pooled)  # [B, D], ANCE's projection head in float32
            if self.settings.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu().numpy()


def build_index(corpus_path: Path, out_dir: Path, settings: DenseSettings, show_progress: bool = True) -> int:
    """Encode every passage into `out_dir/embeddings.npy`; return the number of passages."""
    total = count_passages(corpus_path)
    encoder = TextEncoder(settings)
    embeddings = np.lib.format.open_memmap(
        out_dir / EMBEDDINGS_FILE, mode="w+", dtype=np.float32, shape=(total, encoder.dim)
    )
    passage_ids: list[str] = []
    with tqdm(total=total, desc="dense: encoding corpus", unit=" passages", disable=not show_progress) as bar:
        for chunk in _chunks(read_corpus(corpus_path), settings.batch_size * _CHUNK_BATCHES):
            order = sorted(range(len(chunk)), key=lambda i: len(chunk[i].contents), reverse=True)
            vectors = encoder.encode([chunk[i].contents for i in order], prefix=settings.passage_prefix)
            start = len(passage_ids)
            embeddings[start + np.asarray(order)] = vectors
            passage_ids.extend(p.id for p in chunk)
            bar.update(len(chunk))
    embeddings.flush()
    del embeddings
    write_json(out_dir / IDS_FILE, passage_ids)
    return total


def _chunks(items, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class DenseRetriever(Retriever):
    """Encodes queries with the index's encoder and searches a flat inner-product faiss index."""

    def __init__(self, index_dir: Path, settings: DenseSettings, max_query_words: int | None = None):
        import faiss

        self.index_dir = Path(index_dir)
        self.settings = settings
        self.max_query_words = max_query_words
        try:
            embeddings = np.load(self.index_dir / EMBEDDINGS_FILE, allow_pickle=False)
            with open(self.index_dir / IDS_FILE, encoding="utf-8") as f:
                self._passage_ids: list[str] = json.load(f)
        except (OSError, ValueError) as exc:
            raise RetrievalError(f"Cannot load the dense index at {self.index_dir}: {exc}") from exc
        self.encoder = TextEncoder(settings)
        if embeddings.shape != (len(self._passage_ids), self.encoder.dim):
            raise RetrievalError(
                f"{self.index_dir}: embeddings {embeddings.shape} do not match {len(self._passage_ids)} ids "
                f"and the encoder's {self.encoder.dim} dimensions"
            )
        index = faiss.IndexFlatIP(self.encoder.dim)
        index.add(np.ascontiguousarray(embeddings))
        self._gpu_resources = None
        if (
            self.encoder.device.startswith("cuda")
            and hasattr(faiss, "StandardGpuResources")
            and faiss.get_num_gpus() > 0
        ):
            self._gpu_resources = faiss.StandardGpuResources()
            gpu = int(self.encoder.device.partition(":")[2] or 0)
            index = faiss.index_cpu_to_gpu(self._gpu_resources, gpu, index)
        self._index = index

    @property
    def num_docs(self) -> int:
        return len(self._passage_ids)

    @property
    def on_gpu(self) -> bool:
        return self._gpu_resources is not None

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        texts = [truncate_words(q, self.max_query_words) for q in queries]
        return self.encoder.encode(texts, prefix=self.settings.query_prefix)

    def search(self, queries: Sequence[str], k: int = 100) -> list[list[SearchHit]]:
        if self._index is None:
            raise RetrievalError("search() called after close()")
        depth = min(k, self.num_docs)
        if not queries or depth <= 0:
            return [[] for _ in queries]
        scores, rows = self._index.search(self.encode_queries(queries), depth)
        return [
            [
                SearchHit(self._passage_ids[row], float(score))
                for row, score in zip(row_ids, row_scores, strict=True)
                if row >= 0
            ]
            for row_ids, row_scores in zip(rows.tolist(), scores.tolist(), strict=True)
        ]

    def close(self) -> None:
        self._index = None
        self._gpu_resources = None


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"retriever.device={device!r} but no CUDA device is visible; use auto or cpu")
    return device


def _resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: half precision on a GPU, float32 on CPU (CPU half-precision matmuls are slow)."""
    if dtype != "auto":
        return dtype
    return "float16" if device.startswith("cuda") else "float32"
