"""The embeddings table every embedding consumer reads: the contract between `ray_jobs/embed.py`
and the index, clustering, classification and RAG code.

    <embed output>/embeddings/*.parquet     one row per chunk, EMBEDDING_COLUMNS + `embedding`
    <embed output>/embedding.json           EmbeddingInfo: model, dimension, normalisation, precision

`embedding` is a fixed-size list of float32 of length `dimension`, so Parquet keeps it as one
contiguous column and `embedding_matrix` reads it back as an (n, dim) array without copying rows.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

EMBEDDING_INFO_FILE = "embedding.json"

# Columns before the vector, in order. `start`/`end` are character offsets of the chunk in the
# document's text (end exclusive), so `text == document[start:end]`.
EMBEDDING_COLUMNS = [
    pa.field("doc_id", pa.string()),
    pa.field("chunk_id", pa.string()),  # f"{doc_id}#{chunk_index}"
    pa.field("chunk_index", pa.int32()),
    pa.field("text", pa.string()),
    pa.field("start", pa.int64()),
    pa.field("end", pa.int64()),
    pa.field("n_tokens", pa.int32()),
    # The document's title (chunk.title_field), embedded before the chunk's text but not part of
    # it: a chunk cut from the middle of a page still says what the page is about.
    pa.field("title", pa.string()),
]


def embedding_text(title: str | None, text: str) -> str:
    """What the encoder reads for a chunk: its document's title, a blank line, the chunk
    (Haystack's `meta_fields_to_embed`, LlamaIndex's metadata in the embedded text)."""
    return f"{title}\n\n{text}" if title else text


def embedding_schema(dimension: int) -> pa.Schema:
    return pa.schema([*EMBEDDING_COLUMNS, pa.field("embedding", pa.list_(pa.float32(), dimension))])


def chunk_id(doc_id: str, index: int) -> str:
    return f"{doc_id}#{index}"


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, dim) float array -> fixed-size-list column."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def embedding_matrix(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """The `embedding` column of `table` as a contiguous (n, dim) float32 array."""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    if len(col) == 0:
        return np.zeros((0, dim), np.float32)
    flat = col.flatten().to_numpy(zero_copy_only=False)  # flatten() honours the array's offset
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(len(col), dim)


def embeddings_table(
    *,
    doc_ids: list[str],
    texts: list[str],
    starts: list[int],
    ends: list[int],
    vectors: np.ndarray,
    chunk_indexes: list[int] | None = None,
    n_tokens: list[int] | None = None,
    titles: list[str | None] | None = None,
) -> pa.Table:
    """Build an embeddings table (for tests and small tools; the job builds its own batches)."""
    n = len(doc_ids)
    chunk_indexes = chunk_indexes if chunk_indexes is not None else [0] * n
    n_tokens = n_tokens if n_tokens is not None else [0] * n
    return pa.Table.from_arrays(
        [
            pa.array(doc_ids, pa.string()),
            pa.array(
                [chunk_id(d, i) for d, i in zip(doc_ids, chunk_indexes, strict=True)], pa.string()
            ),
            pa.array(chunk_indexes, pa.int32()),
            pa.array(texts, pa.string()),
            pa.array(starts, pa.int64()),
            pa.array(ends, pa.int64()),
            pa.array(n_tokens, pa.int32()),
            pa.array(titles if titles is not None else [None] * n, pa.string()),
            vectors_to_arrow(vectors),
        ],
        schema=embedding_schema(vectors.shape[1]),
    )


class EmbeddingInfo(BaseModel):
    """What produced a set of embeddings. An index stores it, and a query-time loader compares it
    with the model it is asked to query with."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="The model name as configured (hub id or folder).")
    dimension: int = Field(ge=1)
    normalized: bool = Field(description="Vectors are L2-normalised (inner product == cosine).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        description="Compute precision the vectors were produced with."
    )
    max_seq_length: int | None = None

    @classmethod
    def read(cls, fs, path: str) -> EmbeddingInfo:
        with fs.open_input_stream(path) as f:
            return cls.model_validate(json.loads(f.read().decode()))

    def write(self, fs, path: str) -> None:
        with fs.open_output_stream(path) as f:
            f.write(self.model_dump_json(indent=2).encode())
