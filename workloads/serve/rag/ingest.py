"""Append documents to a RAG index without rebuilding it: the job form of POST /rag/ingest.

    python -m workloads.serve.rag.ingest --index outputs/index new_docs.jsonl
    python -m workloads.serve.rag.ingest --index /data/kb --create \
        --model sentence-transformers/all-MiniLM-L6-v2 first_docs.jsonl

Each input line is {"id": ..., "text": ...}. The documents are chunked (the embed job's chunker and
default sizes unless --chunk-size/--chunk-overlap say otherwise), embedded with the model the
index names, and written as one new segment (`store.py`); serving Retriever replicas pick it up
within their reload interval. It prints what it read, kept and rejected (read = kept + rejected),
with a reason for each reject: malformed lines, empty texts, bad or duplicate ids.
For a corpus-sized load, run the embed and build_index jobs instead (Ray Data, many workers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workloads.embed.chunking import ChunkConfig
from workloads.serve.rag.store import IndexStore, read_jsonl_documents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="index folder (local path or URI)")
    parser.add_argument("--create", action="store_true", help="create an empty index first")
    parser.add_argument(
        "--model",
        default="sentence-transformers/all-MiniLM-L6-v2",
        help="embedding model of a new index (with --create)",
    )
    parser.add_argument("--chunk-size", type=int, default=ChunkConfig().size_tokens)
    parser.add_argument("--chunk-overlap", type=int, default=ChunkConfig().overlap_tokens)
    parser.add_argument("inputs", nargs="+", type=Path, help="JSONL files of {id, text}")
    args = parser.parse_args(argv)

    chunk = ChunkConfig(size_tokens=args.chunk_size, overlap_tokens=args.chunk_overlap)
    missing = [str(p) for p in args.inputs if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    if args.create:
        IndexStore.create_empty(args.index, args.model)
    store = IndexStore(args.index, chunk=chunk)
    docs, rejects = [], []
    for path in args.inputs:
        with open(path, encoding="utf-8", errors="replace") as f:
            got, bad = read_jsonl_documents(f)
        docs += got
        rejects += [{**r, "file": str(path)} for r in bad]
    report = store.append(store.load(), docs, rejects).as_dict()
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
