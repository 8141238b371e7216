"""Token-aware chunking and the embed job's per-batch functions: no Ray."""

from __future__ import annotations

from functools import cache

import numpy as np
import pyarrow as pa
import pytest

from workloads.common.config import ConfigError, load_config
from workloads.common.documents import DOCUMENT_SCHEMA, NON_STRING_TEXT
from workloads.embed.chunking import (
    CHUNK_SCHEMA,
    NO_TOKENS,
    ChunkConfig,
    chunk_batch,
    load_tokenizer,
    token_windows,
)
from workloads.embed.embedding import (
    DUPLICATE_ID,
    EmbedConfig,
    document_counts,
    embed_rows,
    length_order,
    live_chunks,
    rejected_rows,
    resolve_precision,
)
from workloads.embed.models import resolve_model_path

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@cache
def tokenizer():
    return load_tokenizer(resolve_model_path(MINILM))


def docs(*rows: dict) -> pa.Table:
    full = []
    for i, r in enumerate(rows):
        full.append(
            {"id": f"d{i}", "meta": None, "source": "f.jsonl", "line": i + 1, "reject_reason": None}
            | {"raw": None}
            | r
        )
    return pa.Table.from_pylist(full, schema=DOCUMENT_SCHEMA)


def count_dict(rows: pa.Table, duplicates) -> dict[str, int]:
    table = document_counts(rows, duplicates=duplicates)
    return dict(zip(table["key"].to_pylist(), table["rows"].to_pylist(), strict=True))


def test_windows_cover_every_token_with_the_configured_overlap():
    windows = token_windows(23, size=8, overlap=3)
    assert windows == [(0, 8), (5, 13), (10, 18), (15, 23)]
    assert token_windows(8, 8, 3) == [(0, 8)]
    assert token_windows(0, 8, 3) == []
    covered = set().union(*(range(a, b) for a, b in token_windows(1000, 64, 16)))
    assert covered == set(range(1000))


def test_chunks_are_exact_spans_of_the_text_within_the_token_budget():
    text = " ".join(
        f"Sentence number {i} talks about café naïveté and 日本語 words." for i in range(60)
    )
    cfg = ChunkConfig(size_tokens=40, overlap_tokens=8)
    rows = chunk_batch(docs({"text": text}), tokenizer=tokenizer(), cfg=cfg).to_pylist()
    assert len(rows) > 5
    assert [r["chunk_index"] for r in rows] == list(range(len(rows)))
    assert [r["chunk_id"] for r in rows] == [f"d0#{k}" for k in range(len(rows))]
    for r in rows:
        assert r["text"] == text[r["start"] : r["end"]]
        assert r["n_tokens"] <= 40
        n = len(tokenizer().encode(r["text"], add_special_tokens=False).ids)
        assert n == r["n_tokens"]
    for a, b in zip(rows, rows[1:], strict=False):
        assert a["start"] < b["start"] < a["end"]  # consecutive chunks overlap
    assert rows[0]["start"] == 0 and rows[-1]["end"] == len(text)


def test_rejects_empty_and_overlong_documents_are_accounted_for():
    table = docs(
        {"text": "a short document about Ray Data."},
        {"text": None, "reject_reason": NON_STRING_TEXT, "raw": '{"text": 3}'},
        {"text": "\u200b\u200b\u200b"},  # nothing a tokenizer keeps
        {"text": "word " * 500},
    )
    rows = chunk_batch(
        table, tokenizer=tokenizer(), cfg=ChunkConfig(max_doc_chars=1000)
    ).to_pylist()
    by_doc = {}
    for r in rows:
        by_doc.setdefault(r["doc_id"], []).append(r)
    assert [r["chunk_index"] for r in by_doc["d0"]] == [0]
    assert (
        by_doc["d1"][0]["reject_reason"] == NON_STRING_TEXT and by_doc["d1"][0]["chunk_index"] == -1
    )
    assert by_doc["d2"][0]["drop_reason"] == NO_TOKENS
    assert by_doc["d3"][0]["doc_truncated"] is True
    assert max(r["end"] for r in by_doc["d3"]) <= 1000
    counts = count_dict(pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA), [])
    assert counts["read"] == 4
    assert counts["kept"] == 2
    assert counts[f"rejected:{NON_STRING_TEXT}"] == 1
    assert counts[f"dropped:{NO_TOKENS}"] == 1
    assert counts["truncated_documents"] == 1
    assert counts["read"] == counts["kept"] + 2


def test_a_repeated_document_id_is_rejected_after_its_first_occurrence():
    table = docs({"text": "first copy of the id"}, {"text": "second copy of the id"})
    table = table.set_column(0, "id", pa.array(["same", "same"]))
    rows = chunk_batch(table, tokenizer=tokenizer(), cfg=ChunkConfig())
    loser = [("same", "f.jsonl", 2)]
    live = live_chunks(rows, duplicates=loser).to_pylist()
    assert [r["text"] for r in live] == ["first copy of the id"]
    rejects = rejected_rows(rows, duplicates=loser).to_pylist()
    assert [(r["id"], r["line"], r["reject_reason"]) for r in rejects] == [
        ("same", 2, DUPLICATE_ID)
    ]
    counts = count_dict(rows, loser)
    assert counts["read"] == 2 and counts["kept"] == 1 and counts[f"rejected:{DUPLICATE_ID}"] == 1
    assert counts["chunks"] == 1


def test_vectors_go_back_to_their_rows_after_the_length_sort():
    texts = ["bb", "a", "dddd", "ccc"]
    order = length_order(texts)
    assert [texts[i] for i in order] == ["dddd", "ccc", "bb", "a"]
    table = chunk_batch(
        docs(*({"text": t} for t in texts)), tokenizer=tokenizer(), cfg=ChunkConfig()
    )
    table = live_chunks(table, duplicates=[])
    vectors = np.arange(8, dtype=np.float32).reshape(4, 2)
    out = embed_rows(table, vectors)
    assert out.column("embedding").type.list_size == 2
    assert out.column("embedding").to_pylist()[2] == [4.0, 5.0]


def test_precision_auto_is_fp16_on_gpus_and_explicit_choices_win():
    assert resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("fp32", "cuda") == "fp32"
    assert resolve_precision("auto", "cpu") in ("bf16", "fp32")


def test_bad_configs_name_the_key():
    base = ["input.path=x", "output.path=y"]
    with pytest.raises(ConfigError, match="chunk.overlap_tokens"):
        load_config(EmbedConfig, None, [*base, "chunk.size_tokens=32", "chunk.overlap_tokens=32"])
    with pytest.raises(ConfigError, match="encoder.precision"):
        load_config(EmbedConfig, None, [*base, "encoder.precision=int4"])
    with pytest.raises(ConfigError, match="actors.num_cpu"):
        load_config(EmbedConfig, None, [*base, "actors.num_cpu=1"])


def test_the_title_field_rides_along_every_chunk_but_not_in_its_text():
    import json

    from workloads.embed.schema import embedding_text

    cfg = ChunkConfig(size_tokens=8, overlap_tokens=2, title_field="title", max_title_tokens=6)
    text = "one two three four five six seven eight nine ten eleven twelve"
    rows = chunk_batch(
        docs(
            {"text": text, "meta": json.dumps({"title": "difflib  helpers"})},
            {"text": text, "meta": json.dumps({"title": "a b c d e f g"})},
            {"text": text, "meta": json.dumps({"other": 1})},
            {"text": text},
        ),
        tokenizer=tokenizer(),
        cfg=cfg,
    ).to_pylist()
    titles = {}
    for r in rows:
        assert text[r["start"] : r["end"]] == r["text"]  # offsets unchanged by the title
        titles.setdefault(r["doc_id"], set()).add(r["title"])
    assert titles == {"d0": {"difflib helpers"}, "d1": {"a b c d e f"}, "d2": {None}, "d3": {None}}
    assert embedding_text("difflib", "x") == "difflib\n\nx" and embedding_text(None, "x") == "x"
    untitled = chunk_batch(
        docs({"text": text, "meta": json.dumps({"title": "t"})}),
        tokenizer=tokenizer(),
        cfg=ChunkConfig(size_tokens=8, overlap_tokens=2),
    )
    assert set(untitled["title"].to_pylist()) == {None}  # no title_field: no title
