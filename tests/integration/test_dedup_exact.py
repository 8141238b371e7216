"""Exact dedup on a real local Ray (shared session): what a user of the job would check."""

from __future__ import annotations

import gzip
import json
import shutil

import pyarrow.parquet as pq
import pytest

from workloads.common.config import load_config
from workloads.data.dedup.exact import DuplicateIdsError, ExactDedupConfig, run, text_hash
from workloads.data.dedup.normalize import NormalizeConfig
from workloads.data.sample import score_output

REPO_CONFIG = "ray_jobs/configs/dedup_exact/local.yaml"


def _cfg(input_path, output_path, *extra) -> ExactDedupConfig:
    from tests.conftest import REPO

    return load_config(
        ExactDedupConfig,
        REPO / REPO_CONFIG,
        [f"input.path={input_path}", f"output.path={output_path}", *extra],
    )


@pytest.fixture(scope="module")
def dedup_run(ray_session, sample_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("dedup_exact")
    manifest = run(_cfg(sample_corpus / "corpus", out))
    return out, manifest


def test_planted_exact_and_reformatted_copies_are_removed_and_nothing_else(
    dedup_run, sample_corpus
):
    out, manifest = dedup_run
    truth = json.loads((sample_corpus / "planted.json").read_text())
    removed = {r["id"]: r["duplicate_of"] for r in pq.read_table(out / "removed").to_pylist()}
    rows = {name: (planted, found) for name, planted, found in score_output(truth, out)}
    for kind in ("exact", "reformat"):
        planted, found = rows[f"duplicates: {kind}"]
        assert planted > 0 and found == planted
    assert rows["duplicates: near"][1] == 0  # word edits are MinHash's job, not exact dedup's
    assert rows["removed but not planted"] == (0, 0)
    assert all(
        found == planted for name, (planted, found) in rows.items() if name.startswith("rejected")
    )
    # The keeper is the lowest id of its group, and is itself kept.
    kept_ids = set(pq.read_table(out / "kept", columns=["id"])["id"].to_pylist())
    assert all(keeper in kept_ids and keeper < dup for dup, keeper in removed.items())


def test_kept_documents_are_unique_and_complete(dedup_run):
    out, _ = dedup_run
    kept = pq.read_table(out / "kept").to_pylist()
    hashes = [text_hash(r["text"], NormalizeConfig()) for r in kept]
    assert len(hashes) == len(set(hashes))
    assert {"id", "text", "meta", "source", "line"} == set(kept[0])
    assert json.loads(kept[0]["meta"])["source"].split(":")[0] in {"pydoc", "stdlib"}


def test_manifest_counts_reconcile_with_outputs(dedup_run, sample_corpus):
    out, manifest = dedup_run
    truth = json.loads((sample_corpus / "planted.json").read_text())
    written = json.loads((out / "_manifest.json").read_text())
    counts = written["counts"]
    assert counts["read"] == truth["records"]
    assert counts["reconciled"] is True
    assert counts["kept"] == len(pq.read_table(out / "kept", columns=["id"]))
    assert counts["dropped"]["exact_duplicate"] == len(pq.read_table(out / "removed"))
    assert sum(counts["rejected"].values()) == len(truth["malformed"])
    assert counts["read"] == counts["kept"] + counts["dropped"]["exact_duplicate"] + sum(
        counts["rejected"].values()
    )
    assert [s["name"] for s in written["stages"]] == [
        "_stages/ingest",
        "rejects",
        "_stages/hash_groups",
        "removed",
        "kept",
    ]
    assert (
        written["config"]["input"]["path"].endswith("corpus")
        and written["versions"]["ray"] == "2.60.0"
    )


def test_rerun_resumes_every_stage_with_identical_output(dedup_run, sample_corpus):
    out, first = dedup_run
    again = run(_cfg(sample_corpus / "corpus", out))
    assert all(s.resumed for s in again.stages)
    assert (again.read, again.kept, again.dropped, again.rejected) == (
        first.read,
        first.kept,
        first.dropped,
        first.rejected,
    )


def test_lost_stage_is_recomputed_on_rerun(dedup_run, sample_corpus, tmp_path):
    out, first = dedup_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "kept")  # as if the job died while writing kept/
    again = run(_cfg(sample_corpus / "corpus", copy))
    assert [s.name for s in again.stages if not s.resumed] == ["kept"]
    assert sorted(pq.read_table(copy / "kept", columns=["id"])["id"].to_pylist()) == sorted(
        pq.read_table(out / "kept", columns=["id"])["id"].to_pylist()
    )


def test_parquet_input(ray_session, dedup_run, tmp_path):
    out, first = dedup_run
    # The kept Parquet output is itself a valid input, and has nothing left to remove.
    again = run(_cfg(out / "kept", tmp_path / "p"))
    assert again.kept == first.kept and again.dropped == {} and again.rejected == {}
    assert (
        len(pq.read_table(tmp_path / "p" / "rejects")) == 0
    )  # empty outputs are still typed tables


def test_gzip_jsonl_and_positional_ids(ray_session, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    with gzip.open(
        folder / "docs.jsonl.gz", "wb"
    ) as f:  # compression by extension, bad lines included
        f.write(b'{"id": "g1", "text": "same"}\n{"id": "g2", "text": "same"}\n{oops\n')
    (folder / "a.jsonl").write_text('{"text": "x"}\n{"text": "x"}\n{"text": "y"}\n')  # no ids
    m = run(_cfg(folder, tmp_path / "o"))
    assert (m.read, m.kept, m.dropped, m.rejected) == (
        6,
        3,
        {"exact_duplicate": 2},
        {"malformed_json": 1},
    )
    removed = sorted(pq.read_table(tmp_path / "o" / "removed").to_pylist(), key=lambda r: r["id"])
    assert removed == [
        {"id": "a.jsonl:2", "duplicate_of": "a.jsonl:1"},
        {"id": "g2", "duplicate_of": "g1"},
    ]


def test_duplicate_ids_are_refused_not_silently_kept(ray_session, tmp_path):
    src = tmp_path / "in" / "a.jsonl"
    src.parent.mkdir()
    src.write_text('{"id": "same", "text": "x"}\n{"id": "same", "text": "x"}\n')
    with pytest.raises(DuplicateIdsError, match="input.id_field=null"):
        run(_cfg(src.parent, tmp_path / "o"))
