"""Vector index benchmark: recall@10 against exact search, build time, memory and query latency of
the FAISS indexes that `ray_jobs/build_index.py` builds, at their default settings, on real
all-MiniLM-L6-v2 embeddings. Writes bench/index_results.json and the `index` section of RESULTS.md.

    .venv/bin/python bench/index_bench.py                    # 20,000 vectors + 500 queries
    .venv/bin/python bench/index_bench.py --vectors 5000     # smaller, faster first run
    .venv/bin/python bench/index_bench.py --encode-only      # only fill the embeddings cache

Data: the docstrings of the standard library and every installed package
(`workloads.data.sample.base_documents(True)`), cut into pieces of 256 words, shuffled; the last
`--queries` pieces are held out as queries, never added to an index. Encoding is the slow part on a
CPU (about 20 pieces a second on 2 idle cores at the model's 256-token limit), so the vectors are
cached in `--work` as an embed-output folder (`embeddings/*.parquet` + `embedding.json`, the input
format of `ray_jobs/build_index.py`), written in parts so an interrupted run resumes; reruns take
a minute or two.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import random
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
from results_md import write_section  # bench/, beside this script

from workloads.common.storage import resolve_filesystem
from workloads.embed.schema import (
    EMBEDDING_INFO_FILE,
    EmbeddingInfo,
    embedding_matrix,
    embeddings_table,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PIECE_WORDS = 256
MIN_PIECE_WORDS = 32  # a document's short tail is not a piece of its own
PART_ROWS = 1024
K = 10


# ---------------------------------------------------------------------------------------------
# Data: real text, real embeddings, cached


def corpus_pieces(work: Path, seed: int) -> list[tuple[str, str]]:
    """(piece id, text) of every piece of about PIECE_WORDS words, shuffled with `seed`; cached in
    `work/pieces.jsonl` (reading every installed package's docstrings takes minutes)."""
    cache = work / "pieces.jsonl"
    if cache.exists():
        return [tuple(json.loads(line)) for line in cache.read_text().splitlines()]
    from workloads.data.sample import base_documents

    pieces: list[tuple[str, str]] = []
    for n, doc in enumerate(base_documents(True)):
        words = doc.text.split()
        for i, start in enumerate(range(0, len(words), PIECE_WORDS)):
            chunk = words[start : start + PIECE_WORDS]
            if len(chunk) >= MIN_PIECE_WORDS:  # one source gives several documents: number them
                pieces.append((f"{doc.source}/{n}#{i}", " ".join(chunk)))
    random.Random(seed).shuffle(pieces)
    cache.write_text("\n".join(json.dumps(p) for p in pieces))
    return pieces


def encoded_pieces(work: Path, n: int, seed: int) -> tuple[np.ndarray, dict]:
    """(vectors, encoding stats: pieces and seconds over every run) of the first `n` pieces.
    Parts of PART_ROWS pieces are encoded once and kept, so a larger `n` reuses the smaller runs."""
    key = {"model": MODEL, "piece_words": PIECE_WORDS, "seed": seed}
    key["python"] = platform.python_version()  # base_documents reads this Python's stdlib
    key_file, parts = work / "bench_key.json", work / "embeddings"
    stats_file = work / "encode_stats.json"
    if key_file.exists() and json.loads(key_file.read_text()) != key:
        for stale in [*parts.glob("*.parquet"), work / "pieces.jsonl", work / "encode_stats.json"]:
            stale.unlink(missing_ok=True)
    parts.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(key))
    pieces = corpus_pieces(work, seed)
    if len(pieces) < n:
        print(f"the corpus holds {len(pieces):,} pieces; using all of them, not {n:,}")
        n = len(pieces)
    n_parts = -(-n // PART_ROWS)
    missing = [p for p in range(n_parts) if not (parts / f"part-{p:05d}.parquet").exists()]
    encode_seconds = 0.0
    if missing:
        import torch

        from workloads.embed.models import load_sentence_transformer

        torch.set_num_threads(os.cpu_count() or 1)
        model = load_sentence_transformer(MODEL, device="cpu")
        fs, _ = resolve_filesystem(str(work))
        EmbeddingInfo(
            model=MODEL,
            dimension=model.get_embedding_dimension(),
            normalized=True,
            precision="fp32",
            max_seq_length=model.max_seq_length,
        ).write(fs, str(work / EMBEDDING_INFO_FILE))
        for p in missing:
            rows = pieces[p * PART_ROWS : (p + 1) * PART_ROWS]
            start = time.perf_counter()
            vectors = model.encode([t for _, t in rows], batch_size=32, normalize_embeddings=True)
            encode_seconds += time.perf_counter() - start
            table = embeddings_table(
                doc_ids=[i.rsplit("#", 1)[0] for i, _ in rows],
                chunk_indexes=[int(i.rsplit("#", 1)[1]) for i, _ in rows],
                texts=[t for _, t in rows],
                starts=[0] * len(rows),
                ends=[len(t) for _, t in rows],
                vectors=vectors,
            )
            pq.write_table(table, parts / f"part-{p:05d}.parquet")
            stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
            stats = {
                "pieces": stats.get("pieces", 0) + len(rows),
                "seconds": stats.get("seconds", 0.0) + time.perf_counter() - start,
            }
            stats_file.write_text(json.dumps(stats))
            print(f"encoded part {p + 1}/{n_parts} ({encode_seconds:.0f} s so far)", flush=True)
    table = pq.read_table([str(parts / f"part-{p:05d}.parquet") for p in range(n_parts)])
    return embedding_matrix(table.slice(0, n)), json.loads(stats_file.read_text())


# ---------------------------------------------------------------------------------------------
# Measurements


class PeakRss:
    """RSS growth of this process while the block runs: the peak (sampled every 5 ms) and what
    is still held at the end, both against the RSS on entry."""

    def __enter__(self) -> PeakRss:
        # Hand memory freed by earlier builds back to the OS, or it hides this build's growth.
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.end = self.proc.memory_info().rss
        self.peak = max(self.peak, self.end)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = K) -> float:
    return float(
        np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth, strict=True)])
    )


def query_latency(index, queries: np.ndarray, k: int = K, singles: int = 200) -> dict:
    """One query at a time (as a RAG request searches), and all queries in one batch."""
    times = []
    for q in queries[:singles]:
        start = time.perf_counter()
        index.search(q[None, :], k)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    index.search(queries, k)
    batch = time.perf_counter() - start
    return {
        "p50_ms": 1000 * float(np.percentile(times, 50)),
        "p95_ms": 1000 * float(np.percentile(times, 95)),
        "batch_qps": len(queries) / batch,
    }


def measure(x: np.ndarray, queries: np.ndarray, truth: np.ndarray, spec, seed: int) -> dict:
    import faiss

    from workloads.embed.index import build_index

    with PeakRss() as mem:
        start = time.perf_counter()
        index, plan = build_index(x, spec, seed=seed)
        build_s = time.perf_counter() - start
    size = len(faiss.serialize_index(index))  # the bytes index.faiss would hold
    _, found = index.search(queries, K)
    return {
        "type": plan.type,
        "factory": plan.factory,
        "search_params": plan.search_params or {},
        "build_s": build_s,
        "index_bytes": size,
        "bytes_per_vector": size / len(x),
        "rss_peak_delta_mb": (mem.peak - mem.base) / 2**20,
        "rss_held_delta_mb": (mem.end - mem.base) / 2**20,
        f"recall@{K}": recall_at_k(found, truth),
        **query_latency(index, queries),
        "_index": index,
    }


def sweep(index, queries: np.ndarray, truth: np.ndarray, name: str, values: list) -> list[dict]:
    from workloads.embed.index import set_search_params

    rows = []
    for value in values:
        set_search_params(index, {name: value})
        _, found = index.search(queries, K)
        rows.append(
            {
                name: value,
                f"recall@{K}": recall_at_k(found, truth),
                **query_latency(index, queries, singles=100),
            }
        )
    return rows


GRID_NPROBE = [16, 32, 64, 128]
GRID_K_FACTOR = [2, 4, 8, 16]


def recall_grid(index, queries: np.ndarray, truth: np.ndarray) -> list[dict]:
    """recall@K of IVF-PQ for each (nprobe, refine k_factor) pair: the two losses (lists not
    scanned, true neighbours not among the PQ candidates) trade against each other."""
    from workloads.embed.index import IndexConfig, set_search_params

    rows = []
    for nprobe in GRID_NPROBE:
        for k_factor in GRID_K_FACTOR:
            set_search_params(index, {"nprobe": nprobe, "k_factor": k_factor})
            _, found = index.search(queries, K)
            rows.append(
                {"nprobe": nprobe, "k_factor": k_factor, f"recall@{K}": recall_at_k(found, truth)}
            )
    d = IndexConfig()
    set_search_params(index, {"nprobe": d.ivf.nprobe, "k_factor": d.refine.k_factor})
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(results: dict) -> str:
    d, m = results["data"], results["machine"]
    lines = [
        "<!-- index:start -->",
        "## Vector index (`bench/index_bench.py`)",
        "",
        f"Machine: {m['cpus']} cores, {m['memory_gib']:.0f} GiB, {m['arch']}, faiss {m['faiss']} on "
        "one thread "
        f"(load average {m['load_average']:.1f} during the run: other jobs shared the cores, so "
        f"times are upper bounds). Command: `{results['command']}`.",
        "",
        f"Data: {d['vectors']:,} real {d['model'].split('/')[-1]} embeddings ({d['dimension']}-d, "
        f"normalised) of {d['piece_words']}-word pieces of the standard library's and installed "
        f"packages' docstrings (`base_documents(True)`), and {d['queries']} held-out pieces as "
        f"queries. Ground truth: exact inner product (IndexFlatIP). Each index at the defaults of "
        f"`IndexConfig`, built by `build_index` (the code the job runs). Encoding is not timed "
        f"here: at about {d['encode_pieces_per_s']:.0f} pieces/s on these cores the "
        f"{d['vectors'] + d['queries']:,} pieces take {d['encode_minutes']:.0f} minutes, which is "
        f"why the bench uses {d['vectors']:,} vectors rather than the 20k-50k first aimed for; "
        f"they are cached in `--work` and `--vectors 20000` reuses them.",
        "",
        f"| index | factory | recall@{K} | build s | index MB | bytes/vector | RSS peak +MB | "
        "query p50 ms | p95 ms | batch QPS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["defaults"]:
        lines.append(
            _row(
                [
                    r["type"],
                    f"`{r['factory']}`",
                    f"**{r[f'recall@{K}']:.3f}**",
                    f"{r['build_s']:.1f}",
                    f"{r['index_bytes'] / 2**20:.1f}",
                    f"{r['bytes_per_vector']:.0f}",
                    f"{r['rss_peak_delta_mb']:.0f}",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p95_ms']:.2f}",
                    f"{r['batch_qps']:,.0f}",
                ]
            )
        )
    target = all(r[f"recall@{K}"] >= 0.95 for r in results["defaults"])
    lines += [
        "",
        "Index MB: the serialised index (index.faiss). RSS peak: growth of the process's resident "
        "memory during the build, against the RSS before it (IVF-PQ: the training sample, the "
        "refine codes and FAISS's temporaries). Query latency: one query per call; batch QPS: "
        f"all {d['queries']} queries in one call.",
        "",
        f"Target recall@{K} >= 0.95 at the default settings: "
        + ("**met** by every index." if target else "**not met**; see the sweeps."),
        "",
        "Query-time knobs (no rebuild; stored in index.json and set when the index loads):",
        "",
    ]
    for title, key, rows in (
        ("HNSW `ef_search`", "ef_search", results["sweeps"]["hnsw_ef_search"]),
        ("IVF-PQ `nprobe` (k_factor default)", "nprobe", results["sweeps"]["ivf_pq_nprobe"]),
    ):
        lines += [f"| {title} | recall@{K} | p50 ms | batch QPS |", "| --- | --- | --- | --- |"]
        lines += [
            _row(
                [r[key], f"{r[f'recall@{K}']:.3f}", f"{r['p50_ms']:.2f}", f"{r['batch_qps']:,.0f}"]
            )
            for r in rows
        ]
        lines.append("")
    grid = {
        (r["nprobe"], r["k_factor"]): r[f"recall@{K}"] for r in results["sweeps"]["ivf_pq_grid"]
    }
    lines += [
        f"IVF-PQ recall@{K} by `nprobe` (rows) and refine `k_factor` (columns). The defaults are "
        "the cheapest pair clearly above 0.95, with a margin for larger N, where the same nprobe "
        "scans a smaller share of the lists:",
        "",
        _row(["nprobe \\ k_factor", *GRID_K_FACTOR]),
        "| --- |" + " --- |" * len(GRID_K_FACTOR),
    ]
    lines += [_row([n, *(f"{grid[(n, kf)]:.3f}" for kf in GRID_K_FACTOR)]) for n in GRID_NPROBE]
    lines += [
        "",
        "IVF-PQ re-ranking (`index.refine.type`, a rebuild each):",
        "",
        f"| refine | factory | recall@{K} | bytes/vector | p50 ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        _row(
            [
                r["refine"],
                f"`{r['factory']}`",
                f"{r[f'recall@{K}']:.3f}",
                f"{r['bytes_per_vector']:.0f}",
                f"{r['p50_ms']:.2f}",
            ]
        )
        for r in results["sweeps"]["ivf_pq_refine"]
    ]
    lines += ["<!-- index:end -->"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/index-bench"))
    parser.add_argument("--vectors", type=int, default=10_000, help="vectors in each index")
    parser.add_argument("--queries", type=int, default=500, help="held-out query vectors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encode-only", action="store_true", help="fill the cache and stop")
    parser.add_argument("--no-write", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    import faiss

    from workloads.embed.index import IndexConfig

    all_vectors, encoding = encoded_pieces(args.work, args.vectors + args.queries, args.seed)
    rate = encoding["pieces"] / encoding["seconds"]
    print(f"{len(all_vectors):,} vectors (encoded at {rate:.1f} pieces/s)", flush=True)
    if args.encode_only:
        return
    # One FAISS thread: per-core numbers, and OpenMP's spinning threads slow down by 10-40x on
    # cores that other processes share (an IVF-PQ build here: 0.8 s on one thread, 31 s on two).
    faiss.omp_set_num_threads(1)
    x, queries = all_vectors[: -args.queries], all_vectors[-args.queries :]
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, truth = exact.search(queries, K)

    defaults = []
    for kind in ("flat", "hnsw", "ivf_pq"):
        row = measure(x, queries, truth, IndexConfig(type=kind), args.seed)
        print({k: v for k, v in row.items() if k != "_index"}, flush=True)
        defaults.append(row)
    by_type = {r["type"]: r.pop("_index") for r in defaults}
    hnsw_default = IndexConfig().hnsw.ef_search
    sweeps = {
        "hnsw_ef_search": sweep(
            by_type["hnsw"], queries, truth, "ef_search", [16, 32, hnsw_default, 128, 256]
        ),
        "ivf_pq_nprobe": sweep(
            by_type["ivf_pq"], queries, truth, "nprobe", [4, 8, 16, 32, 64, 128]
        ),
    }
    sweeps["ivf_pq_grid"] = recall_grid(by_type["ivf_pq"], queries, truth)
    sweeps["ivf_pq_refine"] = []
    for refine in ("none", "sq8", "flat"):
        if refine == IndexConfig().refine.type:
            row = dict(defaults[2])
        else:
            row = measure(
                x, queries, truth, IndexConfig(type="ivf_pq", refine={"type": refine}), args.seed
            )
            row.pop("_index")
        sweeps["ivf_pq_refine"].append({"refine": refine, **row})
    for rows in sweeps.values():
        for r in rows:
            print(r, flush=True)

    results = {
        "command": ".venv/bin/python bench/index_bench.py"
        + (f" --vectors {args.vectors}" if args.vectors != 10_000 else ""),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": psutil.virtual_memory().total / 2**30,
            "arch": platform.machine(),
            "faiss": faiss.__version__,
            "load_average": os.getloadavg()[0],
        },
        "data": {
            "model": MODEL,
            "dimension": int(x.shape[1]),
            "vectors": len(x),
            "queries": len(queries),
            "piece_words": PIECE_WORDS,
            "encode_pieces_per_s": rate,
            "encode_minutes": len(all_vectors) / rate / 60,
        },
        "defaults": defaults,
        "sweeps": sweeps,
    }
    if args.no_write:
        print(markdown(results))
        return
    (REPO / "bench" / "index_results.json").write_text(json.dumps(results, indent=1))
    write_section("index", markdown(results), RESULTS)
    print(markdown(results))


if __name__ == "__main__":
    main()
