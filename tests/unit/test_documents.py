"""Readers: every record becomes one row; bad ones carry a reason instead of crashing the job."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pytest

from workloads.common import documents as d
from workloads.common.config import InputConfig
from workloads.common.storage import InputNotFoundError, expand_input_paths

KW = dict(source="/in/a.jsonl", id_prefix="a.jsonl", text_field="text", id_field="id")


def parse(lines: list[bytes], first_line: int = 1) -> list[dict]:
    return d.parse_jsonl_lines(lines, first_line=first_line, **KW).to_pylist()


def test_good_record_keeps_id_text_and_meta():
    (row,) = parse([json.dumps({"id": "x1", "text": "hello", "lang": "en", "n": 3}).encode()])
    assert row["id"] == "x1" and row["text"] == "hello" and row["reject_reason"] is None
    assert json.loads(row["meta"]) == {"lang": "en", "n": 3}
    assert row["raw"] is None and row["line"] == 1


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"id": "a", "text": "unterminated', d.MALFORMED_JSON),
        (b'{"id": "a", "text": "caf\xe9"}', d.INVALID_UTF8),
        (b'{"id": "a", "body": "x"}', d.MISSING_TEXT),
        (b'{"id": "a", "text": null}', d.MISSING_TEXT),
        (b'{"id": "a", "text": 12}', d.NON_STRING_TEXT),
        (b'{"id": "a", "text": ["x"]}', d.NON_STRING_TEXT),
        (b'{"id": "a", "text": ""}', d.EMPTY_TEXT),
        (b'{"id": "a", "text": " \\n\\t "}', d.EMPTY_TEXT),
        (b'["not", "an", "object"]', d.NOT_AN_OBJECT),
        (b'"just a string"', d.NOT_AN_OBJECT),
        (b'{"id": {"x": 1}, "text": "t"}', d.INVALID_ID),
        (b'{"id": true, "text": "t"}', d.INVALID_ID),
    ],
)
def test_each_bad_record_is_rejected_with_its_reason_and_raw_line(raw, reason):
    (row,) = parse([raw], first_line=7)
    assert row["reject_reason"] == reason
    assert row["text"] is None
    assert row["raw"]  # the evidence is kept
    assert row["line"] == 7


def test_blank_lines_are_not_records_and_line_numbers_stay_true():
    rows = parse([b'{"text": "a"}', b"", b"   ", b'{"text": "b"}'])
    assert [r["text"] for r in rows] == ["a", "b"]
    assert [r["line"] for r in rows] == [1, 4]
    assert [r["id"] for r in rows] == [
        "a.jsonl:1",
        "a.jsonl:4",
    ]  # positional ids without an id field


def test_integer_ids_become_strings():
    (row,) = parse([b'{"id": 42, "text": "x"}'])
    assert row["id"] == "42"


def test_schema_is_fixed_even_for_an_all_rejected_batch():
    table = d.parse_jsonl_lines([b"{bad"], first_line=1, **KW)
    assert table.schema == d.DOCUMENT_SCHEMA


def test_streaming_reader_splits_blocks_and_chunks_without_losing_lines(monkeypatch):
    monkeypatch.setattr(d, "_READ_CHUNK_BYTES", 7)  # chunk boundaries fall inside records
    lines = [json.dumps({"id": f"d{i}", "text": f"text number {i}"}) for i in range(25)]
    stream = io.BytesIO(("\n".join(lines)).encode())  # no trailing newline on the last record
    blocks = list(d.iter_jsonl_blocks(stream, rows_per_block=10, **KW))
    assert [b.num_rows for b in blocks] == [10, 10, 5]
    rows = [r for b in blocks for r in b.to_pylist()]
    assert [r["id"] for r in rows] == [f"d{i}" for i in range(25)]
    assert [r["line"] for r in rows] == list(range(1, 26))


def test_arrow_rows_are_validated_like_jsonl():
    table = pa.table({"id": ["a", "b", "c"], "text": ["ok", None, "  "], "score": [1.0, 2.0, 3.0]})
    rows = d.documents_from_arrow(
        table,
        source="p.parquet",
        id_prefix="p.parquet",
        first_row=10,
        text_field="text",
        id_field="id",
    ).to_pylist()
    assert [r["reject_reason"] for r in rows] == [None, d.MISSING_TEXT, d.EMPTY_TEXT]
    assert json.loads(rows[0]["meta"]) == {"score": 1.0}
    assert [r["line"] for r in rows] == [10, 11, 12]


def test_expand_folder_glob_and_file(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in (
        "a.jsonl",
        "sub/b.jsonl",
        "c.parquet",
        "_SUCCESS.json",
        "sub/.hidden.jsonl",
        "notes.txt",
    ):
        (tmp_path / name).write_text("")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("")
    exts = d.JSONL_EXTENSIONS + d.PARQUET_EXTENSIONS
    _, files = expand_input_paths(str(tmp_path), exts)
    assert [f.rsplit("/", 1)[-1] for f in files] == [
        "a.jsonl",
        "c.parquet",
        "d.jsonl.gz",
        "b.jsonl",
    ]
    _, files = expand_input_paths(str(tmp_path / "**.jsonl"), exts)
    assert sorted(f.rsplit("/", 1)[-1] for f in files) == ["a.jsonl", "b.jsonl"]
    _, files = expand_input_paths(
        str(tmp_path / "notes.txt"), exts
    )  # an explicit file is taken as given
    assert len(files) == 1


def test_missing_input_names_the_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(InputNotFoundError, match="nowhere"):
        d.list_input_files(InputConfig(path=missing))
    with pytest.raises(InputNotFoundError, match="matches no files"):
        d.list_input_files(InputConfig(path=str(tmp_path / "*.jsonl")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="holds no files"):
        d.list_input_files(InputConfig(path=str(tmp_path / "empty")))


def test_a_jobs_own_output_reads_back_unchanged():
    """kept/ of one job (id, text, meta, source, line) feeds the next without nesting or renumbering."""
    import pyarrow as pa

    from workloads.common.documents import documents_from_arrow

    kept = pa.table(
        {
            "id": ["a", "b"],
            "text": ["first text", " "],
            "meta": ['{"url": "u"}', None],
            "source": ["part-0.jsonl", "part-1.jsonl"],
            "line": [7, 9],
            "language": ["en", "en"],
        }
    )
    rows = documents_from_arrow(
        kept, source="kept/x.parquet", id_prefix="x", first_row=0, text_field="text", id_field="id"
    ).to_pylist()
    assert rows[0]["meta"] == '{"url": "u"}' and rows[0]["source"] == "part-0.jsonl"
    assert rows[0]["line"] == 7 and rows[0]["reject_reason"] is None
    assert rows[1]["reject_reason"] == "empty_text" and rows[1]["line"] == 9
