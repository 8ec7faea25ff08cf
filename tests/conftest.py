"""Shared fixtures: a small corpus with conversations written here, the tiny model config, offline settings."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

os.environ.setdefault("CQR_CACHE_DIR", tempfile.mkdtemp(prefix="cqr-test-cache-"))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

PASSAGES = {
    "nile-1": "Nile River. The Nile is the longest river in Africa, flowing about 6,650 kilometres north to the sea.",
    "nile-2": "Nile River delta. The Nile delta near Cairo is one of the most fertile farming regions on earth.",
    "everest-1": "Mount Everest. Everest is the highest mountain above sea level, rising 8,849 metres in the Himalaya.",
    "everest-2": "Everest expeditions. Tenzing Norgay and Edmund Hillary first reached the summit of Everest in 1953.",
    "curie-1": "Marie Curie. Marie Curie was a physicist and chemist born in Warsaw who studied radioactivity.",
    "curie-2": "Curie Nobel prizes. Marie Curie won the Nobel Prize in Physics in 1903 and in Chemistry in 1911.",
    "tokyo-1": "Tokyo. Tokyo is the capital of Japan and its metropolitan area has about 37 million inhabitants.",
    "tokyo-2": "Tokyo tower. The Tokyo Tower, a lattice tower painted white and orange, opened in 1958.",
    "bee-1": "Honey bee. Honey bees live in colonies ruled by a single queen and make honey from flower nectar.",
    "bee-2": "Bee dance. Worker bees perform a waggle dance to tell nest mates the direction of food.",
    "piano-1": "Piano. The piano was invented in Italy by Bartolomeo Cristofori around the year 1700.",
    "piano-2": "Piano keys. A modern concert piano has 88 keys, 52 white and 36 black.",
}

CONVERSATIONS = [
    ("nile", [("What is the longest river in Africa?", "What is the longest river in Africa?", "nile-1", "The Nile."),
              ("Where is its delta?", "Where is the Nile River delta?", "nile-2", "Near Cairo.")]),
    ("everest", [("What is the highest mountain?", "What is the highest mountain?", "everest-1", "Everest."),
                 ("Who first climbed it?", "Who first reached the Everest summit?", "everest-2", "Hillary.")]),
    ("curie", [("Who was Marie Curie?", "Who was Marie Curie?", "curie-1", "A physicist and chemist."),
               ("Which prizes did she win?", "Which Nobel prizes did Marie Curie win?", "curie-2", "Two.")]),
    ("tokyo", [("What is the capital of Japan?", "What is the capital of Japan?", "tokyo-1", "Tokyo."),
               ("When did its tower open?", "When did the Tokyo Tower open?", "tokyo-2", "In 1958.")]),
    ("bee", [("How do honey bees live?", "How do honey bees live?", "bee-1", "In colonies."),
             ("How do they share where food is?", "How do bees tell nest mates where food is?", "bee-2", "Dance.")]),
    ("piano", [("Who invented the piano?", "Who invented the piano?", "piano-1", "Cristofori."),
               ("How many keys does it have?", "How many keys does a modern piano have?", "piano-2", "88.")]),
]  # fmt: skip


def conversation_turns(name: str, steps) -> list[dict]:
    turns, history = [], []
    for number, (question, rewrite, gold, answer) in enumerate(steps, start=1):
        turns.append(
            {
                "id": f"{name}_{number}",
                "source": "fixture",
                "history": list(history),
                "question": question,
                "positives": [gold],
                "rewrite": rewrite,
                "answer": answer,
            }
        )
        history += [{"role": "user", "text": question}, {"role": "assistant", "text": answer}]
    return turns


def write_fixture_data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "corpus.jsonl").open("w") as handle:
        for pid, text in PASSAGES.items():
            title = text.split(".")[0]
            handle.write(json.dumps({"id": pid, "title": title, "contents": text}) + "\n")
    turns = [t for name, steps in CONVERSATIONS for t in conversation_turns(name, steps)]
    (folder / "train.jsonl").write_text("".join(json.dumps(t) + "\n" for t in turns[:8]))
    (folder / "dev.jsonl").write_text("".join(json.dumps(t) + "\n" for t in turns[8:]))
    return folder


@pytest.fixture(scope="session")
def fixture_data_dir(tmp_path_factory) -> Path:
    return write_fixture_data(tmp_path_factory.mktemp("fixture-data"))


@pytest.fixture
def data_with_vague_turns(fixture_data_dir, tmp_path) -> Path:
    """The fixture data plus two training turns whose question alone cannot find their gold passage."""
    folder = tmp_path / "vague-data"
    folder.mkdir()
    for name in ("corpus.jsonl", "dev.jsonl"):
        (folder / name).write_text((fixture_data_dir / name).read_text())
    opening = {"role": "user", "text": "Tell me something."}
    vague = [
        {"id": "vague_1", "history": [opening], "question": "And what about that one?", "positives": ["tokyo-2"]},
        {"id": "vague_2", "history": [opening], "question": "Why so?", "positives": ["bee-2"]},
    ]
    extra = "".join(json.dumps({**turn, "rewrite": None}) + "\n" for turn in vague)
    (folder / "train.jsonl").write_text((fixture_data_dir / "train.jsonl").read_text() + extra)
    return folder


@pytest.fixture(scope="session")
def data_cfg(fixture_data_dir):
    return OmegaConf.create(
        {
            "format": "jsonl",
            "dir": str(fixture_data_dir),
            "corpus": str(fixture_data_dir / "corpus.jsonl"),
            "train_split": "train",
            "eval_split": "dev",
            "qrels": None,
            "shuffle_buffer": 4,
            "seed": 0,
        }
    )


@pytest.fixture(scope="session")
def bm25s_cfg(tmp_path_factory):
    cfg = OmegaConf.load(CONF_DIR / "retriever" / "bm25s.yaml")
    cfg.index_dir = str(tmp_path_factory.mktemp("bm25s-index") / "index")
    return cfg


@pytest.fixture(scope="session")
def tiny_model_cfg():
    return OmegaConf.load(CONF_DIR / "model" / "tiny.yaml")


def make_training_cfg(compute_dtype: str = "bfloat16", inference: dict | None = None, **search):
    """What an adapter's card is made from: the tiny model unquantized, rewrite_only, searched as question + rewrite
    (with `inference`, the training config's `inference` block)."""
    model = OmegaConf.load(CONF_DIR / "model" / "tiny.yaml")
    model.load_in_4bit = False
    model.compute_dtype = compute_dtype
    model.max_prompt_length = 200
    plan = {"query_mode": "question_rewrite", "first_turn_as_asked": True, "fusion_k": 60, **search}
    cfg = {"model": model, "response_format": "rewrite_only", "search": plan}
    return OmegaConf.create(cfg if inference is None else {**cfg, "inference": inference})


def save_tiny_rewriter(folder: Path, compute_dtype: str = "bfloat16", inference: dict | None = None):
    """A tiny-model adapter (moved away from the no-op start) saved with its tokenizer and card (8 new tokens;
    `inference` as in `make_training_cfg`); returns its folder, the policy and the tokenizer."""
    import torch

    from cqr_lightning.models.loading import load_policy, load_tokenizer, save_adapter
    from cqr_lightning.rewriter_card import rewriter_card

    cfg = make_training_cfg(compute_dtype, inference)
    policy, tokenizer = load_policy(cfg.model, trainable=False), load_tokenizer(cfg.model)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    path = save_adapter(policy, folder, tokenizer=tokenizer, card=rewriter_card(cfg, max_new_tokens=8))
    return path, policy, tokenizer


@pytest.fixture
def training_cfg():
    """`make_training_cfg`, to call with search settings."""
    return make_training_cfg


@pytest.fixture
def rewriter_saver(tmp_path, monkeypatch):
    """`save_tiny_rewriter`, with a model cache of the test's own."""
    monkeypatch.setenv("CQR_CACHE_DIR", str(tmp_path / "cache"))
    return save_tiny_rewriter


@pytest.fixture
def saved_rewriter(tmp_path, rewriter_saver):
    """A bf16 tiny-model adapter saved by `save_tiny_rewriter`: (folder, policy, tokenizer)."""
    return rewriter_saver(tmp_path / "adapter")
