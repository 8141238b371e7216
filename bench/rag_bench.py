"""RAG bench, retrieval quality: recall@1/5/10 and MRR@10 of `HybridRetriever` in its three modes
(dense FAISS, lexical BM25, hybrid reciprocal-rank fusion) on hand-written questions about the
sample corpus. Writes bench/rag_results.json.

    .venv/bin/python bench/rag_bench.py                   # 2-5 minutes on 2 cores, 30 s cached
    .venv/bin/python bench/rag_bench.py --sweep           # also hybrid candidates x rrf_k
    .venv/bin/python bench/rag_bench.py --no-write        # print only

Questions: bench/data/rag_questions.jsonl, one per line: {id, question, doc_id, evidence}. Each is
a developer's question that one passage of the sample corpus answers, written by reading it and
paraphrased (some share the passage's words, some hardly any); `evidence` is the verbatim span of
doc_id's text that answers it. A retrieved chunk is relevant when its text holds the evidence
(whitespace-normalised), whichever document it came from, so planted duplicates and docstrings the
standard library repeats count as hits rather than misses.

Index: built here over the whole sample corpus (data/sample, `make demo` or
`python -m workloads.data.sample build` writes it; built when missing), not outputs/index, so the
bench needs nothing but the sample: documents read by the jobs' reader, chunked and embedded with
the embed job's default config (ray_jobs/configs/embed/default.yaml: 200-token chunks, 32 overlap,
all-MiniLM-L6-v2, normalised, its precision), in an exact inner-product index (FAISS Flat) wrapped in
`VectorIndex`, so `HybridRetriever` runs unchanged. The vectors are cached in `--work`.

Latency (`latency_section`): the shipped serve_configs/rag-cpu.yaml (apps llm and rag) under `serve run`
over this index; p50/p99 of /rag/retrieve and of RAG chat (32 new tokens) at concurrency 8.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results_md import write_section  # noqa: E402
from workloads.common.config import load_config
from workloads.common.documents import parse_jsonl_lines
from workloads.embed.chunking import chunk_batch, load_tokenizer
from workloads.embed.embedding import EmbedConfig, Embedder, live_chunks, resolve_precision
from workloads.embed.index import IDS_SCHEMA, IndexConfig, IndexInfo, VectorIndex, build_index
from workloads.embed.models import resolve_model_path
from workloads.embed.schema import EmbeddingInfo, embedding_matrix
from workloads.serve.rag.retrieval import RRF_K, HybridRetriever

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = REPO / "ray_jobs" / "configs" / "embed" / "default.yaml"
QUESTIONS = HERE / "data" / "rag_questions.jsonl"
RESULTS = HERE / "rag_results.json"
MODES = ("dense", "lexical", "hybrid")
CUTOFFS = (1, 5, 10)
CANDIDATES = 50  # HybridRetriever's default
# The target: hybrid at least as good as either retriever alone, and 9 in 10 answered in 5.
TARGET_RECALL_AT_5 = 0.9


# ---------------------------------------------------------------------------------------------
# Data: the sample corpus, the questions, the index


def normalise(text: str) -> str:
    return " ".join(text.split())


def load_corpus(sample: Path) -> pa.Table:
    """The sample's good documents (DOCUMENT_SCHEMA rows), read as the jobs read them: the planted
    malformed records are rejected and left out."""
    if not (sample / "planted.json").exists():
        from workloads.data.sample import build

        build(sample)
    tables = [
        parse_jsonl_lines(
            path.read_bytes().split(b"\n"),
            source=str(path),
            id_prefix=path.name,
            first_line=1,
            text_field="text",
            id_field="id",
        )
        for path in sorted((sample / "corpus").glob("*.jsonl"))
    ]
    docs = pa.concat_tables(tables)
    return docs.filter(docs["reject_reason"].is_null())


def load_questions(path: Path, docs: pa.Table) -> list[dict]:
    """The questions, each checked against the corpus: its evidence is in its document's text. The
    corpus is built from this Python's own docs, so another Python version can renumber it."""
    texts = dict(zip(docs["id"].to_pylist(), docs["text"].to_pylist(), strict=True))
    questions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    wrong = [
        q["id"]
        for q in questions
        if q["doc_id"] not in texts or normalise(q["evidence"]) not in normalise(texts[q["doc_id"]])
    ]
    if wrong:
        raise SystemExit(
            f"{len(wrong)} questions' evidence is not in their document ({', '.join(wrong[:5])}"
            f"{', ...' if len(wrong) > 5 else ''}): the sample corpus differs from the one the "
            f"questions were written from (Python {platform.python_version()} here; see planted.json)"
        )
    return questions


def embedded_chunks(docs: pa.Table, cfg: EmbedConfig, work: Path) -> tuple[pa.Table, dict]:
    """(embeddings table, facts) of the corpus's chunks, as the embed job makes them; cached in
    `work` under a key of the corpus, the chunk settings, the model and the precision."""
    precision = resolve_precision(cfg.encoder.precision, "cpu")
    key = hashlib.sha256(
        json.dumps(
            [
                hashlib.sha256("\0".join(docs["text"].to_pylist()).encode()).hexdigest(),
                docs["id"].to_pylist(),
                cfg.chunk.model_dump(),
                cfg.encoder.model,
                cfg.encoder.normalize,
                precision,
            ]
        ).encode()
    ).hexdigest()[:16]
    cache = work / f"embeddings-{key}.parquet"
    if cache.exists():
        table = pq.read_table(cache)
        return table, json.loads(table.schema.metadata[b"facts"])
    tokenizer = load_tokenizer(resolve_model_path(cfg.encoder.model))
    chunks = live_chunks(chunk_batch(docs, tokenizer=tokenizer, cfg=cfg.chunk), duplicates=[])
    embedder = Embedder(cfg.encoder, "cpu", precision)
    start = time.perf_counter()
    table = embedder(chunks)
    facts = {
        "precision": precision,
        "dimension": embedder.model.get_embedding_dimension(),
        "max_seq_length": embedder.model.max_seq_length,
        "encode_s": time.perf_counter() - start,
    }
    work.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata({"facts": json.dumps(facts)}), cache)
    return table, facts


def exact_index(table: pa.Table, cfg: EmbedConfig, facts: dict) -> VectorIndex:
    """An exact inner-product index over the embeddings: retrieval quality without ANN loss."""
    index, plan = build_index(embedding_matrix(table), IndexConfig(type="flat"))
    embedding = EmbeddingInfo(
        model=cfg.encoder.model,
        dimension=facts["dimension"],
        normalized=cfg.encoder.normalize,
        precision=facts["precision"],
        max_seq_length=facts["max_seq_length"],
    )
    ids = table.select(IDS_SCHEMA.names).cast(IDS_SCHEMA)
    return VectorIndex(index, IndexInfo.describe(plan, embedding, index.ntotal), ids, "rag-bench")


def evidence_coverage(questions: list[dict], index: VectorIndex) -> dict[str, int]:
    """Chunks holding each question's evidence; 0 means the evidence straddles a chunk boundary
    and no retriever could return a relevant chunk."""
    texts = [normalise(t) for t in index.ids.column("text").to_pylist()]
    return {q["id"]: sum(normalise(q["evidence"]) in t for t in texts) for q in questions}


# ---------------------------------------------------------------------------------------------
# Retrieval quality


def first_relevant_rank(chunks, evidence: str) -> int | None:
    """Rank (from 1) of the first retrieved chunk whose text holds the evidence."""
    wanted = normalise(evidence)
    for chunk in chunks:
        if wanted in normalise(chunk.text):
            return chunk.rank
    return None


def summarise(ranks: list[int | None]) -> dict[str, float]:
    """recall@k: share of questions with a relevant chunk in the top k; MRR@10: mean of 1/rank of
    the first relevant chunk, 0 when none is in the top 10."""
    k_max = max(CUTOFFS)
    out = {
        f"recall@{k}": float(np.mean([r is not None and r <= k for r in ranks])) for k in CUTOFFS
    }
    out[f"mrr@{k_max}"] = float(
        np.mean([1.0 / r if r is not None and r <= k_max else 0.0 for r in ranks])
    )
    return out


def retrieval_quality(retriever: HybridRetriever, questions: list[dict]) -> dict:
    """Per mode: recall@1/5/10, MRR@10 and the in-process time per query; per question: the rank
    of its first relevant chunk in each mode (None: not in the top 10)."""
    k_max = max(CUTOFFS)
    retriever.retrieve(questions[0]["question"], k=k_max)  # load the query encoder, untimed
    ranks: dict[str, list[int | None]] = {mode: [] for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for q in questions:  # modes side by side, so a busy spell on shared cores hits all three
        for mode in MODES:
            start = time.perf_counter()
            chunks = retriever.retrieve(q["question"], k=k_max, mode=mode)
            times[mode].append(time.perf_counter() - start)
            ranks[mode].append(first_relevant_rank(chunks, q["evidence"]))
    modes = {
        mode: {**summarise(ranks[mode]), "query_ms_p50": 1000 * float(np.median(times[mode]))}
        for mode in MODES
    }
    per_question = [
        {"id": q["id"], **{mode: ranks[mode][i] for mode in MODES}} for i, q in enumerate(questions)
    ]
    return {"modes": modes, "questions": per_question}


def target(modes: dict) -> dict:
    hybrid = modes["hybrid"]
    checks = {
        "hybrid_recall@5_at_least_dense_and_lexical": all(
            hybrid["recall@5"] >= modes[m]["recall@5"] for m in ("dense", "lexical")
        ),
        "hybrid_mrr@10_at_least_dense_and_lexical": all(
            hybrid["mrr@10"] >= modes[m]["mrr@10"] for m in ("dense", "lexical")
        ),
        f"hybrid_recall@5_at_least_{TARGET_RECALL_AT_5}": hybrid["recall@5"] >= TARGET_RECALL_AT_5,
    }
    return {**checks, "met": all(checks.values())}


def hybrid_sweep(
    index: VectorIndex, questions: list[dict], candidates: list[int], rrf_ks: list[int]
) -> list[dict]:
    """Hybrid recall and MRR for each (candidates, rrf_k): the fusion's two knobs."""
    rows = []
    for n in candidates:
        retriever = HybridRetriever(index, candidates=n)
        for rrf_k in rrf_ks:
            retriever.rrf_k = rrf_k
            ranks = [
                first_relevant_rank(retriever.retrieve(q["question"], k=10), q["evidence"])
                for q in questions
            ]
            rows.append({"candidates": n, "rrf_k": rrf_k, **summarise(ranks)})
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def table(modes: dict) -> str:
    keys = [*(f"recall@{k}" for k in CUTOFFS), "mrr@10", "query_ms_p50"]
    lines = ["| mode | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for mode, row in modes.items():
        cells = [f"{row[k]:.3f}" if k != "query_ms_p50" else f"{row[k]:.1f}" for k in keys]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def retrieval_section(args: argparse.Namespace) -> dict:
    """The index over the sample corpus, and each mode's recall and MRR on the questions."""
    # The embed job's settings, on every core of this one process (the config's one thread per
    # actor is for its two-actor pool).
    cfg = load_config(EmbedConfig, CONFIG, [f"encoder.torch_threads={os.cpu_count() or 1}"])
    docs = load_corpus(args.sample)
    questions = load_questions(args.questions, docs)
    embeddings, facts = embedded_chunks(docs, cfg, args.work)
    index = exact_index(embeddings, cfg, facts)
    coverage = evidence_coverage(questions, index)
    straddling = sorted(q for q, n in coverage.items() if n == 0)
    if straddling:
        print(f"evidence in no chunk (split by a chunk boundary): {', '.join(straddling)}")

    retriever = HybridRetriever(index, candidates=args.candidates, rrf_k=args.rrf_k)
    quality = retrieval_quality(retriever, questions)
    quality["settings"] = {"candidates": args.candidates, "rrf_k": args.rrf_k, "k": max(CUTOFFS)}
    quality["target"] = target(quality["modes"])
    print(table(quality["modes"]))
    print("target:", json.dumps(quality["target"]))
    if args.sweep:
        quality["sweep"] = hybrid_sweep(index, questions, [10, 20, 50, 100], [10, 30, 60, 100])
        for row in quality["sweep"]:
            print(row)
    data = {
        "sample": str(
            args.sample.relative_to(REPO) if args.sample.is_relative_to(REPO) else args.sample
        ),
        "documents": docs.num_rows,
        "chunks": len(index),
        "chunk": cfg.chunk.model_dump(),
        "model": cfg.encoder.model,
        "precision": facts["precision"],
        "index": index.info.factory,
        "encode_s": facts["encode_s"],
        "questions": len(questions),
        "questions_with_evidence_in_several_chunks": sum(n > 1 for n in coverage.values()),
        "questions_with_evidence_in_no_chunk": straddling,
    }
    args.index, args.questions_loaded = index, questions
    return {"data": data, **quality}


# ---------------------------------------------------------------------------------------------
# Latency of the served app: `serve run serve_configs/rag-cpu.yaml` on this machine


LATENCY_CONCURRENCY = 8
LATENCY_RETRIEVE_REQUESTS = 240
LATENCY_CHAT_REQUESTS = 48
LATENCY_CHAT_MAX_TOKENS = 32


def _post(url: str, body: dict, timeout: float = 300) -> tuple[int, float]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            code = resp.status
    except urllib.error.HTTPError as err:
        code = err.code
    return code, time.perf_counter() - start


def _load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Every body once, `concurrency` in flight (closed loop); latency percentiles in ms."""
    import concurrent.futures as cf

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(lambda b: _post(url, b), bodies))
    wall = time.perf_counter() - start
    ms = np.array([t for code, t in done if code == 200]) * 1000
    return {
        "requests": len(bodies),
        "ok": int(len(ms)),
        "errors": sorted({code for code, _ in done if code != 200}),
        "concurrency": concurrency,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "mean_ms": float(ms.mean()) if len(ms) else None,
        "requests_per_s": len(ms) / wall,
    }


def latency_section(args: argparse.Namespace) -> dict:
    """p50/p99 of /rag/retrieve and of RAG chat at concurrency 8: the shipped rag-cpu.yaml
    (apps llm and rag) under `serve run`, over this bench's index, with the questions as queries."""
    import subprocess
    import sys

    import yaml

    from workloads.common.ray_runtime import free_port

    work = args.work / "serve"
    index_dir = work / "index"
    if index_dir.exists():
        import shutil

        shutil.rmtree(index_dir)
    args.index.save(str(index_dir))
    config = yaml.safe_load((REPO / "serve_configs" / "rag-cpu.yaml").read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    apps = {a["name"]: a for a in config["applications"]}
    apps["rag"]["args"]["index"] = str(index_dir)
    model = next(
        (
            c
            for c in apps["llm"]["args"]["model_source_candidates"]["demo-llm"]
            if (REPO / c / "config.json").exists()
        ),
        None,
    )
    if model is None:
        raise SystemExit("no model for the LLM app: run `make demo` (or build models/tiny-llama)")
    path = work / "rag-cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    log = work / "serve-run.log"
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("LLM_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("serve")), "run", str(path)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 600
        while True:
            try:
                import urllib.request

                with urllib.request.urlopen(f"{base}/rag/ready", timeout=30) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"serve run did not become ready; see {log}")
            time.sleep(3)
        questions = [q["question"] for q in args.questions_loaded]
        retrieve = [
            {"query": questions[i % len(questions)], "k": 5}
            for i in range(LATENCY_RETRIEVE_REQUESTS)
        ]
        chat = [
            {
                "model": "demo-llm",
                "messages": [{"role": "user", "content": questions[i % len(questions)]}],
                "max_tokens": LATENCY_CHAT_MAX_TOKENS,
                "temperature": 0,
            }
            for i in range(LATENCY_CHAT_REQUESTS)
        ]
        _load(f"{base}/rag/retrieve", retrieve[:16], LATENCY_CONCURRENCY)  # warm-up
        out = {
            "config": "serve_configs/rag-cpu.yaml (index: this bench's, http port: free)",
            "llm_model": model,
            "retrieve": _load(f"{base}/rag/retrieve", retrieve, LATENCY_CONCURRENCY),
            "chat": {
                **_load(f"{base}/rag/v1/chat/completions", chat, LATENCY_CONCURRENCY),
                "max_tokens": LATENCY_CHAT_MAX_TOKENS,
            },
        }
        print(json.dumps(out, indent=1))
        return out
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def section(results: dict) -> str:
    """The `rag` section of bench/RESULTS.md."""
    r = results["retrieval"]
    d, t = r["data"], r["target"]
    lines = [
        "<!-- rag:start -->",
        "## RAG: retrieval quality and served latency (`bench/rag_bench.py`)",
        "",
        f"Command: `{results['command']}` ({results['seconds']:.0f} s; "
        f"{results['machine']['cpus']} CPUs, load average {results['machine']['load_average']:.1f} at the end).",
        "",
        f"Retrieval: {d['questions']} hand-written questions (bench/data/rag_questions.jsonl, each "
        f"with the verbatim evidence it needs) over the whole sample corpus: {d['documents']} "
        f"documents, {d['chunks']} chunks of {d['chunk']['size_tokens']} tokens "
        f"({d['chunk']['overlap_tokens']} overlap), each embedded and BM25-indexed after its "
        f"document's title (`chunk.title_field: {d['chunk'].get('title_field')}`, the module "
        "name the sample's records carry; many questions name the module, as users do), "
        f"{d['model']} in an exact FAISS index, BM25 "
        f"(bm25s, English stopwords and Snowball stemming), hybrid = reciprocal-rank fusion "
        f"(k={r['settings']['rrf_k']}) of {r['settings']['candidates']} candidates from each. "
        "A hit is a chunk holding the evidence. Without titles (the same questions, measured "
        "while building this): recall@5 0.828 dense, 0.719 BM25, 0.844 hybrid.",
        "",
        table(r["modes"]),
        "",
        "Targets: hybrid at least dense and BM25 on recall@5 "
        f"({'met' if t['hybrid_recall@5_at_least_dense_and_lexical'] else 'missed'}) and on MRR "
        f"({'met' if t['hybrid_mrr@10_at_least_dense_and_lexical'] else 'missed'}); hybrid "
        f"recall@5 >= {TARGET_RECALL_AT_5}: "
        f"{'met' if t[f'hybrid_recall@5_at_least_{TARGET_RECALL_AT_5}'] else 'missed'} "
        f"({r['modes']['hybrid']['recall@5']:.3f}).",
    ]
    if "latency" in results:
        lat = results["latency"]
        lines += [
            "",
            f"Served latency at concurrency {LATENCY_CONCURRENCY} (closed loop): "
            f"`serve run serve_configs/rag-cpu.yaml` on this machine (apps `llm` and `rag`, "
            f"model {lat['llm_model']}), the questions as queries.",
            "",
            "| endpoint | requests | p50 ms | p99 ms | requests/s |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, row in (
            ("/rag/retrieve (k=5)", lat["retrieve"]),
            (f"/rag/v1/chat/completions ({lat['chat']['max_tokens']} new tokens)", lat["chat"]),
        ):
            lines.append(
                f"| {name} | {row['ok']}/{row['requests']} | {row['p50_ms']:.0f} | "
                f"{row['p99_ms']:.0f} | {row['requests_per_s']:.1f} |"
            )
    lines.append("<!-- rag:end -->")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sample", type=Path, default=REPO / "data" / "sample")
    parser.add_argument("--questions", type=Path, default=QUESTIONS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rag-bench"))
    parser.add_argument("--candidates", type=int, default=CANDIDATES)
    parser.add_argument("--rrf-k", type=int, default=RRF_K)
    parser.add_argument("--sweep", action="store_true", help="hybrid candidates x rrf_k grid")
    parser.add_argument("--no-write", action="store_true", help="print, do not write results")
    parser.add_argument(
        "--no-latency", action="store_true", help="skip the served app's latency (serve run)"
    )
    args = parser.parse_args()
    import bm25s
    import faiss
    import sentence_transformers

    started = time.perf_counter()
    results = {
        "command": ".venv/bin/python bench/rag_bench.py"
        + (f" --candidates {args.candidates}" if args.candidates != CANDIDATES else "")
        + (f" --rrf-k {args.rrf_k}" if args.rrf_k != RRF_K else "")
        + (" --sweep" if args.sweep else "")
        + (" --no-latency" if args.no_latency else ""),
        "retrieval": retrieval_section(args),
    }
    if not args.no_latency:
        results["latency"] = latency_section(args)
    results["seconds"] = time.perf_counter() - started
    results["machine"] = {
        "cpus": psutil.cpu_count(),
        "arch": platform.machine(),
        "load_average": os.getloadavg()[0],
        "python": platform.python_version(),
        "faiss": faiss.__version__,
        "bm25s": bm25s.__version__,
        "sentence_transformers": sentence_transformers.__version__,
    }
    if not args.no_write:
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        write_section("rag", section(results))
        print(f"wrote {RESULTS.relative_to(REPO)} and the rag section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
