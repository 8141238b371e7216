"""The index job on a real local Ray (shared session), over real all-MiniLM-L6-v2 embeddings of the
sample corpus written as an embed-job output folder, and the search CLI over what it built."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO
from workloads.common.config import load_config
from workloads.embed.index import (
    DUPLICATE_CHUNK_ID,
    NON_FINITE,
    NULL_EMBEDDING,
    WRONG_DIMENSION,
    BuildIndexConfig,
    IndexConfig,
    IndexConfigError,
    IndexInfo,
    VectorIndex,
    build_index,
    run,
)
from workloads.embed.schema import (
    EMBEDDING_INFO_FILE,
    EmbeddingInfo,
    embedding_schema,
    embeddings_table,
)
from workloads.embed.search import main as search_main

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CONFIG = REPO / "ray_jobs/configs/build_index/default.yaml"
CHUNK_CHARS = 400  # short chunks keep the encoding of ~300 of them to seconds
KINDS = ("flat", "hnsw", "ivf_pq")


@pytest.fixture(scope="module")
def minilm():
    from workloads.embed.models import load_sentence_transformer

    return load_sentence_transformer(MODEL, device="cpu")


@pytest.fixture(scope="module")
def embed_output(sample_corpus, tmp_path_factory, minilm):
    """An embed-job output folder: one chunk (the first ~400 characters) per base document of the
    sample corpus (planted copies left out, so each text has one true match), in two files, plus
    four bad rows: a null vector, a NaN, a repeated chunk id, and a vector of the wrong length."""
    from workloads.data.sample import read_corpus_texts

    truth = json.loads((sample_corpus / "planted.json").read_text())
    copies = {copy for pairs in truth["pairs"].values() for copy, _ in pairs}
    texts = {i: t for i, t in sorted(read_corpus_texts(sample_corpus / "corpus").items())}
    doc_ids = [i for i in texts if i not in copies]
    chunks = [texts[i][:CHUNK_CHARS].rsplit(" ", 1)[0] for i in doc_ids]
    vectors = minilm.encode(chunks, batch_size=32, normalize_embeddings=True)
    dim = vectors.shape[1]

    out = tmp_path_factory.mktemp("embed_out")
    (out / "embeddings").mkdir()
    table = embeddings_table(
        doc_ids=doc_ids,
        texts=chunks,
        starts=[0] * len(chunks),
        ends=[len(c) for c in chunks],
        vectors=vectors,
    )
    half = len(doc_ids) // 2
    pq.write_table(table.slice(0, half), out / "embeddings/part-00000.parquet")
    bad = pa.table(
        {
            "doc_id": ["bad-null", "bad-nan", doc_ids[0]],
            "chunk_id": ["bad-null#0", "bad-nan#0", f"{doc_ids[0]}#0"],
            "chunk_index": pa.array([0, 0, 0], pa.int32()),
            "text": ["", "", "a second row for the same chunk id"],
            "start": [0, 0, 0],
            "end": [0, 0, 0],
            "n_tokens": pa.array([0, 0, 0], pa.int32()),
            "title": [None, None, "a title"],
            "embedding": [None, np.full(dim, np.nan, np.float32), vectors[1]],
        },
        schema=embedding_schema(dim),
    )
    pq.write_table(
        pa.concat_tables([table.slice(half), bad]), out / "embeddings/part-00001.parquet"
    )
    # A file whose writer used a variable-length list: one vector is too short. It is also an
    # older embeddings file, without the `title` column.
    short = (
        bad.slice(0, 1)
        .drop_columns(["embedding", "title"])
        .append_column("embedding", pa.array([[0.1] * (dim - 1)], pa.list_(pa.float32())))
    )
    short = short.set_column(1, "chunk_id", pa.array(["bad-short#0"]))
    pq.write_table(short, out / "embeddings/part-00002.parquet")
    EmbeddingInfo(
        model=MODEL, dimension=dim, normalized=True, precision="fp32", max_seq_length=256
    ).write(pafs.LocalFileSystem(), str(out / EMBEDDING_INFO_FILE))
    return out, doc_ids, chunks, vectors


def _cfg(input_path, output_path, *extra) -> BuildIndexConfig:
    return load_config(
        BuildIndexConfig, CONFIG, [f"input.path={input_path}", f"output.path={output_path}", *extra]
    )


@pytest.fixture(scope="module")
def built(ray_session, embed_output, tmp_path_factory):
    """{kind: (output folder, manifest)} for each index type, built by the job's run(cfg)."""
    src = embed_output[0]
    out = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(f"index_{kind}")
        out[kind] = folder, run(_cfg(src, folder, f"index.type={kind}"))
    return out


def _queries(doc_ids, chunks, picks=(3, 50, 120, 200, 260)):
    """A query made from a document's own words (words 5..25 of its chunk), and that document."""
    return [(" ".join(chunks[i].split()[5:25]), doc_ids[i]) for i in picks]


@pytest.mark.parametrize("kind", KINDS)
def test_counts_reconcile_and_bad_rows_go_to_rejects(kind, built, embed_output):
    folder, manifest = built[kind]
    _, doc_ids, _, _ = embed_output
    counts = json.loads((folder / "_manifest.json").read_text())["counts"]
    assert counts["read"] == len(doc_ids) + 4
    assert counts["kept"] == len(doc_ids)
    assert counts["rejected"] == {
        DUPLICATE_CHUNK_ID: 1,
        NON_FINITE: 1,
        NULL_EMBEDDING: 1,
        WRONG_DIMENSION: 1,
    }
    assert counts["reconciled"] is True
    rejects = pq.read_table(folder / "rejects").to_pylist()
    assert {(r["chunk_id"], r["reject_reason"]) for r in rejects} == {
        ("bad-null#0", NULL_EMBEDDING),
        ("bad-nan#0", NON_FINITE),
        (f"{doc_ids[0]}#0", DUPLICATE_CHUNK_ID),
        ("bad-short#0", WRONG_DIMENSION),
    }
    # Row i of ids.parquet is vector i: the good rows in file order, the first doc_ids[0] kept.
    ids = pq.read_table(folder / "ids.parquet")
    assert ids.column("doc_id").to_pylist() == doc_ids
    info = IndexInfo.model_validate_json((folder / "index.json").read_text())
    assert (info.model, info.dimension, info.metric, info.index_type) == (
        MODEL,
        384,
        "inner_product",
        kind,
    )
    assert info.vectors == len(doc_ids) == VectorIndex.load(str(folder)).index.ntotal


@pytest.mark.parametrize("kind", KINDS)
def test_every_index_finds_a_document_from_its_own_words(kind, built, embed_output, minilm):
    folder, _ = built[kind]
    _, doc_ids, chunks, vectors = embed_output
    index = VectorIndex.load(str(folder))
    queries = _queries(doc_ids, chunks)
    qv = minilm.encode([q for q, _ in queries], normalize_embeddings=True)
    hits = index.hits(index.search(qv, 5))
    assert [h[0].doc_id for h in hits] == [d for _, d in queries]
    # Against exact search over the same vectors: the approximate top-10 is nearly the same set.
    exact = np.argsort(-(vectors @ vectors[:50].T).T, axis=1)[:, :10]
    found = index.search(vectors[:50], 10).ids
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert recall >= 0.9


def test_search_cli_prints_the_document_first(built, embed_output):
    folder, _ = built["ivf_pq"]
    _, doc_ids, chunks, _ = embed_output
    queries = _queries(doc_ids, chunks)
    proc = subprocess.run(
        [sys.executable, "-m", "workloads.embed.search", "--index", str(folder), "--k", "3"]
        + ["--json", *[q for q, _ in queries]],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert [r["hits"][0]["doc_id"] for r in results] == [d for _, d in queries]
    first = results[0]["hits"][0]
    assert first["rank"] == 1 and first["chunk_id"] == f"{first['doc_id']}#0"
    assert queries[0][0] in " ".join(first["text"].split())
    assert len(results[0]["hits"]) == 3


def test_search_cli_table_names_rank_score_doc_chunk_and_text(built, embed_output, capsys):
    folder, _ = built["hnsw"]
    _, doc_ids, chunks, _ = embed_output
    query, doc = _queries(doc_ids, chunks)[1]
    assert search_main(["--index", str(folder), "--k", "2", "--width", "40", query]) == 0
    out = capsys.readouterr().out
    assert f"hnsw (HNSW32,Flat), {len(doc_ids):,} vectors of {MODEL} (384-d)" in out
    first = next(line for line in out.splitlines() if line.lstrip().startswith("1 "))
    rank, score, doc_id, chunk_id, *text = first.split()
    assert (rank, doc_id, chunk_id) == ("1", doc, f"{doc}#0")
    assert 0.3 < float(score) <= 1.0
    assert " ".join(text).endswith("...") and len(" ".join(text)) <= 40


def test_search_cli_refuses_another_model_with_exit_code_2(built):
    folder, _ = built["flat"]
    proc = subprocess.run(
        [sys.executable, "-m", "workloads.embed.search", "--index", str(folder)]
        + ["--model", "BAAI/bge-base-en-v1.5", "a query"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert MODEL in proc.stderr and "BAAI/bge-base-en-v1.5" in proc.stderr


def test_query_model_of_another_dimension_is_refused(tmp_path, capsys):
    """index.json names MiniLM but the index holds 128-d vectors: MiniLM's 384-d queries are refused."""
    x = np.random.default_rng(0).standard_normal((20, 128)).astype(np.float32)
    index, plan = build_index(x, IndexConfig(type="flat"))
    info = EmbeddingInfo(model=MODEL, dimension=128, normalized=True, precision="fp32")
    ids = pa.table(
        {
            "doc_id": ["d"] * 20,
            "chunk_id": [f"d#{i}" for i in range(20)],
            "text": ["t"] * 20,
            "start": [0] * 20,
            "end": [1] * 20,
        }
    )
    VectorIndex(index, IndexInfo.describe(plan, info, 20), ids).save(str(tmp_path / "idx"))
    assert search_main(["--index", str(tmp_path / "idx"), "a query"]) == 2
    err = capsys.readouterr().err
    assert "128-d" in err and "384-d" in err


def test_rerun_with_the_same_config_reuses_the_index(built, embed_output):
    folder, first = built["hnsw"]
    again = run(_cfg(embed_output[0], folder, "index.type=hnsw"))
    assert [(s.name, s.resumed) for s in again.stages] == [("build", True)]
    assert (again.read, again.kept, again.rejected) == (first.read, first.kept, first.rejected)


def test_impossible_config_fails_before_any_work_naming_the_key(embed_output, tmp_path):
    cfg = _cfg(embed_output[0], tmp_path / "out", "index.type=ivf_pq", "index.pq.m=50")
    with pytest.raises(
        IndexConfigError, match=r"index\.pq\.m: 50 does not divide the dimension 384"
    ):
        run(cfg)
    assert not (tmp_path / "out").exists()
    proc = subprocess.run(
        [sys.executable, "ray_jobs/build_index.py", "--config", str(CONFIG)]
        + [f"input.path={embed_output[0]}", f"output.path={tmp_path / 'out'}", "index.type=ivf_pq"]
        + ["index.pq.nbits=12"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode != 0 and "index.pq.nbits" in proc.stderr
    assert not (tmp_path / "out").exists()
