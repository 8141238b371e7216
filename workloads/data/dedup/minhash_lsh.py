"""Near-duplicate removal with MinHash-LSH on Ray Data, for corpora from megabytes to terabytes.

    python ray_jobs/dedup_minhash.py --config ray_jobs/configs/dedup/minhash-local.yaml
    python ray_jobs/dedup_minhash.py --config ray_jobs/configs/dedup/minhash-local.yaml \\
        input.path=s3://bucket/corpus/ output.path=s3://bucket/dedup/ minhash.threshold=0.7

Stages (Parquet under output.path; a rerun resumes at the first unfinished one):
  _stages/ingest, rejects/   one pass over the text: parse (bad records go to rejects/ with a reason),
                             exact hash, MinHash signature and LSH band keys
  _stages/exact              exact dedup first (exact.enabled): one shuffle by text hash; per hash the
                             lowest id is kept and only kept documents carry band keys on, since exact
                             copies make the largest LSH buckets
  _stages/buckets            one shuffle by (band, band_hash), members pre-aggregated per map batch:
                             a star per bucket of 2+ documents
                             (member -> the bucket's minimum uid), and a row per bucket with its size
  _stages/cc/round-*         large-star / small-star rounds until one changes nothing
  _stages/components         (uid, component = the component's minimum uid)
  _stages/verified           one join with the signatures, one shuffle by component: each member's
                             estimated Jaccard to its component's keeper
  removed/                   (id, duplicate_of): exact and near duplicates, resolved to a kept doc
  clusters/                  (id, cluster_id) for every document in a cluster of 2 or more
  kept/                      the documents that remain (id, text, meta, source, line)

Every group-wise step is one hash shuffle (`partition.partitioned`) whose blocks a numpy function
handles whole, not a Ray Data aggregate plus a join back. Counts come from the Parquet footers
(`OutputLayout.footer_stats`): a stage marks what it counts with a column that is null elsewhere. What
moves in each shuffle is small and fixed-size: ~150 bytes per document (id, hash, band keys) for
exact dedup, at most 20 bytes per (document, band) for buckets (the map side pre-aggregates: a
batch's documents that share a bucket key travel as one row), 16 bytes per edge per components
step, and the signatures of duplicate candidates only. The text is read once from the input and once from
_stages/ingest for kept/, which drops the removed documents in a map (their uids broadcast) unless
there are too many (broadcast_uids_mb), and then in an anti-join.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from workloads.common.config import DataJobConfig, StrictModel
from workloads.common.documents import list_input_files
from workloads.common.manifest import JobManifest, finish_job
from workloads.common.ray_runtime import init_ray
from workloads.common.storage import OutputLayout, where
from workloads.data.dedup.components import connected_components
from workloads.data.dedup.exact import (
    EXACT_DUPLICATE,
    INGEST_SCHEMA,
    KEPT_COLUMNS,
    KEPT_SCHEMA,
    REMOVED_SCHEMA,
    DuplicateIdsError,
    ingest_stages,
    valid_documents,
)
from workloads.data.dedup.minhash import (
    MinHashConfig,
    ShingleConfig,
    band_hashes,
    estimated_jaccard,
    minhash_signatures,
    shingle_hashes,
)
from workloads.data.dedup.normalize import NormalizeConfig
from workloads.data.dedup.partition import flags, group_starts, partitioned

NEAR_DUPLICATE = "near_duplicate"
_LINE_BITS = 40  # uid = file index << 40 | line: 2^40 lines per file, 2^23 files


class ExactFirstConfig(StrictModel):
    enabled: bool = Field(
        default=True, description="Run exact dedup before MinHash, in the same job."
    )
    normalize: NormalizeConfig = Field(
        default_factory=NormalizeConfig, description="Exact dedup's notion of same text."
    )


class MinHashDedupConfig(DataJobConfig):
    exact: ExactFirstConfig = Field(default_factory=ExactFirstConfig)
    shingle: ShingleConfig = Field(default_factory=ShingleConfig)
    minhash: MinHashConfig = Field(default_factory=MinHashConfig)
    verify: bool = Field(
        default=True,
        description="Keep a candidate whose estimated Jaccard to its cluster's keeper is below the threshold.",
    )
    keep: Literal["lowest_id", "longest"] = Field(
        default="lowest_id", description="Which document of a cluster to keep (ties: lowest id)."
    )
    max_bucket_size: int = Field(
        default=5_000,
        ge=2,
        description="Buckets above this size are counted as oversized (still star edges).",
    )
    num_partitions: int = Field(
        default=16, ge=1, le=100_000, description="Hash partitions for every group-by and join."
    )
    max_cc_rounds: int = Field(
        default=30, ge=1, description="Give up if components have not converged."
    )
    broadcast_uids_mb: int = Field(
        default=256,
        ge=0,
        description="Largest set of document uids (8 bytes each) sent to every task instead of a "
        "shuffle: the members of duplicate clusters (only their signatures then go to "
        "verification) and the removed documents (kept/ is then a map, not an anti-join that "
        "moves the text).",
    )


BUCKET_SCHEMA = pa.schema(
    [("u", pa.int64()), ("v", pa.int64()), ("size", pa.int64()), ("oversized", pa.int64())]
)
EXACT_SCHEMA = pa.schema(
    [
        ("uid", pa.int64()),
        ("id", pa.string()),
        ("duplicate_of", pa.string()),  # the exact copy kept; null for the kept one
        ("same_id", pa.bool_()),  # true where a copy has its keeper's id; else null
        ("bands", pa.list_(pa.uint64())),  # LSH band keys of kept documents with shingles
    ]
)
VERIFIED_SCHEMA = pa.schema(
    [
        ("uid", pa.int64()),
        ("id", pa.string()),
        ("component", pa.int64()),
        ("keeper_id", pa.string()),
        ("jaccard", pa.float32()),
        ("keeper", pa.bool_()),  # true for the component's keeper, else null
        ("duplicate", pa.bool_()),  # true for a verified duplicate, else null
    ]
)
CLUSTER_SCHEMA = pa.schema([("id", pa.string()), ("cluster_id", pa.string())])


def ingest_schema(minhash: MinHashConfig) -> pa.Schema:
    value = pa.uint32() if minhash.bits == 32 else pa.uint64()
    return (
        INGEST_SCHEMA.append(pa.field("length", pa.int64()))
        .append(pa.field("signature", pa.list_(value, minhash.num_perm)))
        .append(pa.field("bands", pa.list_(pa.uint64())))
        .append(pa.field("too_short", pa.bool_()))
    )


# ---------------------------------------------------------------------------------------------
# Per-batch logic


def signature_columns(
    batch: pa.Table, *, shingle: ShingleConfig, minhash: MinHashConfig, bands: int, rows: int
) -> pa.Table:
    """Ingested records -> + (length, signature, bands, too_short). Signature and band keys are null
    for rejected records and for documents with fewer tokens than the n-gram (`too_short`, kept
    and counted)."""
    text = batch["text"]
    hashes, counts = shingle_hashes(text, shingle, minhash.seed)
    sigs = minhash_signatures(hashes, counts, minhash)
    valid = np.asarray(pc.is_valid(text))
    has = counts > 0
    value = pa.uint32() if minhash.bits == 32 else pa.uint64()
    signature = pa.FixedSizeListArray.from_arrays(
        pa.array(sigs.reshape(-1), type=value), minhash.num_perm, mask=pa.array(~has)
    )
    return (
        batch.append_column("length", pc.utf8_length(text).cast(pa.int64()))
        .append_column("signature", signature)
        .append_column("bands", band_keys(signature, bands, rows))
        .append_column("too_short", flags(valid & ~has))
    )


def with_uid(batch: pa.Table, *, sources: pa.Array, columns: list[str]) -> pa.Table:
    """+ uid = index of the source file << 40 | line: unique, an int64 for every shuffle."""
    files = pc.index_in(batch["source"], value_set=sources).to_numpy().astype(np.int64)
    uid = (files << _LINE_BITS) | batch["line"].to_numpy().astype(np.int64)
    return batch.append_column("uid", pa.array(uid, pa.int64())).select(columns)


def signature_matrix(signature) -> np.ndarray:
    """Fixed-size list signatures -> (n x K) numpy, without copying; null rows hold filler."""
    signature = signature.combine_chunks() if isinstance(signature, pa.ChunkedArray) else signature
    n, width = len(signature), signature.type.list_size
    values = np.asarray(signature.values)  # the child array ignores the list's own offset
    return values[signature.offset * width : (signature.offset + n) * width].reshape(n, width)


def band_keys(signature: pa.Array, bands: int, rows: int) -> pa.Array:
    """Fixed-size signatures (nulls allowed) -> a list of `bands` LSH keys each (null stays null)."""
    signature = signature.combine_chunks() if isinstance(signature, pa.ChunkedArray) else signature
    valid = np.asarray(pc.is_valid(signature))
    n = len(signature)
    keys = band_hashes(signature_matrix(signature), bands, rows)
    offsets = np.arange(0, (n + 1) * bands, bands, dtype=np.int32)
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(keys.reshape(-1), pa.uint64()), mask=pa.array(~valid)
    )


def exact_block(block: pa.Table) -> pa.Table:
    """One hash partition of (uid, id, text_hash, bands) -> EXACT_SCHEMA rows: per text hash the
    lowest id is kept, the rest point at it; kept documents carry their band keys."""
    if not len(block):
        return EXACT_SCHEMA.empty_table()
    block = block.sort_by([("text_hash", "ascending"), ("id", "ascending")])
    h = block["text_hash"].combine_chunks()
    ids = block["id"].combine_chunks()
    n = len(block)
    starts = np.ones(n, dtype=bool)
    if n > 1:
        starts[1:] = np.asarray(pc.not_equal(h.slice(1), h.slice(0, n - 1)))
    first = np.flatnonzero(starts)
    keeper = first[np.cumsum(starts) - 1]
    keeper_id = ids.take(pa.array(keeper))
    duplicate_of = pc.if_else(pa.array(starts), pa.nulls(n, pa.string()), keeper_id)
    keys = block["bands"].combine_chunks()
    keys = pc.if_else(pa.array(starts), keys, pa.nulls(n, keys.type))
    same = ~starts & np.asarray(pc.equal(ids, keeper_id))
    return pa.table(
        {
            "uid": block["uid"],
            "id": ids,
            "duplicate_of": duplicate_of,
            "same_id": flags(same),
            "bands": keys,
        },
        schema=EXACT_SCHEMA,
    )


def lsh_band_rows(batch: pa.Table) -> pa.Table:
    """(uid, bands) -> one (band, band_hash, uids) row per bucket key of the batch: the map-side
    pre-aggregation of the bucket shuffle. The documents of a batch that share a key travel as one
    row with the list of their uids, not a row each."""
    has = pc.is_valid(batch["bands"])
    keys = batch["bands"].filter(has).combine_chunks()
    per_doc = len(keys.values) // len(keys) if len(keys) else 0
    band = np.tile(np.arange(per_doc, dtype=np.int32), len(keys))
    key = np.asarray(keys.flatten())
    uid = np.repeat(batch["uid"].filter(has).to_numpy(), per_doc)
    order = np.lexsort((uid, key, band))
    band, key, uid = band[order], key[order], uid[order]
    first = np.flatnonzero(group_starts(band, key))
    offsets = np.append(first, len(uid)).astype(np.int32)
    return pa.table(
        {
            "band": band[first],
            "band_hash": key[first],
            "uids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(uid, pa.int64())),
        }
    )


def bucket_block(block: pa.Table, *, max_bucket_size: int) -> pa.Table:
    """One hash partition of (band, band_hash, uids) -> BUCKET_SCHEMA rows: a star per bucket of two
    or more (u = member, v = the bucket's minimum uid, n-1 edges, never a clique), deduplicated in
    the partition, and a row per bucket (u = v = root) with its size, and again under `oversized`
    when it is above `max_bucket_size`. Work and memory are linear in the bucket's size."""
    if not len(block):
        return BUCKET_SCHEMA.empty_table()
    uids = block["uids"].combine_chunks()
    members = np.asarray(pc.list_value_length(uids)).astype(np.int64)
    band = np.repeat(block["band"].to_numpy(), members)
    key = np.repeat(block["band_hash"].to_numpy(), members)
    uid = np.asarray(uids.flatten())
    order = np.lexsort((uid, key, band))
    band, key, uid = band[order], key[order], uid[order]
    starts = group_starts(band, key)
    first = np.flatnonzero(starts)
    sizes = np.diff(np.append(first, len(uid)))
    root = uid[first][np.cumsum(starts) - 1]
    member = ~starts
    u, v = uid[member], root[member]
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    distinct = group_starts(u, v)
    buckets = sizes > 1
    size = sizes[buckets]
    n_edges = int(distinct.sum())
    return pa.table(
        {
            "u": np.concatenate([u[distinct], uid[first][buckets]]),
            "v": np.concatenate([v[distinct], uid[first][buckets]]),
            "size": pa.concat_arrays([pa.nulls(n_edges, pa.int64()), pa.array(size, pa.int64())]),
            "oversized": pa.concat_arrays(
                [
                    pa.nulls(n_edges, pa.int64()),
                    pa.array(np.where(size > max_bucket_size, size, None), pa.int64())
                    if len(size)
                    else pa.array([], pa.int64()),
                ]
            ),
        },
        schema=BUCKET_SCHEMA,
    )


def verify_block(block: pa.Table, *, keep: str, threshold: float, enabled: bool) -> pa.Table:
    """One hash partition of (uid, component, id, length, signature) -> VERIFIED_SCHEMA rows: per
    component the keeper (lowest id, or longest then lowest id) and every member's estimated
    Jaccard to it; a member is a duplicate when that reaches the threshold (or always, unverified)."""
    if not len(block):
        return VERIFIED_SCHEMA.empty_table()
    rank = (
        pc.negate(block["length"])
        if keep == "longest"
        else pa.array(np.zeros(len(block), np.int64))
    )
    block = block.append_column("rank", rank).sort_by(
        [("component", "ascending"), ("rank", "ascending"), ("id", "ascending")]
    )
    comp = block["component"].to_numpy()
    starts = group_starts(comp)
    keeper = np.flatnonzero(starts)[np.cumsum(starts) - 1]
    sig = signature_matrix(block["signature"])
    jac = estimated_jaccard(sig, sig[keeper]).astype(np.float32)
    ids = block["id"].combine_chunks()
    duplicate = ~starts & ((jac >= threshold) if enabled else True)
    return pa.table(
        {
            "uid": block["uid"],
            "id": ids,
            "component": comp,
            "keeper_id": ids.take(pa.array(keeper)),
            "jaccard": jac,
            "keeper": flags(starts),
            "duplicate": flags(duplicate),
        },
        schema=VERIFIED_SCHEMA,
    )


def resolve_chain(batch: pa.Table) -> pa.Table:
    """Exact duplicates whose keeper was later removed as a near duplicate point at the final keeper."""
    final = pc.coalesce(batch["final"], batch["duplicate_of"])
    return pa.table({"id": batch["id"], "duplicate_of": final}, schema=REMOVED_SCHEMA)


def cluster_block(block: pa.Table) -> pa.Table:
    """One hash partition of removed (id, duplicate_of) by duplicate_of -> (id, cluster_id) for every
    removed document and, once, for each keeper."""
    keepers = pc.unique(block["duplicate_of"].combine_chunks())
    return pa.table(
        {
            "id": pa.chunked_array(block["id"].chunks + [keepers], pa.string()),
            "cluster_id": pa.chunked_array(block["duplicate_of"].chunks + [keepers], pa.string()),
        },
        schema=CLUSTER_SCHEMA,
    )


def in_uids(uid: np.ndarray, uids: np.ndarray) -> np.ndarray:
    """Which of `uid` are in the sorted `uids`."""
    if not len(uids):
        return np.zeros(len(uid), dtype=bool)
    at = np.minimum(np.searchsorted(uids, uid), len(uids) - 1)
    return uids[at] == uid


def sorted_uids(ds) -> np.ndarray:
    """The distinct `uid` values of a Dataset, sorted, on the driver: only for sets that the caller
    has checked are small (`broadcast_uids_mb`)."""
    chunks = [
        b["uid"]
        for b in ds.select_columns(["uid"]).iter_batches(batch_format="numpy", batch_size=None)
    ]
    return np.unique(np.concatenate(chunks)) if chunks else np.empty(0, np.int64)


def select_uids(batch: pa.Table, *, uids: np.ndarray, keep: bool, columns: list[str]) -> pa.Table:
    """Rows (with uid) whose uid is in the sorted `uids` (keep) or not in it (drop), as `columns`."""
    found = in_uids(batch["uid"].to_numpy(), uids)
    return batch.filter(pa.array(found if keep else ~found)).select(columns)


# ---------------------------------------------------------------------------------------------
# The job


def run(cfg: MinHashDedupConfig) -> JobManifest:
    files = list_input_files(cfg.input)  # a missing input fails here, before Ray starts
    bands, rows = cfg.minhash.band_params()
    manifest = JobManifest("dedup_minhash", cfg)
    out = OutputLayout(
        cfg.output.path,
        cfg.fingerprint(),
        overwrite=cfg.output.mode == "overwrite",
        task_footer_reads=True,
    )
    init_ray(cfg.ray)
    read, write, stage = out.read_dataset, out.write_dataset, out.run_stage
    parts = cfg.num_partitions

    # 1. One pass over the text: parse, exact hash, MinHash signature, band keys.
    manifest.read, manifest.rejected = ingest_stages(
        out,
        manifest,
        cfg.input,
        files,
        cfg.exact.normalize,
        extra=(
            signature_columns,
            {"shingle": cfg.shingle, "minhash": cfg.minhash, "bands": bands, "rows": rows},
        ),
        schema=ingest_schema(cfg.minhash),
    )
    n_rejected = sum(manifest.rejected.values())
    n_docs = manifest.read - n_rejected
    n_short = out.non_null("_stages/ingest", "too_short")
    sig_info = {"documents": n_docs, "signatures": n_docs - n_short, "short_documents": n_short}
    # Input files by name (a canonical input keeps its records' original source): uid = file, line.
    distinct = read("_stages/ingest", ["source"]).map_batches(
        lambda b: pa.table({"source": pc.unique(b["source"].combine_chunks())}),
        batch_format="pyarrow",
    )
    sources = pa.array(sorted({r["source"] for r in distinct.take_all()}), pa.string())

    def documents(columns: list[str]):
        """Valid documents, with their uid, as `columns`."""
        needed = list(dict.fromkeys(["source", "line", *[c for c in columns if c != "uid"]]))
        return valid_documents(out, needed).map_batches(
            with_uid, batch_format="pyarrow", fn_kwargs={"sources": sources, "columns": columns}
        )

    # 2. Exact copies: one shuffle by text hash; each partition keeps the lowest id per hash.
    exact_removed = 0
    if cfg.exact.enabled:

        def exact(folder: str) -> dict:
            docs = documents(["uid", "id", "text_hash", "bands"])
            write(
                partitioned(docs, ["text_hash"], parts, exact_block),
                folder,
                EXACT_SCHEMA,
            )
            stats = out.footer_stats("_stages/exact", ["duplicate_of", "same_id"])
            return {
                "rows": stats.rows,
                "removed": stats.non_null["duplicate_of"],
                "same_id": stats.non_null["same_id"],
            }

        exact_info = stage("_stages/exact", exact, manifest).info
        exact_removed = exact_info["removed"]
        if exact_info["same_id"]:
            raise DuplicateIdsError(
                f"{exact_info['same_id']} documents share both their text and their id "
                f"({cfg.input.id_field!r}) with another. Ids must be unique; set "
                "input.id_field=null to use <file>:<line> ids."
            )

    def exact_copies(columns: list[str]):
        """Documents that exact dedup removed (`duplicate_of` set)."""
        return where(read("_stages/exact", columns), lambda b: pc.is_valid(b["duplicate_of"]))

    def lsh_documents():
        if cfg.exact.enabled:
            return where(
                read("_stages/exact", ["uid", "duplicate_of", "bands"]),
                lambda b: pc.is_null(b["duplicate_of"]),
            )
        return documents(["uid", "bands"])

    # 3. LSH buckets -> star edges: one shuffle by (band, band_hash).
    def buckets(folder: str) -> dict:
        band_rows = lsh_documents().map_batches(lsh_band_rows, batch_format="pyarrow")
        write(
            partitioned(
                band_rows,
                ["band", "band_hash"],
                parts,
                bucket_block,
                max_bucket_size=cfg.max_bucket_size,
            ),
            folder,
            BUCKET_SCHEMA,
        )
        stats = out.footer_stats("_stages/buckets", ["size", "oversized"])
        n_buckets = stats.non_null["size"]
        return {
            "buckets": n_buckets,
            "oversized_buckets": stats.non_null["oversized"],
            "largest_bucket": stats.max["size"] or 0,
            "edges": stats.rows - n_buckets,
        }

    bucket_info = stage("_stages/buckets", buckets, manifest).info
    edge_info = {"edges": bucket_info.pop("edges")}

    # 4. Connected components: large-star / small-star rounds, one execution each.
    components, rounds = connected_components(
        out,
        manifest,
        lambda: where(read("_stages/buckets", ["u", "v"]), lambda b: pc.not_equal(b["u"], b["v"])),
        parts,
        cfg.max_cc_rounds,
    )

    # 5. Verification: members joined with their signatures, one shuffle by component.
    def verified(folder: str) -> dict:
        columns = ["uid", "id", "length", "signature"]
        docs = documents(columns)
        if out.count_rows(components) * 8 <= cfg.broadcast_uids_mb * 2**20:
            # Only the candidates' signatures go into the join, not every document's.
            docs = docs.map_batches(
                select_uids,
                batch_format="pyarrow",
                fn_kwargs={"uids": sorted_uids(read(components)), "keep": True, "columns": columns},
            )
        members = read(components).join(docs, join_type="inner", num_partitions=parts, on=("uid",))
        write(
            partitioned(
                members,
                ["component"],
                parts,
                verify_block,
                keep=cfg.keep,
                threshold=cfg.minhash.threshold,
                enabled=cfg.verify,
            ),
            folder,
            VERIFIED_SCHEMA,
        )
        stats = out.footer_stats("_stages/verified", ["duplicate", "keeper"])
        n_members, n_dup = stats.rows, stats.non_null["duplicate"]
        n_components = stats.non_null["keeper"]
        return {
            "members": n_members,
            "components": n_components,
            "near_duplicates": n_dup,
            "rejected_by_verification": n_members - n_dup - n_components,
        }

    verify_info = stage("_stages/verified", verified, manifest).info

    def near_duplicates(columns: list[str]):
        """Members that verification found duplicates of their keeper."""
        return where(read("_stages/verified", columns), lambda b: pc.is_valid(b["duplicate"]))

    def near_removed():
        return near_duplicates(["id", "keeper_id", "duplicate"]).map_batches(
            lambda b: pa.table({"id": b["id"], "duplicate_of": b["keeper_id"]}),
            batch_format="pyarrow",
        )

    # 6. Outputs.
    def removed(folder: str) -> dict:
        ds = near_removed()
        if cfg.exact.enabled:
            final = near_removed().rename_columns({"id": "duplicate_of", "duplicate_of": "final"})
            chained = (
                exact_copies(["id", "duplicate_of"])
                .join(final, join_type="left_outer", num_partitions=parts, on=("duplicate_of",))
                .map_batches(resolve_chain, batch_format="pyarrow")
            )
            ds = ds.union(chained)
        write(ds, folder, REMOVED_SCHEMA)
        return {"rows": out.count_rows("removed")}

    n_removed = stage("removed", removed, manifest).info["rows"]

    def clusters(folder: str) -> dict:
        write(
            partitioned(read("removed"), ["duplicate_of"], parts, cluster_block),
            folder,
            CLUSTER_SCHEMA,
        )
        return {"rows": out.count_rows("clusters")}

    stage("clusters", clusters, manifest)

    def removed_uids() -> np.ndarray:
        """The removed documents' uids, sorted: exact copies and verified near duplicates."""
        removed_docs = near_duplicates(["uid", "duplicate"])
        if cfg.exact.enabled:
            removed_docs = removed_docs.union(exact_copies(["uid", "duplicate_of"]))
        return sorted_uids(removed_docs)

    def kept(folder: str) -> dict:
        if n_removed * 8 <= cfg.broadcast_uids_mb * 2**20:
            # Few enough to send to every task: a map over the documents, no shuffle of the text.
            ds = documents([*KEPT_COLUMNS, "uid"]).map_batches(
                select_uids,
                batch_format="pyarrow",
                fn_kwargs={"uids": removed_uids(), "keep": False, "columns": KEPT_COLUMNS},
            )
        else:
            ds = valid_documents(out, KEPT_COLUMNS).join(
                read("removed", ["id"]), join_type="left_anti", num_partitions=parts, on=("id",)
            )
        write(ds, folder, KEPT_SCHEMA)
        return {"rows": out.count_rows("kept")}

    manifest.kept = stage("kept", kept, manifest).info["rows"]
    near = n_removed - exact_removed
    manifest.dropped = {
        k: v for k, v in ((EXACT_DUPLICATE, exact_removed), (NEAR_DUPLICATE, near)) if v
    }
    manifest.outputs = {name: out.path(name) for name in ("kept", "removed", "clusters", "rejects")}
    manifest.extra = {
        "bands": bands,
        "rows_per_band": rows,
        "input_files": len(files[1]),
        **sig_info,
        **bucket_info,
        **edge_info,
        "cc_rounds": rounds,
        **verify_info,
    }
    return finish_job(manifest, out, cfg.output.keep_intermediate)
