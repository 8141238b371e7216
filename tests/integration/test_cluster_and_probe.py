"""Clustering and the linear probe on a real local Ray, with real MiniLM embeddings of the labelled
documentation sample: the probe embeds 50 texts of each of its 6 families, and clustering runs on
two overlapping chunks of 25 documents of each family (300 chunk texts)."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from workloads.embed.classify import (
    LinearProbe,
    ProbeModelMismatch,
    TrainProbeConfig,
    labelled_sample,
)
from workloads.embed.classify import run as train_probe
from workloads.embed.clustering import NON_FINITE_EMBEDDING, ClusterDocsConfig
from workloads.embed.clustering import run as cluster_docs
from workloads.embed.schema import (
    EMBEDDING_INFO_FILE,
    EmbeddingInfo,
    embedding_matrix,
    embeddings_table,
)

pytestmark = pytest.mark.slow  # about a minute on 2 cores: MiniLM embeds 600 short texts
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PER_LABEL = 50  # the probe's texts per label
CLUSTER_PER_LABEL = 25  # documents per label that are chunked and clustered
# Short inputs keep MiniLM on two shared CPU cores to seconds: 64 tokens is about 45 words.
MAX_TOKENS = 64
CHUNK_WORDS, STRIDE = 40, 32  # two overlapping chunks per document


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return labelled_sample(max_per_label=PER_LABEL, seed=0)


@pytest.fixture(scope="module")
def documents(records) -> list[dict]:
    """The first CLUSTER_PER_LABEL records of each label."""
    seen: Counter = Counter()
    chosen = []
    for r in records:
        if seen[r["label"]] < CLUSTER_PER_LABEL:
            seen[r["label"]] += 1
            chosen.append(r)
    return chosen


def _chunk_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the first two windows of CHUNK_WORDS words, STRIDE words apart."""
    words = [m.span() for m in re.finditer(r"\S+", text)]
    spans = []
    for first in (0, STRIDE):
        window = words[first : first + CHUNK_WORDS]
        if window:
            spans.append((window[0][0], window[-1][1]))
    return spans


@pytest.fixture(scope="module")
def embed_output(documents, tmp_path_factory):
    """An embed job's output folder, written here: chunk rows with real MiniLM vectors, in two
    files, with one chunk's vector corrupted (NaN) so that its document must be rejected."""
    from workloads.embed.models import load_sentence_transformer

    model = load_sentence_transformer(MODEL)
    model.max_seq_length = MAX_TOKENS
    doc_ids, texts, starts, ends, indexes = [], [], [], [], []
    for r in documents:
        for i, (s, e) in enumerate(_chunk_spans(r["text"])):
            doc_ids.append(r["id"])
            texts.append(r["text"][s:e])
            starts.append(s)
            ends.append(e)
            indexes.append(i)
    vectors = model.encode(texts, batch_size=64, normalize_embeddings=True)
    vectors[1, 7] = np.nan  # a chunk of the first document
    table = embeddings_table(
        doc_ids=doc_ids,
        texts=texts,
        starts=starts,
        ends=ends,
        vectors=vectors,
        chunk_indexes=indexes,
    )
    root = tmp_path_factory.mktemp("embed")
    (root / "embeddings").mkdir()
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), root / "embeddings" / "part-00000.parquet")
    pq.write_table(table.slice(half), root / "embeddings" / "part-00001.parquet")
    info = EmbeddingInfo(
        model=MODEL,
        dimension=vectors.shape[1],
        normalized=True,
        precision="fp32",
        max_seq_length=MAX_TOKENS,
    )
    info.write(pafs.LocalFileSystem(), str(root / EMBEDDING_INFO_FILE))
    return root, table, doc_ids[1]


@pytest.fixture(scope="module")
def clustered(ray_session, embed_output, tmp_path_factory):
    root, _, _ = embed_output
    out = tmp_path_factory.mktemp("clusters")
    cfg = ClusterDocsConfig.model_validate(
        {
            "input": {"path": str(root)},
            "output": {"path": str(out)},
            "num_partitions": 2,
            "actors": {"concurrency": 1, "num_cpus": 0.5},
            "ray": {"num_cpus": 2, "data_progress_bars": False},
        }
    )
    return cfg, out, cluster_docs(cfg)


def test_every_document_is_assigned_once_or_rejected(clustered, embed_output, documents):
    cfg, out, manifest = clustered
    _, chunks, corrupted = embed_output
    assigned = pq.read_table(out / "assignments").to_pydict()
    assert len(assigned["doc_id"]) == len(set(assigned["doc_id"]))
    assert set(assigned["doc_id"]) == {r["id"] for r in documents} - {corrupted}
    rejects = pq.read_table(out / "rejects").to_pylist()
    assert [(r["doc_id"], r["reject_reason"]) for r in rejects] == [
        (corrupted, NON_FINITE_EMBEDDING)
    ]
    assert manifest.read == len(documents) and manifest.kept == len(documents) - 1
    saved = json.loads((out / "_manifest.json").read_text())
    assert saved["counts"]["reconciled"] is True
    assert saved["extra"]["chunks_read"] == chunks.num_rows
    assert saved["extra"]["k"] == 9  # k: null -> round(sqrt(149 / 2))


def test_clusters_have_top_terms_and_follow_the_documentation_families(clustered, documents):
    cfg, out, manifest = clustered
    clusters = pq.read_table(out / "clusters").to_pylist()
    assigned = pq.read_table(out / "assignments").to_pydict()
    cluster_of = dict(zip(assigned["doc_id"], assigned["cluster"], strict=True))
    assert sum(c["size"] for c in clusters) == manifest.kept
    for c in clusters:
        if c["size"]:
            assert len(c["top_terms"]) == cfg.top_terms
            assert c["term_scores"] == sorted(c["term_scores"], reverse=True)
            assert {cluster_of[d] for d in c["representatives"]} == {c["cluster"]}
    # Purity: the share of documents in their cluster's most common family. Six equal families
    # give 1/6 by chance; these clusters reach about 0.6.
    label = {r["id"]: r["label"] for r in documents}
    by_cluster: dict[int, Counter] = {}
    for doc, c in cluster_of.items():
        by_cluster.setdefault(c, Counter())[label[doc]] += 1
    purity = sum(max(v.values()) for v in by_cluster.values()) / len(cluster_of)
    assert purity >= 0.45
    # The cluster holding most GUI documents is named by GUI words.
    gui = max(by_cluster, key=lambda c: by_cluster[c]["gui"])
    gui_terms = set(clusters[gui]["top_terms"])
    assert gui_terms & {"widget", "tk", "tkinter", "turtle", "canvas", "window", "button", "pen"}


def test_a_rerun_with_the_same_config_resumes_every_stage(clustered):
    cfg, out, manifest = clustered
    again = cluster_docs(cfg)
    assert all(s.resumed for s in again.stages)
    assert (again.read, again.kept, again.rejected) == (
        manifest.read,
        manifest.kept,
        manifest.rejected,
    )


@pytest.fixture(scope="module")
def probed(ray_session, records, tmp_path_factory):
    data = tmp_path_factory.mktemp("labelled") / "labelled.jsonl"
    bad = [
        json.dumps({"id": "no-label", "text": "a record without its label"}),
        json.dumps({"id": "number-text", "text": 42, "label": "gui"}),
        '{"id": "broken", "text": "unterminated',
        json.dumps({"id": "lonely", "text": "the only example of its label", "label": "poetry"}),
    ]
    lines = [json.dumps(r) for r in records]
    data.write_text("\n".join(lines[:100] + bad + lines[100:]) + "\n")
    out = tmp_path_factory.mktemp("probe")
    cfg = TrainProbeConfig.model_validate(
        {
            "input": {"path": str(data)},
            "output": {"path": str(out)},
            "model": MODEL,
            "max_seq_length": MAX_TOKENS,
            "embed": {"concurrency": 1, "num_cpus": 1, "device": "cpu", "batch_size": 64},
            "ray": {"num_cpus": 2, "data_progress_bars": False},
        }
    )
    return cfg, out, train_probe(cfg)


def test_probe_beats_the_majority_baseline_on_held_out_texts(probed, records):
    cfg, out, manifest = probed
    metrics = json.loads((out / "metrics.json").read_text())
    # The majority-class baseline, from the data: always answer the most common label.
    counts = Counter(r["label"] for r in records)
    baseline = max(counts.values()) / len(records)
    assert metrics["accuracy"] >= baseline + 0.4
    assert metrics["macro_f1"] >= 0.5
    assert metrics["majority_baseline_accuracy"] == pytest.approx(baseline, abs=0.02)
    assert set(metrics["per_class"]) == set(counts)
    assert metrics["held_out_rows"] == round(cfg.test_fraction * len(records))


def test_probe_counts_reconcile_with_rejects_and_rare_labels(probed, records):
    cfg, out, manifest = probed
    assert manifest.read == len(records) + 4
    assert manifest.rejected == {"malformed_json": 1, "missing_label": 1, "non_string_text": 1}
    assert manifest.dropped == {"rare_label": 1}
    assert manifest.kept == len(records)
    rejects = pq.read_table(out / "rejects").to_pylist()
    assert {r["reject_reason"] for r in rejects} == set(manifest.rejected)
    saved = json.loads((out / "_manifest.json").read_text())
    assert saved["counts"]["reconciled"] is True


def test_saved_probe_labels_texts_and_refuses_another_model(probed, embed_output, records):
    cfg, out, _ = probed
    probe = LinearProbe.load(str(out / "probe"), expect_model=MODEL)
    assert probe.embedding.dimension == 384
    # The first chunk of each document (embedded apart from the job) gets its document's label.
    _, chunks, corrupted = embed_output
    first = chunks.filter(pc.equal(chunks["chunk_index"], 0))
    first = first.filter(pc.not_equal(first["doc_id"], corrupted))
    label = {r["id"]: r["label"] for r in records}
    predicted = probe.predict(embedding_matrix(first))
    truth = [label[d] for d in first["doc_id"].to_pylist()]
    assert np.mean([p == t for p, t in zip(predicted, truth, strict=True)]) >= 0.7
    with pytest.raises(ProbeModelMismatch):
        LinearProbe.load(str(out / "probe"), expect_model="BAAI/bge-base-en-v1.5")
