"""Token-aware chunking: windows of the embedding model's own tokens, mapped back to characters.

    from workloads.embed.chunking import ChunkConfig, chunk_batch, load_tokenizer
    rows = chunk_batch(documents, tokenizer=load_tokenizer(model), cfg=ChunkConfig())

A chunk is `size_tokens` consecutive tokens of the model's tokenizer (without special tokens), and
the next chunk starts `size_tokens - overlap_tokens` tokens later. Its text is the document's text
from the first token's start offset to the last token's end offset, so `text == doc[start:end]`
holds exactly and a chunk never exceeds what the model sees: nothing is silently truncated by the
encoder. This is LangChain's `TokenTextSplitter` and LlamaIndex's `TokenTextSplitter` idea, with
character offsets kept so that search results can cite the span they came from.

`chunk_batch` turns canonical document rows (workloads.common.documents.DOCUMENT_SCHEMA) into
CHUNK_SCHEMA rows: one row per chunk, plus one status row (chunk_index = -1) for each document that
was rejected by the reader or that yields no chunk, so every document read is accounted for.
"""

from __future__ import annotations

import json

import pyarrow as pa
from pydantic import Field, model_validator

from workloads.common.config import StrictModel
from workloads.embed.schema import EMBEDDING_COLUMNS, chunk_id

NO_TOKENS = "no_tokens"  # drop reason: the tokenizer finds nothing to embed in the text

CHUNK_SCHEMA = pa.schema(
    [
        *EMBEDDING_COLUMNS,
        pa.field("source", pa.string()),
        pa.field("line", pa.int64()),
        pa.field("doc_truncated", pa.bool_()),  # set on a document's first row only
        pa.field("empty_chunks", pa.int32()),  # whitespace-only windows skipped; first row only
        pa.field("drop_reason", pa.string()),
        pa.field("reject_reason", pa.string()),
        pa.field("raw", pa.string()),
    ]
)


class ChunkConfig(StrictModel):
    size_tokens: int = Field(
        default=200,
        ge=8,
        description="Tokens per chunk, counted with the model's tokenizer without special tokens. "
        "Must leave room for the special tokens within the model's max_seq_length (checked "
        "against the model before any work starts).",
    )
    overlap_tokens: int = Field(
        default=32,
        ge=0,
        description="Tokens each chunk shares with the previous one, so a sentence cut at a "
        "boundary is whole in one of the two.",
    )
    title_field: str | None = Field(
        default=None,
        description="A field of the input records (kept in `meta` by the reader) holding the "
        "document's title. It is embedded before every chunk of the document (and indexed by the "
        "RAG app's BM25) but is not part of the chunk's text or offsets. null: no title.",
    )
    max_title_tokens: int = Field(
        default=32,
        ge=1,
        le=128,
        description="Longer titles are cut to this many tokens; size_tokens + this must fit in "
        "the model's max_seq_length (checked before any work starts).",
    )
    max_doc_chars: int = Field(
        default=1_000_000,
        ge=100,
        description="Longer documents are truncated to this many characters before chunking, "
        "and counted as `truncated_documents`: one huge record must not stall a batch.",
    )

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkConfig:
        if self.overlap_tokens >= self.size_tokens:
            raise ValueError(
                f"chunk.overlap_tokens ({self.overlap_tokens}) must be smaller than "
                f"chunk.size_tokens ({self.size_tokens})"
            )
        return self


def load_tokenizer(model_path: str):
    """The model's fast tokenizer (a `tokenizers.Tokenizer`), with truncation and padding off."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path).backend_tokenizer
    tok.no_truncation()
    tok.no_padding()
    return tok


def token_windows(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[first, last) token ranges of the chunks of an `n_tokens`-token text."""
    if n_tokens == 0:
        return []
    step = size - overlap
    windows = []
    first = 0
    while True:
        last = min(first + size, n_tokens)
        windows.append((first, last))
        if last == n_tokens:
            return windows
        first += step


class _Rows:
    def __init__(self) -> None:
        self.cols: dict[str, list] = {name: [] for name in CHUNK_SCHEMA.names}

    def add(self, **values) -> None:
        for name, column in self.cols.items():
            column.append(values.get(name))

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.cols, schema=CHUNK_SCHEMA)


def document_title(meta: str | None, cfg: ChunkConfig, tokenizer) -> str | None:
    """The title field of a document's `meta` JSON, cut to max_title_tokens; None when it has no
    string title (or no title_field is configured)."""
    if cfg.title_field is None or not meta:
        return None
    try:
        title = json.loads(meta).get(cfg.title_field)
    except (json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(title, str) or not title.strip():
        return None
    title = " ".join(title.split())
    offsets = tokenizer.encode(title, add_special_tokens=False).offsets
    if len(offsets) > cfg.max_title_tokens:
        title = title[: offsets[cfg.max_title_tokens - 1][1]]
    return title


def chunk_batch(batch: pa.Table, *, tokenizer, cfg: ChunkConfig) -> pa.Table:
    """Canonical document rows -> CHUNK_SCHEMA rows. Pure given the tokenizer: no Ray."""
    rows = _Rows()
    docs = batch.select(
        ["id", "text", "meta", "source", "line", "reject_reason", "raw"]
    ).to_pylist()
    good = [d for d in docs if d["reject_reason"] is None]
    texts = [d["text"][: cfg.max_doc_chars] for d in good]
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
    for d in docs:
        if d["reject_reason"] is not None:
            rows.add(
                doc_id=d["id"],
                chunk_index=-1,
                source=d["source"],
                line=d["line"],
                reject_reason=d["reject_reason"],
                raw=d["raw"],
            )
    for d, text, enc in zip(good, texts, encodings, strict=True):
        truncated = len(d["text"]) > cfg.max_doc_chars
        offsets = enc.offsets
        spans = []
        empty = 0
        for first, last in token_windows(len(offsets), cfg.size_tokens, cfg.overlap_tokens):
            start, end = offsets[first][0], offsets[last - 1][1]
            if not text[start:end].strip():
                empty += 1  # e.g. only zero-width characters: nothing for the model to read
                continue
            spans.append((start, end, last - first))
        common = {"doc_id": d["id"], "source": d["source"], "line": d["line"]}
        title = document_title(d["meta"], cfg, tokenizer)
        if not spans:
            rows.add(
                **common,
                chunk_index=-1,
                doc_truncated=truncated,
                empty_chunks=empty,
                drop_reason=NO_TOKENS,
            )
            continue
        for k, (start, end, n) in enumerate(spans):
            first_row = k == 0
            rows.add(
                **common,
                chunk_id=chunk_id(d["id"], k),
                chunk_index=k,
                text=text[start:end],
                start=start,
                end=end,
                n_tokens=n,
                title=title,
                doc_truncated=truncated if first_row else None,
                empty_chunks=empty if first_row else None,
            )
    return rows.table()
