"""Pairs for embedding fine-tuning: building them from documents, rejecting bad records with a reason,
the held-out split by document, the retrieval task, and config errors that name the key. No Ray."""

from __future__ import annotations

import gzip
import json

import pytest

from workloads.common.config import ConfigError, load_config
from workloads.data.sample import BaseDoc
from workloads.train.embedder import (
    FinetuneEmbedderConfig,
    Pair,
    pairs_from_documents,
    parse_pair_lines,
    query_and_rest,
    read_pairs,
    retrieval_metrics,
    retrieval_task,
    split_pairs,
)

REST = " ".join(f"word{i}" for i in range(40)) + "."


def test_query_is_the_first_sentence_and_the_positive_the_rest():
    text = f"Return the  square root\nof x. It raises ValueError for negatives.\n\n{REST}"
    query, rest = query_and_rest(text)
    assert query == "Return the square root of x."
    assert rest.startswith("It raises ValueError for negatives. word0 word1")
    assert rest.endswith("word39.")


def test_a_heading_is_the_query_and_its_underline_is_dropped():
    text = f'The "assert" statement\n**********************\n\nAssert statements help. {REST}'
    query, rest = query_and_rest(text)
    assert query == 'The "assert" statement'
    assert rest.startswith("Assert statements help.") and "*" not in rest


def test_a_short_first_sentence_runs_on_to_the_next_end_mark():
    query, _ = query_and_rest(f"See e.g. the os module for details. {REST}")
    assert query == "See e.g. the os module for details."


def test_documents_without_a_usable_rest_or_query_are_skipped():
    assert query_and_rest("One sentence only, and nothing after it.") is None
    assert query_and_rest("Short. " + " ".join(["x"] * 5)) is None
    assert query_and_rest("\n\n  \n") is None


def test_pairs_from_documents_truncate_positives_and_name_each_document():
    docs = [
        BaseDoc("stdlib:json", "json", f"JSON encoder and decoder. {REST}"),
        BaseDoc("stdlib:json", "json", f"Decode a JSON document. {REST}"),
        BaseDoc("stdlib:os", "os", "Too short."),
    ]
    records, skipped = pairs_from_documents(docs, max_words=10, with_title=True)
    assert skipped == 1
    assert [r["doc_id"] for r in records] == ["stdlib:json#0", "stdlib:json#1"]
    assert records[0]["query"] == "json: JSON encoder and decoder."
    assert records[0]["positive"] == " ".join(f"word{i}" for i in range(10))


def _lines(*records) -> list[bytes]:
    return [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]


def test_bad_records_are_rejected_with_a_reason_and_counts_reconcile():
    lines = _lines(
        {"query": "q1", "positive": "p1"},
        {"query": "q2", "positive": "p2", "negative": "n2", "extra": 1},
        {"query": "q3", "positive": "p3", "negative": None},
        b"",  # blank: not a record
        b'{"query": "q", "positive": ',
        b"\xff\xfe not utf-8",
        [1, 2],
        {"positive": "p"},
        {"query": "q"},
        {"query": 7, "positive": "p"},
        {"query": "q", "positive": ["p"]},
        {"query": "   ", "positive": "p"},
        {"query": "q", "positive": ""},
        {"query": "q", "positive": "p", "negative": 3},
        {"query": "q", "positive": "p", "negative": " "},
    )
    pairs, rejects = parse_pair_lines(lines, source="pairs.jsonl")
    assert pairs == [Pair("q1", "p1"), Pair("q2", "p2", "n2"), Pair("q3", "p3")]
    assert [(r.line, r.reason) for r in rejects] == [
        (5, "malformed_json"),
        (6, "invalid_utf8"),
        (7, "not_an_object"),
        (8, "missing_query"),
        (9, "missing_positive"),
        (10, "non_string_query"),
        (11, "non_string_positive"),
        (12, "empty_query"),
        (13, "empty_positive"),
        (14, "non_string_negative"),
        (15, "empty_negative"),
    ]
    assert rejects[0].raw == '{"query": "q", "positive": ' and rejects[0].source == "pairs.jsonl"
    assert len(pairs) + len(rejects) == len(lines) - 1


def test_read_pairs_reads_a_folder_of_plain_and_gzipped_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"query": "q1", "positive": "p1"}\nnot json\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('{"query": "q2", "positive": "p2"}\n')
    pairs, rejects, read = read_pairs(str(tmp_path))
    assert [p.query for p in pairs] == ["q1", "q2"]
    assert [(r.line, r.reason) for r in rejects] == [(2, "malformed_json")]
    assert read == 3


def _pairs(n: int) -> list[Pair]:
    return [Pair(f"query {i}", f"document {i}") for i in range(n)]


def test_split_is_by_document_deterministic_and_seeded():
    pairs = _pairs(1000)
    # A second query for every tenth document: it must land on its document's side.
    pairs += [Pair(f"another query {i}", f"document {i}") for i in range(0, 1000, 10)]
    train, held_out = split_pairs(pairs, eval_fraction=0.2, seed=0)
    assert len(train) + len(held_out) == len(pairs)
    assert 0.15 < len(held_out) / len(pairs) < 0.25
    assert not {p.positive for p in train} & {p.positive for p in held_out}

    again = split_pairs(list(reversed(pairs)), eval_fraction=0.2, seed=0)[1]
    assert {p.query for p in again} == {p.query for p in held_out}  # order does not matter
    other_seed = split_pairs(pairs, eval_fraction=0.2, seed=1)[1]
    assert {p.query for p in other_seed} != {p.query for p in held_out}


def test_retrieval_task_scores_each_query_against_held_out_positives_and_negatives():
    held_out = [
        Pair("q0", "doc A"),
        Pair("q1", "doc A"),  # the same document: one corpus entry, relevant to both
        Pair("q2", "doc B", "doc C"),
    ]
    queries, corpus, relevant = retrieval_task(held_out)
    assert sorted(corpus.values()) == ["doc A", "doc B", "doc C"]
    assert {q: corpus[next(iter(ids))] for q, ids in relevant.items()} == {
        "q0": "doc A",
        "q1": "doc A",
        "q2": "doc B",
    }
    assert queries == {"q0": "q0", "q1": "q1", "q2": "q2"}


def test_retrieval_metrics_reads_one_evaluation_out_of_the_trainer_logs():
    logged = {
        "eval_loss": 0.5,
        "eval_heldout_cosine_recall@10": 0.9,
        "eval_heldout_cosine_mrr@10": 0.7,
        "eval_heldout_cosine_accuracy@10": 0.9,
        "before_heldout_cosine_recall@10": 0.1,
        "epoch": 1.0,
    }
    assert retrieval_metrics(logged, "eval") == {"mrr@10": 0.7, "recall@10": 0.9, "loss": 0.5}


MINIMAL = ["data.path=pairs.jsonl", "output.path=/tmp/out"]


def test_config_defaults_validate():
    cfg = load_config(FinetuneEmbedderConfig, None, MINIMAL)
    assert cfg.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg.scaling.num_workers == 2 and cfg.scaling.use_gpu is False
    assert cfg.eval.k == [1, 5, 10]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.batch_sise=8", "did you mean 'train.batch_size'"),
        ("data.eval_fraction=1.5", "data.eval_fraction"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("train.precision=fp8", "train.precision"),
        ("train.precision=fp16", "train.precision"),  # fp16 AMP needs a GPU
        ("eval.k=[0, 10]", "eval.k"),
        ("scaling.num_workers=0", "scaling.num_workers"),
    ],
)
def test_config_errors_name_the_key(override, named):
    with pytest.raises(ConfigError, match=r"(?s)" + named.replace(".", r"\.")):
        load_config(FinetuneEmbedderConfig, None, [*MINIMAL, override])


def test_fp16_is_accepted_on_gpu_workers():
    cfg = load_config(
        FinetuneEmbedderConfig, None, [*MINIMAL, "train.precision=fp16", "scaling.use_gpu=true"]
    )
    assert cfg.train.precision == "fp16"
