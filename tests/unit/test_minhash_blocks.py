"""The MinHash job's per-block functions (what `partitioned` calls on each hash partition), and the
footer counts the stages report, without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workloads.common.storage import OutputLayout
from workloads.data.dedup.exact import KEPT_COLUMNS, add_text_hash
from workloads.data.dedup.minhash import MinHashConfig, ShingleConfig, estimated_jaccard
from workloads.data.dedup.minhash_lsh import (
    band_keys,
    bucket_block,
    cluster_block,
    exact_block,
    ingest_schema,
    lsh_band_rows,
    select_uids,
    signature_columns,
    signature_matrix,
    verify_block,
    with_uid,
)
from workloads.data.dedup.normalize import NormalizeConfig
from workloads.data.dedup.partition import group_starts

TEXT = (
    "the quick brown fox jumps over the lazy dog and runs far away into the green hills where "
    "the shepherd counts his sheep every evening before the sun goes down behind the old mill "
    "and the river carries the last light of the day towards the sea"
)
MINHASH = MinHashConfig()


def _ingested(rows) -> pa.Table:
    """(id, text, reject_reason) rows -> what the ingest stage writes."""
    batch = pa.table(
        {
            "id": [r[0] for r in rows],
            "text": pa.array([r[1] for r in rows], pa.string()),
            "meta": pa.nulls(len(rows), pa.string()),
            "source": ["a.jsonl"] * len(rows),
            "line": list(range(1, len(rows) + 1)),
            "reject_reason": pa.array([r[2] for r in rows], pa.string()),
            "raw": pa.nulls(len(rows), pa.string()),
        }
    )
    batch = add_text_hash(batch, normalize=NormalizeConfig())
    return signature_columns(batch, shingle=ShingleConfig(), minhash=MINHASH, bands=14, rows=9)


def test_signatures_are_null_for_rejects_and_short_documents_which_are_counted():
    t = _ingested([("a", TEXT, None), ("b", "too short", None), ("c", None, "malformed_json")])
    assert t.schema.equals(ingest_schema(MINHASH).remove_metadata(), check_metadata=False) or set(
        t.schema.names
    ) == set(ingest_schema(MINHASH).names)
    assert t["signature"].to_pylist()[1:] == [None, None]
    assert t["too_short"].to_pylist() == [None, True, None]  # a reject is not "short"
    assert t["length"].to_pylist()[0] == len(TEXT)
    keys = band_keys(t["signature"], 14, 9)
    assert keys.null_count == 2 and len(keys[0].as_py()) == 14
    assert t["bands"].to_pylist() == keys.to_pylist()


def test_uids_are_unique_per_source_and_line():
    t = pa.table({"source": ["b", "a", "b"], "line": [1, 1, 2], "id": ["x", "y", "z"]})
    out = with_uid(t, sources=pa.array(["a", "b"]), columns=["uid", "id"])
    assert out["uid"].to_pylist() == [(1 << 40) | 1, 1, (1 << 40) | 2]


def _exact_input(rows):
    t = _ingested(rows)
    return with_uid(t, sources=pa.array(["a.jsonl"]), columns=["uid", "id", "text_hash", "bands"])


def test_exact_block_keeps_the_lowest_id_per_text_and_bands_only_the_kept():
    t = _exact_input([("d2", TEXT, None), ("d1", TEXT, None), ("d3", TEXT + " more", None)])
    out = {r["id"]: r for r in exact_block(t).to_pylist()}
    assert out["d2"]["duplicate_of"] == "d1" and out["d1"]["duplicate_of"] is None
    assert out["d2"]["bands"] is None and len(out["d1"]["bands"]) == 14
    assert out["d3"]["duplicate_of"] is None
    assert all(r["same_id"] is None for r in out.values())


def test_exact_block_flags_copies_that_share_their_keepers_id():
    t = _exact_input([("same", TEXT, None), ("same", TEXT, None)])
    assert exact_block(t)["same_id"].to_pylist().count(True) == 1


def test_band_rows_and_buckets_emit_a_star_to_the_minimum_never_a_clique():
    uid = pa.array([7, 3, 9, 4], pa.int64())
    keys = pa.array([[1, 2], [1, 5], [1, 2], [6, 7]], pa.list_(pa.uint64()))
    rows = lsh_band_rows(pa.table({"uid": uid, "bands": keys}))
    # Pre-aggregated in the map: one row per (band, key) of the batch, with its members.
    got = sorted((r["band"], r["band_hash"], r["uids"]) for r in rows.to_pylist())
    assert got == [(0, 1, [3, 7, 9]), (0, 6, [4]), (1, 2, [7, 9]), (1, 5, [3]), (1, 7, [4])]
    out = bucket_block(rows, max_bucket_size=2).to_pylist()
    edges = sorted((r["u"], r["v"]) for r in out if r["size"] is None)
    buckets = sorted((r["u"], r["size"], r["oversized"]) for r in out if r["size"] is not None)
    # band 0, key 1: {3, 7, 9} -> 7-3, 9-3 (not 7-9); band 1, key 2: {7, 9} -> 9-7
    assert edges == [(7, 3), (9, 3), (9, 7)]
    assert buckets == [(3, 3, 3), (7, 2, None)]  # the bucket of 3 is over max_bucket_size=2


def test_a_bucket_split_over_map_batches_is_joined_in_its_partition():
    first = lsh_band_rows(pa.table({"uid": pa.array([8, 6], pa.int64()), "bands": [[5], [5]]}))
    second = lsh_band_rows(pa.table({"uid": pa.array([2], pa.int64()), "bands": [[5]]}))
    out = bucket_block(pa.concat_tables([first, second]), max_bucket_size=10).to_pylist()
    assert sorted((r["u"], r["v"]) for r in out if r["size"] is None) == [(6, 2), (8, 2)]
    assert [r["size"] for r in out if r["size"] is not None] == [3]


def test_bucket_edges_found_in_several_bands_are_written_once():
    rows = pa.table(
        {
            "band": pa.array([0, 1], pa.int32()),
            "band_hash": pa.array([5, 6], pa.uint64()),
            "uids": pa.array([[1, 2], [1, 2]], pa.list_(pa.int64())),
        }
    )
    edges = [r for r in bucket_block(rows, max_bucket_size=10).to_pylist() if r["size"] is None]
    assert [(r["u"], r["v"]) for r in edges] == [(2, 1)]


def _members(texts_by_uid, component, ids, lengths=None):
    t = _ingested([(f"x{u}", text, None) for u, text in texts_by_uid.items()])
    n = len(texts_by_uid)
    return pa.table(
        {
            "uid": pa.array(list(texts_by_uid), pa.int64()),
            "component": pa.array([component] * n, pa.int64()),
            "id": ids,
            "length": pa.array(lengths or [len(x) for x in texts_by_uid.values()], pa.int64()),
            "signature": t["signature"],
        }
    )


def test_verify_keeps_the_lowest_id_and_rejects_a_false_positive():
    near = TEXT.replace("far", "very far")
    other = "an entirely different sentence about parquet footers and stars"
    block = _members({1: TEXT, 2: near, 3: other}, component=1, ids=["b", "a", "c"])
    out = {
        r["id"]: r
        for r in verify_block(block, keep="lowest_id", threshold=0.5, enabled=True).to_pylist()
    }
    assert out["a"]["keeper"] and out["a"]["duplicate"] is None
    assert out["b"]["keeper_id"] == "a" and out["b"]["duplicate"]
    assert out["c"]["duplicate"] is None and out["c"]["keeper"] is None  # Jaccard too low
    unverified = verify_block(block, keep="lowest_id", threshold=0.5, enabled=False)
    assert unverified["duplicate"].to_pylist().count(True) == 2


def test_verify_can_keep_the_longest():
    block = _members({1: TEXT, 2: TEXT + " today"}, component=1, ids=["a", "b"])
    out = verify_block(block, keep="longest", threshold=0.5, enabled=True)
    assert set(out["keeper_id"].to_pylist()) == {"b"}


def test_verify_jaccard_is_the_signature_estimate():
    block = _members({1: TEXT, 2: TEXT.replace("lazy", "sleepy")}, component=1, ids=["a", "b"])
    sig = signature_matrix(block["signature"])
    out = verify_block(block, keep="lowest_id", threshold=0.0, enabled=True)
    assert out["jaccard"].to_pylist()[1] == np.float32(estimated_jaccard(sig[1], sig[0]))


def test_documents_are_selected_by_a_broadcast_uid_set():
    batch = pa.table({c: pa.array([f"{c}{i}" for i in range(4)]) for c in KEPT_COLUMNS})
    batch = batch.append_column("uid", pa.array([5, 1, 9, 3], pa.int64()))
    kept = select_uids(batch, uids=np.array([1, 9], np.int64), keep=False, columns=KEPT_COLUMNS)
    assert kept.column_names == KEPT_COLUMNS and kept["id"].to_pylist() == ["id0", "id3"]
    chosen = select_uids(batch, uids=np.array([1, 9], np.int64), keep=True, columns=["uid"])
    assert chosen["uid"].to_pylist() == [1, 9]
    nothing = np.empty(0, np.int64)
    assert select_uids(batch, uids=nothing, keep=False, columns=["uid"]).num_rows == 4


def test_clusters_name_each_keeper_once():
    removed = pa.table({"id": ["b", "c", "e"], "duplicate_of": ["a", "a", "d"]})
    out = sorted((r["id"], r["cluster_id"]) for r in cluster_block(removed).to_pylist())
    assert out == [("a", "a"), ("b", "a"), ("c", "a"), ("d", "d"), ("e", "d")]


def test_group_starts():
    a = np.array([1, 1, 2, 2, 2])
    b = np.array([1, 2, 2, 2, 3])
    assert group_starts(a).tolist() == [True, False, True, False, False]
    assert group_starts(a, b).tolist() == [True, True, True, False, True]
    assert group_starts(np.array([], np.int64)).tolist() == []


def test_footer_counts_of_flag_columns(tmp_path):
    out = OutputLayout(str(tmp_path), "fp")
    folder = tmp_path / "stage"
    folder.mkdir()
    for i, flags in enumerate([[True, None, True], [None, None]]):
        pq.write_table(
            pa.table(
                {"f": pa.array(flags, pa.bool_()), "n": pa.array([i] * len(flags), pa.int64())}
            ),
            folder / f"part-{i}.parquet",
        )
    stats = out.footer_stats("stage", ["f", "n"])
    assert out.non_null("stage", "f") == stats.non_null["f"] == 2
    assert out.count_rows("stage") == stats.rows == 5
    assert stats.max["n"] == 1
    pq.write_table(  # a writer without statistics: the column is read instead
        pa.table({"f": pa.array([True], pa.bool_()), "n": pa.array([7], pa.int64())}),
        folder / "part-2.parquet",
        write_statistics=False,
    )
    stats = out.footer_stats("stage", ["f", "n"])
    assert out.non_null("stage", "f") == stats.non_null["f"] == 3 and stats.max["n"] == 7
    assert stats.rows == 6
