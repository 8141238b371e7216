"""Hybrid retrieval's parts without Ray: reciprocal-rank fusion by hand, and BM25 over chunks."""

from __future__ import annotations

import pytest

from workloads.serve.rag.retrieval import LexicalIndex, reciprocal_rank_fusion


def test_rrf_sums_reciprocal_ranks():
    fused = dict(reciprocal_rank_fusion([[1, 2, 3], [3, 1]], k=60))
    assert fused[1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[2] == pytest.approx(1 / 62)
    assert fused[3] == pytest.approx(1 / 63 + 1 / 61)
    assert [row for row, _ in reciprocal_rank_fusion([[1, 2, 3], [3, 1]], k=60)] == [1, 3, 2]


def test_rrf_rewards_agreement_over_one_high_rank():
    # row 7 is second in both lists; row 1 is first in one only
    order = [row for row, _ in reciprocal_rank_fusion([[1, 7], [9, 7]])]
    assert order[0] == 7


def test_bm25_finds_the_chunk_with_the_rare_term_and_skips_non_matches():
    texts = [
        "open a file and read its lines",
        "sorting a list of numbers in place",
        "the quicksort partition step explained",
        "nothing relevant here at all",
    ]
    index = LexicalIndex(texts)
    hits = index.search("quicksort partition", k=3)
    assert hits[0][0] == 2
    assert all(row != 3 for row, _ in hits)  # no shared term: left out, not ranked last
    assert index.search("the and of", k=3) == []  # stopwords only
    assert LexicalIndex([]).search("anything", k=5) == []
