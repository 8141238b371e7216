"""The embed job on local Ray with the real all-MiniLM-L6-v2: chunks, vectors, counts, and a killed
embedding actor."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from workloads.common.config import load_config
from workloads.embed.embedding import DUPLICATE_ID, EmbedConfig, run
from workloads.embed.schema import EmbeddingInfo, embedding_matrix

pytestmark = pytest.mark.slow
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def sample_records(sample_corpus: Path, n: int) -> list[dict]:
    records = []
    for path in sorted((sample_corpus / "corpus").glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            try:
                r = json.loads(line)
            except ValueError:  # the planted malformed and invalid-UTF-8 lines
                continue
            if isinstance(r, dict) and isinstance(r.get("text"), str) and r["text"].strip():
                records.append(r)
    return records[:n]


def job_config(inp: Path, out: Path, *overrides: str) -> EmbedConfig:
    return load_config(
        EmbedConfig,
        None,
        [
            f"input.path={inp}",
            f"output.path={out}",
            "actors.concurrency=1",
            "actors.num_cpus=0.5",
            "encoder.torch_threads=1",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory, sample_corpus) -> tuple[Path, list[dict]]:
    """60 sample documents plus one of each bad case the job must count and handle."""
    records = [
        {"id": f"doc-{i}", "text": r["text"]}
        for i, r in enumerate(sample_records(sample_corpus, 60))
    ]
    records += [
        {"id": "doc-0", "text": "A second document that reuses the id doc-0."},
        {"id": "long", "text": "Ray Data streams blocks between operators. " * 300},
        {"id": "number", "text": 12345},
        {"id": "invisible", "text": "\u200b\u200b\u200b"},
    ]
    folder = tmp_path_factory.mktemp("embed-input")
    with open(folder / "docs.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return folder, records


def test_embed_job_writes_one_vector_per_chunk_and_accounts_for_every_document(
    ray_session, planted, tmp_path
):
    folder, records = planted
    out = tmp_path / "embed"
    cfg = job_config(
        folder, out, "chunk.size_tokens=96", "chunk.overlap_tokens=16", "chunk.max_doc_chars=4000"
    )
    manifest = run(cfg)

    assert manifest.read == len(records)
    assert manifest.rejected == {DUPLICATE_ID: 1, "non_string_text": 1}
    assert manifest.dropped == {"no_tokens": 1}
    assert manifest.kept == len(records) - 3
    assert manifest.extra["truncated_documents"] == 1
    assert manifest.extra["precision"] in ("bf16", "fp32")

    table = pq.read_table(out / "embeddings")
    assert table.num_rows == manifest.extra["chunks"] > manifest.kept  # long documents split
    ids = table["chunk_id"].to_pylist()
    assert len(set(ids)) == len(ids)
    texts = {r["id"]: r["text"] for r in reversed(records)}  # the first doc-0 wins
    for row in table.select(["doc_id", "text", "start", "end"]).to_pylist():
        assert row["text"] == texts[row["doc_id"]][row["start"] : row["end"]]
    assert "A second document" not in " ".join(table["text"].to_pylist())
    assert (
        max(
            e
            for d, e in zip(table["doc_id"].to_pylist(), table["end"].to_pylist(), strict=True)
            if d == "long"
        )
        <= 4000
    )

    # The vectors are all-MiniLM-L6-v2's, as plain fp32 encoding would give them.
    from workloads.embed.models import load_sentence_transformer

    vectors = embedding_matrix(table)
    model = load_sentence_transformer(MINILM)
    reference = model.encode(table["text"].to_pylist()[:64], normalize_embeddings=True)
    cosine = (vectors[:64] * reference).sum(axis=1)
    assert cosine.min() > 0.99, cosine.min()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)

    info = EmbeddingInfo.model_validate_json((out / "embedding.json").read_text())
    assert (info.model, info.dimension, info.normalized) == (MINILM, 384, True)
    rejects = pq.read_table(out / "rejects").to_pylist()
    assert sorted(r["reject_reason"] for r in rejects) == sorted([DUPLICATE_ID, "non_string_text"])

    again = run(cfg)  # every stage resumes; nothing is recomputed
    assert all(s.resumed for s in again.stages)
    assert again.extra["chunks"] == manifest.extra["chunks"]


class ActorKiller(threading.Thread):
    """SIGKILLs an embedding actor's process once, while it is running a batch (Ray titles an
    actor process `ray::<actor>.<method>` while the method runs)."""

    BUSY = re.compile(r"ray::MapWorker\(MapBatches\(Embedder\)\)\.submit")

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and not self.killed:
            for p in psutil.process_iter(["cmdline"]):
                if self.BUSY.match(" ".join(p.info["cmdline"] or [])):
                    try:
                        os.kill(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    self.killed.append(p.pid)
                    return
            time.sleep(0.2)


def test_a_killed_embedding_actor_loses_and_duplicates_no_rows(
    ray_session, sample_corpus, tmp_path
):
    out = tmp_path / "embed"
    cfg = job_config(
        sample_corpus / "corpus",
        out,
        "chunk.size_tokens=64",
        "chunk.overlap_tokens=8",
        "actors.rows_per_batch=32",
    )
    killer = ActorKiller()
    killer.start()
    try:
        manifest = run(cfg)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, "the embedding actor finished before it could be killed"

    table = pq.read_table(out / "embeddings", columns=["chunk_id", "doc_id", "chunk_index"])
    ids = table["chunk_id"].to_pylist()
    assert len(ids) == len(set(ids)) == manifest.extra["chunks"]
    # Every kept document has chunks 0..n-1, none missing.
    per_doc: dict[str, list[int]] = {}
    for d, k in zip(table["doc_id"].to_pylist(), table["chunk_index"].to_pylist(), strict=True):
        per_doc.setdefault(d, []).append(k)
    assert len(per_doc) == manifest.kept
    assert all(sorted(ks) == list(range(len(ks))) for ks in per_doc.values())
