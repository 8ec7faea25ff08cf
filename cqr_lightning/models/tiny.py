"""A tiny chat model built in-process, for tests and smoke runs without a model hub.

The tokenizer is a byte-level BPE trained on a few built-in sentences (plus any texts passed in), so it
encodes any string, including the `<think>`/`<rewrite>` tags, as ordinary text. The model is a 2-layer
Llama with random, seeded weights: its output is gibberish, but every code path (4-bit loading, LoRA,
generation, adapters) runs on it exactly as on a real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BUILDER_VERSION = 1
MARKER_FILE = "cqr_tiny_model.json"

BOS_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BUILTIN_TEXTS = (
    "Rewrite the question so that it can be understood without the conversation.",
    "Resolve every pronoun and fill in what the user left out, then write the rewrite.",
    "<think> The user asks about the author mentioned earlier. </think>\n"
    "<rewrite> When was the author born? </rewrite>",
    "<think> It refers to the Eiffel Tower. </think>\n<rewrite> How tall is the Eiffel Tower? </rewrite>",
    "### Context Begin ###\nQ1: Who wrote Pride and Prejudice?\nA1: Jane Austen.\n### Context End ###",
    "Query: when did she die?\nRewrite:",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital and largest city of France.",
    "Conversational search systems answer a sequence of related questions from one user.",
    "A retriever ranks passages from a large collection for every query it receives.",
    "Tell me more about the history of the city and its famous buildings.",
    "How many people live there, and which languages do they speak?",
    "The river flows through the valley before it reaches the sea in the south.",
    "Scientists measured the temperature of the water every hour for three days.",
    "Which team won the championship in that year, and who was their coach?",
    "Numbers like 1, 2, 3, 10, 42, 100 and 2025 appear in questions about dates.",
)


def _fingerprint(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _marker(seed: int, texts: tuple[str, ...]) -> dict:
    return {"builder_version": BUILDER_VERSION, "seed": seed, "texts": _fingerprint(texts)}


def build_tiny_tokenizer(texts: Iterable[str] = BUILTIN_TEXTS, vocab_size: int = 768) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens and chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[BOS_TOKEN, IM_START, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=2048,
    )


def tiny_model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """2 layers of width 64, tied embeddings; the vocabulary is rounded up to a multiple of 64."""
    vocab_size = -(-len(tokenizer) // 64) * 64
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # With tied embeddings and the usual 0.02 init, the residual stream dominates and greedy decoding
        # repeats the last token forever; wider weights give varied outputs that tests can tell apart.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def is_built(dir: str | Path, seed: int = 0, vocab_texts: Iterable[str] | None = None) -> bool:
    """Whether `dir` holds a complete tiny model built with this seed, these texts and this builder."""
    marker_path = Path(dir) / MARKER_FILE
    if not marker_path.is_file():
        return False
    return json.loads(marker_path.read_text()) == _marker(seed, BUILTIN_TEXTS + tuple(vocab_texts or ()))


def build_tiny_model(dir: str | Path, seed: int = 0, vocab_texts: Iterable[str] | None = None) -> Path:
    """Write a tiny tokenizer + causal LM to `dir` (loadable with `from_pretrained`) and return it.

    Nothing is downloaded. A folder already built with the same seed and texts is returned as is; the
    marker file is written last, so a folder left half-written by a crash is rebuilt. Callers sharing a
    folder between processes should build into a temporary folder and rename it (see `loading`).
    """
    out = Path(dir)
    texts = BUILTIN_TEXTS + tuple(vocab_texts or ())
    if is_built(out, seed, vocab_texts):
        return out

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(texts)
    config = tiny_model_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    (out / MARKER_FILE).write_text(json.dumps(_marker(seed, texts)))
    return out
