"""Retrieval behind one interface: a batch of queries in, ranked passage ids out."""

from cqr_lightning.retrieval.base import Retriever, SearchHit, best_gold_rank

__all__ = ["Retriever", "SearchHit", "best_gold_rank"]
