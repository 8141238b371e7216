"""Search a vector index from the command line: the top-k chunks for each query.

    python -m workloads.embed.search --index outputs/index --k 5 "how do I open a file"
    python -m workloads.embed.search --index s3://bucket/index --json "query one" "query two"

Queries are embedded with the model the index was built from (index.json). `--model` names
another; one that is not the index's model, or that gives vectors of another dimension, is refused
with exit code 2 rather than searched in the wrong vector space.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from workloads.embed.index import Hit, IndexMismatchError, VectorIndex

EXIT_USAGE = 2


def shorten(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3].rstrip() + "..."


def format_hits(query: str, hits: list[Hit], width: int) -> str:
    lines = [f"query: {query}"]
    if not hits:
        return "\n".join([*lines, "  (no results)"])
    id_width = max(len(h.chunk_id) for h in hits)
    doc_width = max(len(h.doc_id) for h in hits)
    for h in hits:
        lines.append(
            f"{h.rank:>4}  {h.score:>8.4f}  {h.doc_id:<{doc_width}}  {h.chunk_id:<{id_width}}  "
            f"{shorten(h.text, width)}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("queries", nargs="+", metavar="QUERY", help="query text")
    parser.add_argument("--index", required=True, help="index folder or URI (build job output)")
    parser.add_argument("--k", type=int, default=5, help="results per query (default 5)")
    parser.add_argument("--model", help="query model (default: the index's model)")
    parser.add_argument("--device", default="cpu", help="device for the query model")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--width", type=int, default=100, help="characters of text per result")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("--k must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    try:
        index = VectorIndex.load(args.index)
        results = index.search_texts(args.queries, args.k, model=args.model, device=args.device)
    except (IndexMismatchError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        payload = [
            {"query": q, "hits": [h.to_dict() for h in hits]}
            for q, hits in zip(args.queries, results, strict=True)
        ]
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    info = index.info
    print(
        f"index {args.index}: {info.index_type} ({info.factory}), {info.vectors:,} vectors of "
        f"{info.model} ({info.dimension}-d), score = "
        f"{'inner product' if info.metric == 'inner_product' else 'squared L2 distance'}"
    )
    for query, hits in zip(args.queries, results, strict=True):
        print()
        print(format_hits(query, hits, args.width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
