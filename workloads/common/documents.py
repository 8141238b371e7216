"""Read JSONL and Parquet documents into one canonical schema, routing bad records to rejects.

    from workloads.common.documents import read_documents
    ds = read_documents(cfg.input)          # a ray.data.Dataset with DOCUMENT_SCHEMA

Every record that is read becomes exactly one row. A good row has `reject_reason = null`; a bad one
(malformed JSON, invalid UTF-8, a missing/non-string/empty text field, a non-scalar id) keeps its
raw line in `raw` and says why in `reject_reason`, so jobs count and write it instead of crashing
or losing it. Fields other than the id and text are kept as a JSON object string in `meta`, which
keeps the Arrow schema fixed however heterogeneous the JSONL is.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workloads.common.config import InputConfig
from workloads.common.storage import expand_input_paths

# Why a record was rejected. Stable strings: they appear in manifests and rejects/.
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
NOT_AN_OBJECT = "not_an_object"
MISSING_TEXT = "missing_text"
NON_STRING_TEXT = "non_string_text"
EMPTY_TEXT = "empty_text"
INVALID_ID = "invalid_id"
REJECT_REASONS = (
    MALFORMED_JSON,
    INVALID_UTF8,
    NOT_AN_OBJECT,
    MISSING_TEXT,
    NON_STRING_TEXT,
    EMPTY_TEXT,
    INVALID_ID,
)

DOCUMENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("meta", pa.string()),  # JSON object of the record's other fields, or null
        ("source", pa.string()),  # file the record came from
        ("line", pa.int64()),  # 1-based line (JSONL) or 0-based row (Parquet) in that file
        ("reject_reason", pa.string()),  # null for a good document
        ("raw", pa.string()),  # the original record, for rejects only
    ]
)

CANONICAL_COLUMNS = ("id", "text", "meta", "source", "line")
JSONL_EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_EXTENSIONS = (".parquet",)
ROWS_PER_BLOCK = 8192
_READ_CHUNK_BYTES = 8 << 20


def _scalar_id(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


class _Rows:
    """Column lists for one output block."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {name: [] for name in DOCUMENT_SCHEMA.names}

    def add(self, doc_id, text, meta, source, line, reason=None, raw=None) -> None:
        c = self.cols
        c["id"].append(doc_id)
        c["text"].append(text)
        c["meta"].append(meta)
        c["source"].append(source)
        c["line"].append(line)
        c["reject_reason"].append(reason)
        c["raw"].append(raw)

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.cols, schema=DOCUMENT_SCHEMA)


def _record_to_row(
    rows: _Rows,
    record: Any,
    *,
    source: str,
    line: int,
    default_id: str,
    text_field: str | None,
    id_field: str | None,
    raw: str | None,
) -> None:
    if not isinstance(record, dict):
        rows.add(default_id, None, None, source, line, NOT_AN_OBJECT, raw)
        return
    doc_id = default_id
    if id_field is not None and record.get(id_field) is not None:
        doc_id = _scalar_id(record[id_field])
        if doc_id is None:
            rows.add(default_id, None, None, source, line, INVALID_ID, raw or _dumps(record))
            return
    if text_field is None:  # the whole record is the payload (chat records): kept as JSON text
        rest = {k: v for k, v in record.items() if k != id_field}
        rows.add(doc_id, _dumps(rest), None, source, line)
        return
    text = record.get(text_field)
    reason = None
    if text is None:
        reason = MISSING_TEXT
    elif not isinstance(text, str):
        reason = NON_STRING_TEXT
    elif not text.strip():
        reason = EMPTY_TEXT
    if reason is not None:
        rows.add(doc_id, None, None, source, line, reason, raw or _dumps(record))
        return
    rest = {k: v for k, v in record.items() if k != text_field and k != id_field}
    rows.add(doc_id, text, _dumps(rest) if rest else None, source, line)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def parse_jsonl_lines(
    lines: list[bytes],
    *,
    source: str,
    id_prefix: str,
    first_line: int,
    text_field: str,
    id_field: str | None,
) -> pa.Table:
    """One canonical row per non-blank line. Pure: unit-testable without Ray."""
    rows = _Rows()
    for offset, raw_bytes in enumerate(lines):
        line = first_line + offset
        if not raw_bytes.strip():
            continue  # blank lines separate nothing in JSONL; they are not records
        default_id = f"{id_prefix}:{line}"
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError:
            rows.add(
                default_id,
                None,
                None,
                source,
                line,
                INVALID_UTF8,
                raw_bytes.decode("utf-8", "replace"),
            )
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            rows.add(default_id, None, None, source, line, MALFORMED_JSON, raw)
            continue
        _record_to_row(
            rows,
            record,
            source=source,
            line=line,
            default_id=default_id,
            text_field=text_field,
            id_field=id_field,
            raw=raw,
        )
    return rows.table()


def documents_from_arrow(
    table: pa.Table,
    *,
    source: str,
    id_prefix: str,
    first_row: int,
    text_field: str,
    id_field: str | None,
) -> pa.Table:
    """Canonical rows from a Parquet/Arrow batch with arbitrary columns. Pure: no Ray.

    A table that is already canonical (a job's `kept/` output: id, text, meta, source, line) keeps
    its meta, source and line, so one job's output feeds the next without nesting or renumbering.
    """
    rows = _Rows()
    canonical = (
        text_field == "text"
        and id_field == "id"
        and set(CANONICAL_COLUMNS) <= set(table.column_names)
    )
    for offset, record in enumerate(table.to_pylist()):
        row = first_row + offset
        if canonical and isinstance(record["source"], str) and isinstance(record["line"], int):
            n = len(rows.cols["id"])
            _record_to_row(
                rows,
                {"id": record["id"], "text": record["text"]},
                source=record["source"],
                line=record["line"],
                default_id=f"{id_prefix}:{row}",
                text_field=text_field,
                id_field=id_field,
                raw=None,
            )
            if rows.cols["reject_reason"][n] is None:
                rows.cols["meta"][n] = record["meta"]
            continue
        _record_to_row(
            rows,
            record,
            source=source,
            line=row,
            default_id=f"{id_prefix}:{row}",
            text_field=text_field,
            id_field=id_field,
            raw=None,
        )
    return rows.table()


def iter_jsonl_blocks(
    f,
    *,
    source: str,
    id_prefix: str,
    text_field: str,
    id_field: str | None,
    rows_per_block: int = ROWS_PER_BLOCK,
) -> Iterator[pa.Table]:
    """Stream a (possibly huge) JSONL file in bounded memory: one table per `rows_per_block` lines."""
    pending: list[bytes] = []
    first_line = 1
    tail = b""
    while True:
        chunk = f.read(_READ_CHUNK_BYTES)
        if not chunk:
            break
        parts = (tail + chunk).split(b"\n")
        tail = parts.pop()
        pending.extend(parts)
        while len(pending) >= rows_per_block:
            batch, pending = pending[:rows_per_block], pending[rows_per_block:]
            yield parse_jsonl_lines(
                batch,
                source=source,
                id_prefix=id_prefix,
                first_line=first_line,
                text_field=text_field,
                id_field=id_field,
            )
            first_line += len(batch)
    if tail:
        pending.append(tail)
    if pending:
        yield parse_jsonl_lines(
            pending,
            source=source,
            id_prefix=id_prefix,
            first_line=first_line,
            text_field=text_field,
            id_field=id_field,
        )


def _detect_format(path: str) -> str:
    if path.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    if path.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    raise ValueError(f"cannot tell the format of {path!r} from its extension; set input.format")


def _make_datasource_class():
    # Imported lazily so that the pure functions above load without Ray.
    from ray.data.datasource import FileBasedDatasource

    class DocumentDatasource(FileBasedDatasource):
        """Ray Data source: JSONL or Parquet files -> DOCUMENT_SCHEMA blocks, bad records included."""

        def __init__(
            self,
            paths: list[str],
            *,
            filesystem: pafs.FileSystem,
            root: str,
            fmt: str,
            text_field: str,
            id_field: str | None,
        ):
            super().__init__(paths, filesystem=filesystem)
            self._root = root
            self._fmt = fmt
            self._text_field = text_field
            self._id_field = id_field

        def _format_of(self, path: str) -> str:
            return _detect_format(path) if self._fmt == "auto" else self._fmt

        def _open_input_source(self, filesystem, path: str, **open_args):
            if self._format_of(path) == "parquet":
                return filesystem.open_input_file(path)  # Parquet needs random access
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            rel = posixpath.relpath(path, self._root) if self._root else posixpath.basename(path)
            kwargs = dict(
                source=path, id_prefix=rel, text_field=self._text_field, id_field=self._id_field
            )
            if self._format_of(path) == "jsonl":
                yield from iter_jsonl_blocks(f, **kwargs)
                return
            first_row = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BLOCK):
                table = pa.Table.from_batches([batch])
                yield documents_from_arrow(table, first_row=first_row, **kwargs)
                first_row += table.num_rows

    return DocumentDatasource


def input_root(files: list[str]) -> str:
    """The folder that positional ids (`<relative file>:<line>`) are relative to."""
    if len(files) == 1:
        return posixpath.dirname(files[0])
    return posixpath.commonpath(files)


def list_input_files(cfg: InputConfig) -> tuple[pafs.FileSystem, list[str]]:
    """Resolve `input.path` now, so a missing path fails before any Ray work, naming the path."""
    extensions = {"jsonl": JSONL_EXTENSIONS, "parquet": PARQUET_EXTENSIONS}.get(
        cfg.format, JSONL_EXTENSIONS + PARQUET_EXTENSIONS
    )
    return expand_input_paths(cfg.path, extensions)


def read_documents(
    cfg: InputConfig,
    files: tuple[pafs.FileSystem, list[str]] | None = None,
    *,
    whole_record: bool = False,
    task_per_file: bool = False,
):
    """A Ray Dataset of DOCUMENT_SCHEMA rows (good and rejected) from `input.path`.

    With `whole_record`, `text` is the whole record (all fields but the id) as a JSON object: for
    records whose payload is structured, such as chat conversations. Malformed JSON, invalid UTF-8
    and non-object records are still rejects with their reason.

    `task_per_file`: one read task per file, whose blocks (ROWS_PER_BLOCK rows at most) the next
    map fuses with, instead of Ray Data splitting each file's output to reach its minimum of 200
    blocks. For a job whose per-record work is cheap next to a task's overhead: the MinHash job's
    ingest ran 3 map tasks of 400 rows per 1,200-row file without it."""
    import ray.data

    fs, paths = files or list_input_files(cfg)
    source_cls = _make_datasource_class()
    ds = ray.data.read_datasource(
        source_cls(
            paths,
            filesystem=fs,
            root=input_root(paths),
            fmt=cfg.format,
            text_field=None if whole_record else cfg.text_field,
            id_field=cfg.id_field,
        ),
        **({"override_num_blocks": max(len(paths), 1)} if task_per_file else {}),
    )
    if cfg.max_records is not None:
        ds = ds.limit(cfg.max_records)
    return ds
