"""Hybrid retrieval: dense (the FAISS index the embed jobs build) and lexical (BM25 over the same
chunks, with bm25s), fused by reciprocal rank, then optionally reranked by a cross-encoder.

    from workloads.embed.index import VectorIndex
    retriever = HybridRetriever(VectorIndex.load("outputs/index"))
    for chunk in retriever.retrieve("how do I open a file", k=5):
        print(chunk.rank, chunk.doc_id, chunk.start, chunk.end, chunk.score)

Both retrievers rank the same rows (a row of the index's ids.parquet is one chunk), so fusion needs
no id mapping. Reciprocal-rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009; k=60 is their
constant and LlamaIndex's and Haystack's default) needs no score calibration between a cosine and a
BM25 score, which is why both anchors use it for hybrid search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from workloads.embed.models import resolve_model_path
from workloads.embed.schema import embedding_text

RRF_K = 60
Mode = Literal["dense", "lexical", "hybrid"]


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[int]], k: int = RRF_K
) -> list[tuple[int, float]]:
    """(row, fused score) best first: sum over rankings of 1 / (k + rank), rank from 1. Ties keep
    the order in which rows first appear (the first ranking's order first)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, row in enumerate(ranking, start=1):
            scores[row] = scores.get(row, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])


@dataclass(frozen=True)
class RetrievedChunk:
    """One chunk of the answer's sources: where it is (doc id, character offsets), its fused
    score, and its rank in each retriever (None where that retriever did not return it)."""

    rank: int
    score: float
    doc_id: str
    chunk_id: str
    text: str
    start: int
    end: int
    row: int
    dense_rank: int | None
    lexical_rank: int | None
    title: str | None = None  # the document's title, when the index has titles

    def citation(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("text")
        return out


class LexicalIndex:
    """BM25 (bm25s, Lucene's variant: k1 1.5, b 0.75) over the index rows' chunk texts:
    lowercased, English stopwords removed, and Snowball-stemmed (PyStemmer), so "sorting" in a
    question matches "sorts" in a document. bm25s's own benchmarks and Lucene's English analyzer
    stem too; on this repo's question set it lifts BM25's recall@5 from 0.67 to 0.72 (bench/)."""

    def __init__(self, texts: Sequence[str], *, stem: bool = True):
        import bm25s

        self._bm25s = bm25s
        self._stemmer = _english_stemmer() if stem else None
        self.size = len(texts)
        self.model = bm25s.BM25()
        if self.size:
            self.model.index(self._tokens(list(texts)), show_progress=False)

    def _tokens(self, texts: list[str]):
        return self._bm25s.tokenize(
            texts, stopwords="en", stemmer=self._stemmer, show_progress=False
        )

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """(row, BM25 score) best first; rows without any query term are left out."""
        k = min(k, self.size)
        if k == 0:
            return []
        tokens = self._tokens([query])
        if not tokens.vocab:  # only stopwords or punctuation
            return []
        rows, scores = self.model.retrieve(tokens, k=k, show_progress=False)
        return [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if s > 0]


def _english_stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


class Reranker:
    """A sentence-transformers CrossEncoder that scores (query, chunk) pairs: a local folder (one
    fine-tuned here, or built from a BERT-style model) or a hub id on clusters, e.g.
    cross-encoder/ms-marco-MiniLM-L6-v2."""

    def __init__(self, model: str, *, top_n: int = 20, device: str = "cpu", batch_size: int = 32):
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(resolve_model_path(model), device=device)
        self.top_n = top_n
        self.batch_size = batch_size

    def scores(self, query: str, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        out = self.model.predict(
            [(query, t) for t in texts], batch_size=self.batch_size, show_progress_bar=False
        )
        return [float(s) for s in np.asarray(out).reshape(len(texts), -1)[:, -1]]


def lexical_texts(ids) -> list[str]:
    """What BM25 indexes for each row: the document's title (when the index has titles) and the
    chunk's text, as the dense side embeds them (`workloads.embed.schema.embedding_text`)."""
    texts = ids.column("text").to_pylist()
    if "title" not in ids.column_names:
        return texts
    return [
        embedding_text(title, text)
        for title, text in zip(ids.column("title").to_pylist(), texts, strict=True)
    ]


class HybridRetriever:
    """Dense and lexical candidates (`candidates` each), fused by RRF, optionally reranked by a
    cross-encoder (its `top_n` best fused rows), the top k returned."""

    def __init__(
        self,
        index,
        *,
        candidates: int = 50,
        rrf_k: int = RRF_K,
        device: str = "cpu",
        reranker: Reranker | None = None,
    ):
        self.index = index
        self.candidates = candidates
        self.rrf_k = rrf_k
        self.device = device
        self.reranker = reranker
        self.lexical = LexicalIndex(lexical_texts(index.ids))

    def dense(self, query: str, k: int) -> list[tuple[int, float]]:
        if len(self.index) == 0:
            return []
        encoder = self.index.encoder(device=self.device)
        vector = encoder.encode_query(
            [query], normalize_embeddings=self.index.info.embedding.normalized
        )
        found = self.index.search(np.asarray(vector), min(k, len(self.index)))
        return [
            (int(i), float(s)) for s, i in zip(found.scores[0], found.ids[0], strict=True) if i >= 0
        ]

    def retrieve(self, query: str, k: int = 5, mode: Mode = "hybrid") -> list[RetrievedChunk]:
        dense = self.dense(query, self.candidates) if mode != "lexical" else []
        lexical = self.lexical.search(query, self.candidates) if mode != "dense" else []
        dense_rank = {row: r for r, (row, _) in enumerate(dense, start=1)}
        lexical_rank = {row: r for r, (row, _) in enumerate(lexical, start=1)}
        if mode == "hybrid":
            ranked = reciprocal_rank_fusion(
                [[row for row, _ in dense], [row for row, _ in lexical]], k=self.rrf_k
            )
        else:
            ranked = dense or lexical
        if self.reranker is not None and ranked:
            pool = [row for row, _ in ranked[: max(k, self.reranker.top_n)]]
            texts = self.index.ids.take(pool).column("text").to_pylist()
            scored = self.reranker.scores(query, texts)
            ranked = sorted(zip(pool, scored, strict=True), key=lambda item: -item[1])
        rows = [row for row, _ in ranked[:k]]
        records = self.index.ids.take(rows).to_pylist() if rows else []
        return [
            RetrievedChunk(
                rank=i + 1,
                score=score,
                row=row,
                dense_rank=dense_rank.get(row),
                lexical_rank=lexical_rank.get(row),
                **record,
            )
            for i, ((row, score), record) in enumerate(zip(ranked[:k], records, strict=True))
        ]
