"""Near-duplicate removal with MinHash-LSH on Ray Data, for corpora from megabytes to terabytes.

    python ray_jobs/dedup_minhash.py --config ray_jobs/configs/dedup/minhash-local.yaml
    python ray_jobs/dedup_minhash.py --config ray_jobs/configs/dedup/minhash-local.yaml \\
        input.path=s3://bucket/corpus/ output.path=s3://bucket/dedup/ minhash.threshold=0.7

Stages (Parquet under output.path; a rerun resumes at the first unfinished one):
  _stages/ingest, rejects/        parse every record; bad ones go to rejects/ with a reason
  _stages/hash_groups,            exact dedup first (exact.enabled): exact copies make the largest
  _stages/exact_removed|kept        LSH buckets, so removing them first is the cheapest speed-up
  _stages/signatures              (uid, id, length, signature[K]) for documents with >= n tokens
  _stages/buckets                 (band, band_hash) groups of 2+ documents: root = min uid, size
  _stages/edges                   a star per bucket: (uid, root) for every member but the root
  _stages/cc/round-*              large-star / small-star rounds until a min-centred star forest
  _stages/components              (uid, component)
  _stages/verified                each member against its component's keeper: estimated Jaccard
  removed/                        (id, duplicate_of): exact and near duplicates, resolved to a kept doc
  clusters/                       (id, cluster_id) for every document in a cluster of 2 or more
  kept/                           the documents that remain (id, text, meta, source, line)

What moves in each shuffle is small and fixed-size: 20 bytes per (document, band) to find buckets and
edges, 16 bytes per edge per connected-components step, and the signatures of duplicate candidates
only. Document text moves once, in the final anti-join that writes kept/.
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
from workloads.common.storage import OutputLayout
from workloads.data.dedup.components import EDGE_SCHEMA, connected_components
from workloads.data.dedup.exact import (
    EXACT_DUPLICATE,
    KEPT_COLUMNS,
    KEPT_SCHEMA,
    REMOVED_SCHEMA,
    exact_stages,
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


SIGNATURE_FIELDS = ["uid", "id", "length", "signature"]
BUCKET_SCHEMA = pa.schema(
    [("band", pa.int32()), ("band_hash", pa.uint64()), ("root", pa.int64()), ("size", pa.int64())]
)
VERIFIED_SCHEMA = pa.schema(
    [
        ("uid", pa.int64()),
        ("id", pa.string()),
        ("component", pa.int64()),
        ("keeper_id", pa.string()),
        ("jaccard", pa.float32()),
        ("duplicate", pa.bool_()),
    ]
)
CLUSTER_SCHEMA = pa.schema([("id", pa.string()), ("cluster_id", pa.string())])


def signature_schema(minhash: MinHashConfig) -> pa.Schema:
    value = pa.uint32() if minhash.bits == 32 else pa.uint64()
    return pa.schema(
        [
            ("uid", pa.int64()),
            ("id", pa.string()),
            ("length", pa.int64()),
            ("signature", pa.list_(value, minhash.num_perm)),
        ]
    )


# ---------------------------------------------------------------------------------------------
# Per-batch logic


def signature_rows(
    batch: pa.Table, *, shingle: ShingleConfig, minhash: MinHashConfig, file_index: dict[str, int]
) -> pa.Table:
    """Documents -> (uid, id, length, signature) for those with at least one shingle."""
    hashes, counts = shingle_hashes(batch["text"], shingle, minhash.seed)
    sigs = minhash_signatures(hashes, counts, minhash)
    has = counts > 0
    files = np.array([file_index[s] for s in batch["source"].to_pylist()], dtype=np.int64)
    uid = (files << _LINE_BITS) | batch["line"].to_numpy().astype(np.int64)
    value = pa.uint32() if minhash.bits == 32 else pa.uint64()
    flat = pa.array(sigs[has].reshape(-1), type=value)
    return pa.table(
        {
            "uid": uid[has],
            "id": batch["id"].filter(pa.array(has)),
            "length": pc.utf8_length(batch["text"]).filter(pa.array(has)).cast(pa.int64()),
            "signature": pa.FixedSizeListArray.from_arrays(flat, minhash.num_perm),
        }
    )


def band_rows(batch: pa.Table, *, bands: int, rows: int) -> pa.Table:
    """(uid, signature) -> one (band, band_hash, uid) row per band."""
    sig = np.asarray(batch["signature"].combine_chunks().flatten()).reshape(len(batch), -1)
    keys = band_hashes(sig, bands, rows)
    return pa.table(
        {
            "band": np.tile(np.arange(bands, dtype=np.int32), len(batch)),
            "band_hash": keys.reshape(-1),
            "uid": np.repeat(batch["uid"].to_numpy(), bands),
        }
    )


def bucket_edges(batch: pa.Table) -> pa.Table:
    """(band, band_hash, uid, root) -> (u = uid, v = root) for every member but the root."""
    keep = pc.not_equal(batch["uid"], batch["root"])
    return pa.table(
        {"u": batch["uid"].filter(keep), "v": batch["root"].filter(keep)}, schema=EDGE_SCHEMA
    )


def keep_key(batch: pa.Table, *, keep: str) -> pa.Table:
    """A sortable string whose minimum over a component is its keeper: rank, then id."""
    ids = batch["id"].to_pylist()
    if keep == "longest":
        ranks = (1 << 40) - batch["length"].to_numpy()
    else:
        ranks = np.zeros(len(ids), dtype=np.int64)
    keys = [f"{r:013d}:{i}" for r, i in zip(ranks.tolist(), ids, strict=True)]
    return batch.append_column("keep_key", pa.array(keys, pa.string()))


def verify_against_keeper(batch: pa.Table, *, threshold: float, enabled: bool) -> pa.Table:
    """Members joined with their keeper's signature -> VERIFIED_SCHEMA rows."""
    n = len(batch)
    sig = np.asarray(batch["signature"].combine_chunks().flatten()).reshape(n, -1)
    ksig = np.asarray(batch["keeper_signature"].combine_chunks().flatten()).reshape(n, -1)
    jac = estimated_jaccard(sig, ksig).astype(np.float32)
    is_keeper = pc.equal(batch["id"], batch["keeper_id"]).to_numpy(zero_copy_only=False)
    duplicate = ~is_keeper & ((jac >= threshold) if enabled else True)
    return pa.table(
        {
            "uid": batch["uid"],
            "id": batch["id"],
            "component": batch["component"],
            "keeper_id": batch["keeper_id"],
            "jaccard": jac,
            "duplicate": duplicate,
        },
        schema=VERIFIED_SCHEMA,
    )


def resolve_chain(batch: pa.Table) -> pa.Table:
    """Exact duplicates whose keeper was later removed as a near duplicate point at the final keeper."""
    final = pc.coalesce(batch["final"], batch["duplicate_of"])
    return pa.table({"id": batch["id"], "duplicate_of": final}, schema=REMOVED_SCHEMA)


# ---------------------------------------------------------------------------------------------
# The job


def run(cfg: MinHashDedupConfig) -> JobManifest:
    from ray.data.aggregate import Count, Min
    from ray.data.expressions import col

    files = list_input_files(cfg.input)  # a missing input fails here, before Ray starts
    bands, rows = cfg.minhash.band_params()
    manifest = JobManifest("dedup_minhash", cfg)
    out = OutputLayout(cfg.output.path, cfg.fingerprint(), overwrite=cfg.output.mode == "overwrite")
    init_ray(cfg.ray)
    read, write, stage = out.read_dataset, out.write_dataset, out.run_stage
    parts = cfg.num_partitions

    manifest.read, manifest.rejected = ingest_stages(
        out, manifest, cfg.input, files, cfg.exact.normalize, parts
    )
    exact_removed = 0
    if cfg.exact.enabled:
        exact = exact_stages(
            out,
            manifest,
            parts,
            cfg.input.id_field,
            removed_name="_stages/exact_removed",
            kept_name="_stages/exact_kept",
        )
        exact_removed = exact.removed

    def documents(columns: list[str]):
        if cfg.exact.enabled:
            return read("_stages/exact_kept", columns)
        return valid_documents(out, columns)

    def signatures(folder: str) -> dict:
        docs = documents(["id", "text", "source", "line"])
        sources = sorted(docs.unique("source"))  # one name per input file, not per document
        ds = docs.map_batches(
            signature_rows,
            batch_format="pyarrow",
            fn_kwargs={
                "shingle": cfg.shingle,
                "minhash": cfg.minhash,
                "file_index": {s: i for i, s in enumerate(sources)},
            },
        )
        write(ds, folder, signature_schema(cfg.minhash))
        n_docs, n_sigs = documents(["id"]).count(), read("_stages/signatures", ["uid"]).count()
        return {"documents": n_docs, "signatures": n_sigs, "short_documents": n_docs - n_sigs}

    sig_info = stage("_stages/signatures", signatures, manifest).info

    def bands_of_signatures():
        return read("_stages/signatures", ["uid", "signature"]).map_batches(
            band_rows, batch_format="pyarrow", fn_kwargs={"bands": bands, "rows": rows}
        )

    def buckets(folder: str) -> dict:
        groups = (
            bands_of_signatures()
            .groupby(["band", "band_hash"], num_partitions=parts)
            .aggregate(Min("uid", alias_name="root"), Count(alias_name="size"))
        )
        write(groups.filter(expr=col("size") > 1), folder, BUCKET_SCHEMA)
        written = read("_stages/buckets")
        return {
            "buckets": written.count(),
            "oversized_buckets": written.filter(expr=col("size") > cfg.max_bucket_size).count(),
            "largest_bucket": written.max("size") or 0,
        }

    bucket_info = stage("_stages/buckets", buckets, manifest).info

    def edges(folder: str) -> dict:
        members = bands_of_signatures().join(
            read("_stages/buckets", ["band", "band_hash", "root"]),
            join_type="inner",
            num_partitions=parts,
            on=("band", "band_hash"),
        )
        star = members.map_batches(bucket_edges, batch_format="pyarrow")
        distinct = star.groupby(["u", "v"], num_partitions=parts).count().select_columns(["u", "v"])
        write(distinct, folder, EDGE_SCHEMA)
        return {"edges": read("_stages/edges").count()}

    edge_info = stage("_stages/edges", edges, manifest).info
    components, rounds = connected_components(
        out, manifest, "_stages/edges", parts, cfg.max_cc_rounds
    )

    def verified(folder: str) -> dict:
        members = (
            read(components)
            .join(
                read("_stages/signatures", SIGNATURE_FIELDS),
                join_type="inner",
                num_partitions=parts,
                on=("uid",),
            )
            .map_batches(keep_key, batch_format="pyarrow", fn_kwargs={"keep": cfg.keep})
        )
        keepers = (
            members.groupby("component", num_partitions=parts)
            .aggregate(Min("keep_key", alias_name="keeper_key"))
            .map_batches(
                lambda b: pa.table(
                    {
                        "component": b["component"],
                        "keeper_id": pc.utf8_slice_codeunits(b["keeper_key"], 14),
                    }
                ),
                batch_format="pyarrow",
            )
        )
        keeper_sigs = members.select_columns(["id", "signature"]).rename_columns(
            {"id": "keeper_id", "signature": "keeper_signature"}
        )
        joined = members.join(
            keepers, join_type="inner", num_partitions=parts, on=("component",)
        ).join(keeper_sigs, join_type="inner", num_partitions=parts, on=("keeper_id",))
        write(
            joined.map_batches(
                verify_against_keeper,
                batch_format="pyarrow",
                fn_kwargs={
                    "threshold": cfg.minhash.threshold,
                    "enabled": cfg.verify,
                },
            ),
            folder,
            VERIFIED_SCHEMA,
        )
        v = read("_stages/verified")
        n_members = v.count()
        n_dup = v.filter(expr=col("duplicate")).count()
        n_components = v.groupby("component", num_partitions=parts).count().count()
        return {
            "members": n_members,
            "components": n_components,
            "near_duplicates": n_dup,
            "rejected_by_verification": n_members - n_dup - n_components,
        }

    verify_info = stage("_stages/verified", verified, manifest).info

    def near_removed():
        return (
            read("_stages/verified", ["id", "keeper_id", "duplicate"])
            .filter(expr=col("duplicate"))
            .map_batches(
                lambda b: pa.table({"id": b["id"], "duplicate_of": b["keeper_id"]}),
                batch_format="pyarrow",
            )
        )

    def removed(folder: str) -> dict:
        ds = near_removed()
        if cfg.exact.enabled:
            final = near_removed().rename_columns({"id": "duplicate_of", "duplicate_of": "final"})
            chained = (
                read("_stages/exact_removed")
                .join(final, join_type="left_outer", num_partitions=parts, on=("duplicate_of",))
                .map_batches(resolve_chain, batch_format="pyarrow")
            )
            ds = ds.union(chained)
        write(ds, folder, REMOVED_SCHEMA)
        return {"rows": read("removed").count()}

    n_removed = stage("removed", removed, manifest).info["rows"]

    def clusters(folder: str) -> dict:
        dups = read("removed").rename_columns({"duplicate_of": "cluster_id"})
        keepers = (
            dups.groupby("cluster_id", num_partitions=parts)
            .count()
            .map_batches(
                lambda b: pa.table({"id": b["cluster_id"], "cluster_id": b["cluster_id"]}),
                batch_format="pyarrow",
            )
        )
        write(dups.union(keepers), folder, CLUSTER_SCHEMA)
        return {"rows": read("clusters").count()}

    stage("clusters", clusters, manifest)

    def kept(folder: str) -> dict:
        ds = documents(KEPT_COLUMNS).join(
            near_removed().select_columns(["id"]),
            join_type="left_anti",
            num_partitions=parts,
            on=("id",),
        )
        write(ds, folder, KEPT_SCHEMA)
        return {"rows": read("kept").count()}

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
