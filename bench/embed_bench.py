"""Embedding throughput: `ray_jobs/embed.py` against plain `SentenceTransformer.encode` (fp32), same
model, same chunk texts, same cores, in one run; plus the cosine of the job's vectors against fp32.
Writes bench/RESULTS.md (the `embed` section) and bench/embed_results.json.

    .venv/bin/python bench/embed_bench.py            # about 10 minutes on 2 cores

Data: documents built from every installed package's docstrings (`workloads.data.sample`,
site-packages), chunked by the job (200 tokens, 32 overlap); the reference encodes exactly the chunk
texts the job wrote. The reference gets every core as torch threads in one process, which is what
a user calling `encode` on this machine gets.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from results_md import write_section  # noqa: E402  (bench/, beside this script)

from workloads.common.config import load_config  # noqa: E402
from workloads.data.sample import build  # noqa: E402
from workloads.embed.embedding import EmbedConfig, autocast, cpu_supports_bf16, run  # noqa: E402
from workloads.embed.models import load_sentence_transformer  # noqa: E402
from workloads.embed.schema import embedding_matrix, embedding_text  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = REPO / "ray_jobs" / "configs" / "embed" / "default.yaml"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def plain_encode(
    texts: list[str], precision: str, batch_size: int = 64
) -> tuple[np.ndarray, float]:
    """`SentenceTransformer.encode` in this process, every core as torch threads."""
    import torch

    torch.set_num_threads(psutil.cpu_count(logical=True))
    model = load_sentence_transformer(MODEL)
    model.encode(texts[:64], batch_size=batch_size)  # warm-up: first-call allocations
    start = time.perf_counter()
    with torch.inference_mode(), autocast("cpu", precision):
        vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    return vectors, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/embed-bench"))
    parser.add_argument("--docs", type=int, default=1500)
    args = parser.parse_args()

    corpus = args.work / f"site-{args.docs}"
    if not (corpus / "planted.json").exists():
        build(corpus, docs=args.docs, seed=0, shards=8, site_packages=True)
    out = args.work / "out"
    cfg = load_config(
        EmbedConfig,
        CONFIG,
        [f"input.path={corpus / 'corpus'}", f"output.path={out}", "output.mode=overwrite"],
    )
    start = time.perf_counter()
    manifest = run(cfg)
    job_wall = time.perf_counter() - start
    embed_s = next(s.seconds for s in manifest.stages if s.name == "embeddings")
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    ray.shutdown()  # the reference runs alone on the machine

    table = pq.read_table(out / "embeddings", columns=["text", "title", "embedding", "n_tokens"])
    # What the job's encoder read: the title (chunk.title_field) before the chunk's text.
    texts = [
        embedding_text(title, text)
        for title, text in zip(table["title"].to_pylist(), table["text"].to_pylist(), strict=True)
    ]
    job_vectors = embedding_matrix(table)
    n = len(texts)

    ref32, ref32_s = plain_encode(texts, "fp32")
    cosine = (job_vectors * ref32).sum(axis=1)
    rows = {
        "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.machine()}, AVX-512 BF16 or AMX: {cpu_supports_bf16()}",
        "model": MODEL,
        "documents": manifest.read,
        "chunks": n,
        "mean_tokens_per_chunk": float(np.mean(table["n_tokens"].to_numpy())),
        "cpus": cpus,
        "precision": manifest.extra["precision"],
        "job_embed_stage_s": embed_s,
        "job_wall_s": job_wall,
        "job_stage_chunks_per_s": n / embed_s,
        "job_end_to_end_chunks_per_s": n / job_wall,
        "plain_fp32_s": ref32_s,
        "plain_fp32_chunks_per_s": n / ref32_s,
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
    }
    if cpu_supports_bf16():
        _, bf16_s = plain_encode(texts, "bf16")
        rows["plain_bf16_chunks_per_s"] = n / bf16_s
    rows["speedup_stage"] = rows["job_stage_chunks_per_s"] / rows["plain_fp32_chunks_per_s"]
    rows["speedup_end_to_end"] = (
        rows["job_end_to_end_chunks_per_s"] / rows["plain_fp32_chunks_per_s"]
    )
    (HERE / "embed_results.json").write_text(json.dumps(rows, indent=2))
    write_section("embed", render(rows))
    print(json.dumps(rows, indent=2))


def render(r: dict) -> str:
    bf16 = (
        f"| plain `encode`, bf16 autocast (for the breakdown) | {r['plain_bf16_chunks_per_s']:.1f} "
        f"| {r['plain_bf16_chunks_per_s'] / r['plain_fp32_chunks_per_s']:.2f}x |\n"
        if "plain_bf16_chunks_per_s" in r
        else ""
    )
    return (
        "<!-- embed:start -->\n"
        "## Batch embedding (`bench/embed_bench.py`)\n\n"
        f"Machine: {r['machine']}. Command: `.venv/bin/python bench/embed_bench.py`.\n\n"
        f"{r['model']}, {r['chunks']:,} chunks (mean {r['mean_tokens_per_chunk']:.0f} tokens) from "
        f"{r['documents']:,} site-packages documents; the job on local Ray with {r['cpus']} CPUs "
        f"(ray_jobs/configs/embed/default.yaml: two single-threaded actors, {r['precision']}), the "
        "reference in one process with every core as torch threads.\n\n"
        "| run | chunks/s | vs plain fp32 |\n| --- | --- | --- |\n"
        f"| plain `SentenceTransformer.encode`, fp32 (reference) | {r['plain_fp32_chunks_per_s']:.1f} | 1.00x |\n"
        f"{bf16}"
        f"| `ray_jobs/embed.py`, embedding stage | {r['job_stage_chunks_per_s']:.1f} "
        f"| **{r['speedup_stage']:.2f}x** |\n"
        f"| `ray_jobs/embed.py`, whole job (Ray start, chunking, duplicate ids, counts) "
        f"| {r['job_end_to_end_chunks_per_s']:.1f} | {r['speedup_end_to_end']:.2f}x |\n\n"
        f"Cosine of the job's vectors against plain fp32: min {r['cosine_min']:.5f}, mean "
        f"{r['cosine_mean']:.6f}. Target: >= 1.5x chunks/s.\n"
        "<!-- embed:end -->"
    )


if __name__ == "__main__":
    main()
