"""MinHash-LSH dedup on a real local Ray (shared session): duplicates found against exact Jaccard and
the planted variants, outputs consistent with each other, resume, components on Ray, and a worker
killed in the middle of the job."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO
from workloads.common.config import ConfigError, load_config
from workloads.common.manifest import JobManifest
from workloads.common.storage import OutputLayout
from workloads.data.dedup.components import EDGE_SCHEMA, connected_components
from workloads.data.dedup.minhash_lsh import MinHashDedupConfig, run
from workloads.data.sample import read_corpus_texts, score_output

pytestmark = pytest.mark.slow
CONFIG = REPO / "ray_jobs/configs/dedup/minhash-local.yaml"


def _cfg(input_path, output_path, *extra) -> MinHashDedupConfig:
    return load_config(
        MinHashDedupConfig,
        CONFIG,
        [f"input.path={input_path}", f"output.path={output_path}", *extra],
    )


def _shingles(text: str, n: int = 5) -> set[str]:
    import re
    import unicodedata

    words = re.findall(r"\w+", re.sub(r"\d", "0", unicodedata.normalize("NFKC", text).lower()))
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _outputs(out) -> tuple:
    removed = sorted(pq.read_table(out / "removed").to_pylist(), key=lambda r: r["id"])
    clusters = sorted(pq.read_table(out / "clusters").to_pylist(), key=lambda r: r["id"])
    kept = sorted(pq.read_table(out / "kept", columns=["id"])["id"].to_pylist())
    return removed, clusters, kept


SHORT = [{"id": "short-1", "text": "too short"}, {"id": "short-2", "text": "far too short!"}]


@pytest.fixture(scope="module")
def minhash_input(sample_corpus, tmp_path_factory):
    """The sample corpus plus documents shorter than the 5-word shingle."""
    folder = tmp_path_factory.mktemp("minhash_input")
    for part in (sample_corpus / "corpus").glob("*.jsonl"):
        shutil.copy(part, folder / part.name)
    (folder / "short.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SHORT))
    return folder


@pytest.fixture(scope="module")
def minhash_run(ray_session, minhash_input, tmp_path_factory):
    out = tmp_path_factory.mktemp("dedup_minhash")
    return out, run(_cfg(minhash_input, out))


def test_planted_duplicates_are_found_and_nothing_unplanted_is_removed(minhash_run, sample_corpus):
    out, manifest = minhash_run
    truth = json.loads((sample_corpus / "planted.json").read_text())
    removed = {r["id"]: r["duplicate_of"] for r in pq.read_table(out / "removed").to_pylist()}
    rows = {name: (planted, found) for name, planted, found in score_output(truth, out)}
    assert rows["duplicates: exact"][1] == rows["duplicates: exact"][0] > 0
    assert rows["duplicates: reformat"][1] == rows["duplicates: reformat"][0] > 0
    assert rows["removed but not planted"] == (0, 0)
    # Every planted near pair clearly above the threshold is found; those near it may go either way.
    texts = read_corpus_texts(sample_corpus / "corpus")
    clear = [
        (a, b)
        for a, b in truth["pairs"]["near"]
        if len(_shingles(texts[a]) & _shingles(texts[b]))
        / len(_shingles(texts[a]) | _shingles(texts[b]))
        >= 0.88
    ]
    assert len(clear) >= 10
    assert all(removed.get(a, a) == removed.get(b, b) for a, b in clear)
    assert manifest.dropped["near_duplicate"] >= len(clear)


def test_outputs_agree_with_each_other_and_the_manifest(minhash_run):
    out, manifest = minhash_run
    removed, clusters, kept = _outputs(out)
    kept_ids = set(kept)
    assert all(r["duplicate_of"] in kept_ids for r in removed)  # chains resolve to a kept document
    assert not kept_ids & {r["id"] for r in removed}
    cluster_of = {c["id"]: c["cluster_id"] for c in clusters}
    assert all(cluster_of[r["id"]] == r["duplicate_of"] for r in removed)
    assert all(cluster_of[k] == k for k in {r["duplicate_of"] for r in removed})
    assert len(clusters) == len(removed) + len({r["duplicate_of"] for r in removed})
    counts = json.loads((out / "_manifest.json").read_text())["counts"]
    assert counts["reconciled"] and counts["kept"] == len(kept)
    assert counts["dropped"]["exact_duplicate"] + counts["dropped"]["near_duplicate"] == len(
        removed
    )
    assert counts["read"] == len(kept) + len(removed) + sum(counts["rejected"].values())
    extra = manifest.extra
    assert (extra["bands"], extra["rows_per_band"]) == (14, 9)
    assert extra["cc_rounds"] >= 0 and extra["oversized_buckets"] == 0


def test_rerun_resumes_every_stage(minhash_run, minhash_input):
    out, first = minhash_run
    before = _outputs(out)
    again = run(_cfg(minhash_input, out))
    assert all(s.resumed for s in again.stages)
    assert _outputs(out) == before and again.dropped == first.dropped


def test_short_documents_are_kept_and_counted(minhash_run):
    out, manifest = minhash_run
    assert manifest.extra["short_documents"] == len(SHORT)
    kept = set(pq.read_table(out / "kept", columns=["id"])["id"].to_pylist())
    assert {r["id"] for r in SHORT} <= kept  # too short to shingle: never near-deduped, never lost


def test_bad_band_config_fails_before_ray(tmp_path):
    with pytest.raises(ConfigError, match="minhash.bands"):
        _cfg(tmp_path, tmp_path / "o", "minhash.bands=20", "minhash.rows_per_band=20")


def test_connected_components_on_ray_converge_on_a_chain(ray_session, tmp_path):
    out = OutputLayout(str(tmp_path), "fp")
    chain = [(2, 1), (3, 2), (4, 3), (205, 207), (207, 203), (300, 301)]  # a path needs 2 rounds
    edges = pa.table({"u": [u for u, _ in chain], "v": [v for _, v in chain]}, schema=EDGE_SCHEMA)
    out.fs.create_dir(out.path("_stages/edges"))
    pq.write_table(edges, out.path("_stages/edges/part-0.parquet"))
    manifest = JobManifest("cc", load_config(MinHashDedupConfig, CONFIG))
    name, rounds = connected_components(
        out, manifest, lambda: out.read_dataset("_stages/edges"), num_partitions=2, max_rounds=20
    )
    comp = {r["uid"]: r["component"] for r in pq.read_table(out.path(name)).to_pylist()}
    assert rounds >= 2  # one that changes, one that confirms
    assert all(comp[n] == 1 for n in range(1, 5))
    assert comp[205] == comp[207] == comp[203] == 203 and comp[300] == comp[301] == 300


def test_a_worker_killed_mid_job_changes_nothing(minhash_run, minhash_input, tmp_path):
    """SIGKILL Ray worker processes that are running tasks while the job runs; Ray Data retries the
    tasks and the job redoes any stage that lost an actor, so the outputs equal an undisturbed run's."""
    undisturbed, _ = minhash_run
    killed: list[str] = []
    done = threading.Event()

    def killer() -> None:
        # Only processes running Ray Data operators (tasks, shuffle aggregators), never Ray's own
        # agents: killing the dashboard or runtime-env agent takes the node down, as it should.
        operator = re.compile(
            r"ray::(Read|ListFiles|MapBatches|HashAggregate|HashShuffle|JoinShuffle|Write)"
        )
        time.sleep(2)
        while not done.is_set() and len(killed) < 2:
            time.sleep(2 if killed else 0.05)  # tasks last well under a second: look often
            for p in psutil.process_iter(["cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if operator.match(cmd) and p.pid != os.getpid():
                    try:
                        os.kill(p.pid, signal.SIGKILL)
                        killed.append(cmd)
                    except ProcessLookupError:
                        continue
                    break

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        disturbed = tmp_path / "disturbed"
        run(_cfg(minhash_input, disturbed))
    finally:
        done.set()
        thread.join()
    assert killed, "no Ray worker was running a task to kill"
    assert _outputs(disturbed) == _outputs(undisturbed), killed


def test_lsh_alone_and_the_shuffle_join_find_the_same_duplicates(
    minhash_run, minhash_input, tmp_path
):
    """Without exact dedup first, LSH finds the exact copies itself (Jaccard 1, same keeper); with
    no room to broadcast the removed ids, kept/ comes from the anti-join: the outputs are the same."""
    undisturbed, first = minhash_run
    other = tmp_path / "lsh-only"
    manifest = run(_cfg(minhash_input, other, "exact.enabled=false", "broadcast_uids_mb=0"))
    assert _outputs(other) == _outputs(undisturbed)
    assert sum(manifest.dropped.values()) == sum(first.dropped.values())
    assert "exact_duplicate" not in manifest.dropped
