"""The RAG app's index on disk: the build job's index plus append-only segments, loaded as snapshots.

    store = IndexStore("outputs/index")
    snapshot = store.load()                      # base + every finished segment, one FAISS index
    report = store.append(snapshot, [IngestDocument(id="faq-1", text="...")])
    snapshot = store.refresh(snapshot) or snapshot   # None when nothing changed on disk

    python -m workloads.serve.rag.ingest --index outputs/index new_docs.jsonl

New documents never rewrite the index the build job wrote. Each ingest is chunked with the
embedding model's tokenizer (the embed job's chunker), embedded with the model index.json names,
and written as a new folder under `<index>/segments/`: an exact (flat) FAISS index of the same
metric, its ids.parquet and its index.json, the last written, so a segment without index.json is
unfinished and ignored (this holds on object stores too, where nothing renames atomically).
Lucene adds documents the same way.

Serving replicas poll `version()` (one listing and one stat) and load a new snapshot beside the one
in use: the current FAISS index is cloned and the new segments' vectors added to the clone (every
FAISS index type here adds after training), and the snapshot reference is swapped. In-flight
searches finish on the old snapshot and nothing searches an index while it is being added to (FAISS
does not allow that). A rebuilt base (index.json changed) is loaded whole. The price is a second
copy of the index in memory while a reload runs; rebuild the base with the build job (and delete
`segments/`) when the segments grow large, as their vectors are searched through the base's
structure but were never part of its training.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pydantic import Field

from workloads.common.config import StrictModel
from workloads.common.documents import DOCUMENT_SCHEMA
from workloads.common.storage import resolve_filesystem
from workloads.embed.chunking import ChunkConfig, chunk_batch, load_tokenizer
from workloads.embed.index import (
    IDS_SCHEMA,
    INFO_FILE,
    IndexInfo,
    VectorIndex,
    _faiss_metric,
    set_search_params,
)
from workloads.embed.models import resolve_model_path
from workloads.embed.schema import EmbeddingInfo, embedding_text

SEGMENTS = "segments"
MAX_DOC_ID = 256
DOC_ID = re.compile(r"^[^\s#][^#]*$")  # chunk ids are f"{doc_id}#{index}"

# Reject reasons of ingested documents (each reject carries one, with the document's id).
EMPTY_TEXT = "empty_text"
BAD_DOC_ID = "bad_doc_id"
DUPLICATE_DOC_ID = "duplicate_doc_id"
NO_TOKENS = "no_tokens"


class EmptyIndexError(LookupError):
    """The index holds no documents yet; ingest some first."""


class IngestDocument(StrictModel):
    id: str = Field(description="Unique document id; chunk ids are <id>#<n>.")
    text: str = Field(description="The document's text.")
    title: str | None = Field(
        default=None, description="Embedded (and BM25-indexed) before each chunk; not cited text."
    )


@dataclass
class IngestReport:
    """What one ingest read, kept and rejected; read == kept + len(rejected)."""

    read: int = 0
    kept: int = 0
    chunks: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    segment: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "kept": self.kept,
            "rejected": len(self.rejected),
            "chunks": self.chunks,
            "rejects": self.rejected,
            "segment": self.segment,
        }


@dataclass(frozen=True)
class Snapshot:
    """One consistent view of the index: what `version` it was loaded from, and the index."""

    version: tuple
    index: VectorIndex
    segments: tuple[str, ...]

    @property
    def doc_ids(self) -> set[str]:
        return set(self.index.ids.column("doc_id").to_pylist())


class IndexStore:
    """An index folder (local path or URI) and its segments."""

    def __init__(self, path: str, *, chunk: ChunkConfig | None = None, device: str = "cpu"):
        self.path = str(path)
        self.fs, self.root = resolve_filesystem(self.path)
        self.chunk = chunk or ChunkConfig()
        self.device = device
        self._tokenizer = None

    # -- reading -----------------------------------------------------------------------------

    def _info_file(self) -> pafs.FileInfo:
        info = self.fs.get_file_info(posixpath.join(self.root, INFO_FILE))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(
                f"{self.path} is not an index folder (no {INFO_FILE}): build one with "
                "ray_jobs/build_index.py, or create an empty one with "
                "`python -m workloads.serve.rag.ingest --create --index ...`"
            )
        return info

    def segment_names(self) -> list[str]:
        """Finished segments (their index.json written), oldest first."""
        root = posixpath.join(self.root, SEGMENTS)
        listing = self.fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        names = sorted(
            posixpath.basename(i.path) for i in listing if i.type == pafs.FileType.Directory
        )
        done = self.fs.get_file_info([posixpath.join(root, n, INFO_FILE) for n in names])
        return [n for n, i in zip(names, done, strict=True) if i.type == pafs.FileType.File]

    def version(self) -> tuple:
        info = self._info_file()
        return (info.mtime_ns, info.size, tuple(self.segment_names()))

    def load(self) -> Snapshot:
        version = self.version()
        base = VectorIndex.load(self.path)
        return self._with_segments(version, base, (), version[2])

    def refresh(self, current: Snapshot) -> Snapshot | None:
        """A new snapshot when the folder changed since `current`, else None."""
        version = self.version()
        if version == current.version:
            return None
        if (
            version[:2] != current.version[:2]
            or version[2][: len(current.segments)] != current.segments
        ):
            return self.load()  # the base was rebuilt (or segments were removed): start over
        import faiss

        index = faiss.clone_index(current.index.index)
        base = VectorIndex(index, current.index.info, current.index.ids, source=self.path)
        base._encoders = current.index._encoders  # the query model stays loaded across reloads
        return self._with_segments(
            version, base, current.segments, version[2][len(current.segments) :]
        )

    def _with_segments(
        self, version: tuple, base: VectorIndex, have: tuple[str, ...], new: Sequence[str]
    ) -> Snapshot:
        index, ids = base.index, [base.ids]
        for name in new:
            segment = VectorIndex.load(self._segment_uri(name))
            base.check_query_model(segment.model, segment.dimension)
            if len(segment):
                index.add(segment.index.reconstruct_n(0, len(segment)))
            ids.append(segment.ids)
        set_search_params(index, base.info.search_params)
        table = pa.concat_tables(ids) if len(ids) > 1 else ids[0]
        info = base.info.model_copy(update={"vectors": index.ntotal})
        merged = VectorIndex(index, info, table, source=self.path)
        merged._encoders = base._encoders  # keep the loaded query model across reloads
        return Snapshot(version=version, index=merged, segments=(*have, *new))

    def _segment_uri(self, name: str) -> str:
        return self.path.rstrip("/") + f"/{SEGMENTS}/{name}"

    # -- writing -----------------------------------------------------------------------------

    def tokenizer(self, model: str):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(resolve_model_path(model))
        return self._tokenizer

    def append(
        self,
        snapshot: Snapshot,
        documents: Iterable[IngestDocument],
        malformed: Sequence[dict[str, str]] = (),
    ) -> IngestReport:
        """Chunk, embed and write `documents` as one new segment; every document is kept or
        rejected with a reason. Ids already in `snapshot` or repeated in the batch are rejected
        (re-ingesting a changed document means rebuilding: segments only add). `malformed` are
        the rejects of records that did not parse as documents: read and rejected too, so the
        report reconciles over everything the caller read."""
        report = IngestReport(read=len(malformed), rejected=list(malformed))
        seen = snapshot.doc_ids
        good: list[IngestDocument] = []
        for doc in documents:
            report.read += 1
            reason = _reject_reason(doc, seen)
            if reason:
                report.rejected.append({"id": doc.id, "reason": reason})
                continue
            seen.add(doc.id)
            good.append(doc)
        if not good:
            return report
        chunk = self.chunk
        if chunk.title_field is None:  # ingested titles are always used, as `title`
            chunk = chunk.model_copy(update={"title_field": "title"})
        chunks = chunk_batch(
            _document_table(good, chunk.title_field),
            tokenizer=self.tokenizer(snapshot.index.model),
            cfg=chunk,
        )
        empty = [r for r in chunks.to_pylist() if r["chunk_index"] == -1]
        for row in empty:
            report.rejected.append({"id": row["doc_id"], "reason": row["drop_reason"] or NO_TOKENS})
        chunks = chunks.filter(pc.greater_equal(chunks["chunk_index"], 0))
        report.kept = report.read - len(report.rejected)
        report.chunks = len(chunks)
        if not len(chunks):
            return report
        texts = [
            embedding_text(title, text)
            for title, text in zip(
                chunks.column("title").to_pylist(), chunks.column("text").to_pylist(), strict=True
            )
        ]
        encoder = snapshot.index.encoder(device=self.device)
        # As the embed job's Embedder encodes (`encode`, no prompt), so that segment vectors and
        # the base index's are one vector space.
        vectors = np.asarray(
            encoder.encode(
                texts,
                normalize_embeddings=snapshot.index.info.embedding.normalized,
                show_progress_bar=False,
            ),
            dtype=np.float32,
        )
        report.segment = self._write_segment(snapshot.index.info, vectors, chunks)
        return report

    def _write_segment(self, base: IndexInfo, vectors: np.ndarray, chunks: pa.Table) -> str:
        import faiss

        index = faiss.IndexFlat(base.dimension, _faiss_metric(base.metric))
        index.add(vectors)
        info = IndexInfo(
            embedding=base.embedding,
            index_type="flat",
            factory="Flat",
            metric=base.metric,
            vectors=len(vectors),
            faiss_version=faiss.__version__,
        )
        ids = chunks.select(IDS_SCHEMA.names).cast(IDS_SCHEMA)
        # Sorted by time, unique across replicas ingesting at once.
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        VectorIndex(index, info, ids).save(self._segment_uri(name))  # index.json written last
        return name

    @staticmethod
    def create_empty(path: str, model: str, *, metric: str = "inner_product") -> None:
        """An index folder with no vectors, for a knowledge base that starts from ingests."""
        import faiss

        from workloads.embed.models import load_sentence_transformer

        fs, root = resolve_filesystem(str(path))
        if fs.get_file_info(posixpath.join(root, INFO_FILE)).type == pafs.FileType.File:
            raise FileExistsError(f"{path} already holds an index")
        encoder = load_sentence_transformer(model, device="cpu")
        embedding = EmbeddingInfo(
            model=model,
            dimension=encoder.get_embedding_dimension(),
            normalized=metric == "inner_product",
            precision="fp32",
            max_seq_length=encoder.max_seq_length,
        )
        info = IndexInfo(
            embedding=embedding,
            index_type="flat",
            factory="Flat",
            metric=metric,
            vectors=0,
            faiss_version=faiss.__version__,
        )
        empty = faiss.IndexFlat(embedding.dimension, _faiss_metric(metric))
        VectorIndex(empty, info, IDS_SCHEMA.empty_table()).save(str(path))


def _reject_reason(doc: IngestDocument, seen: set[str]) -> str | None:
    if not doc.id or len(doc.id) > MAX_DOC_ID or not DOC_ID.match(doc.id):
        return BAD_DOC_ID
    if not doc.text.strip():
        return EMPTY_TEXT
    if doc.id in seen:
        return DUPLICATE_DOC_ID
    return None


def _document_table(docs: list[IngestDocument], title_field: str) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "id": [d.id for d in docs],
            "text": [d.text for d in docs],
            "meta": [json.dumps({title_field: d.title}) if d.title else None for d in docs],
            "source": ["ingest"] * len(docs),
            "line": list(range(len(docs))),
            "reject_reason": [None] * len(docs),
            "raw": [None] * len(docs),
        },
        schema=DOCUMENT_SCHEMA,
    )


def read_jsonl_documents(lines: Iterable[str]) -> tuple[list[IngestDocument], list[dict[str, str]]]:
    """JSONL lines ({"id", "text"}) -> documents and rejects ({"line", "reason"}) for lines that
    are not a JSON object with a string id and text."""
    docs, rejects = [], []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            title = record.get("title")
            docs.append(
                IngestDocument(
                    id=str(record["id"]),
                    text=record["text"],
                    title=title if isinstance(title, str) else None,
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            rejects.append({"line": str(n), "reason": f"malformed_record: {type(exc).__name__}"})
    return docs, rejects
