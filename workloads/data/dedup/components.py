"""Connected components of a duplicate graph, distributed: large-star / small-star rounds as Ray Data
group-bys and joins (Kiveris et al., "Connected Components in MapReduce and Beyond", SoCC 2014; the
algorithm text-dedup's Spark job uses). No step gathers the edges on the driver or on one worker:
every step is a hash-partitioned aggregate or join over `num_partitions` partitions.

Edges are (u, v) int64 pairs. Each round writes its edges to `_stages/cc/round-<k>`, so a rerun resumes
at the first unfinished round. The rounds stop when the edges form a star forest whose centres are
their components' minimum nodes, the fixed point of both steps: then every u appears once, every v is
smaller than its u, and no v appears as a u. Rounds: O(log^2 n) in theory, one to three on real
duplicate graphs (LSH buckets already emit stars).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from workloads.common.manifest import JobManifest
from workloads.common.storage import OutputLayout

EDGE_SCHEMA = pa.schema([("u", pa.int64()), ("v", pa.int64())])
COMPONENT_SCHEMA = pa.schema([("uid", pa.int64()), ("component", pa.int64())])


# Per-batch steps (pure)


def both_directions(batch: pa.Table) -> pa.Table:
    """(u, v) -> (x, n) rows for both u->v and v->u: every node sees all its neighbours."""
    u, v = batch["u"], batch["v"]
    return pa.table(
        {
            "x": pa.chunked_array(u.chunks + v.chunks, pa.int64()),
            "n": pa.chunked_array(v.chunks + u.chunks, pa.int64()),
        }
    )


def larger_to_smaller(batch: pa.Table) -> pa.Table:
    """(u, v) -> (x = max, n = min)."""
    u = batch["u"].to_numpy()
    v = batch["v"].to_numpy()
    return pa.table({"x": np.maximum(u, v), "n": np.minimum(u, v)})


def large_star_emit(batch: pa.Table) -> pa.Table:
    """Rows (x, n, m) with m = min neighbour of x: link every larger neighbour n > x to min(m, x)."""
    x, n, m = (batch[c].to_numpy() for c in ("x", "n", "m"))
    keep = n > x
    return pa.table({"u": n[keep], "v": np.minimum(m, x)[keep]}, schema=EDGE_SCHEMA)


def small_star_emit(batch: pa.Table) -> pa.Table:
    """Rows (x, n, m), n < x, m = min smaller neighbour of x: link x and every such n to m."""
    x, n, m = (batch[c].to_numpy() for c in ("x", "n", "m"))
    keep = n != m
    return pa.table(
        {"u": np.concatenate([x, n[keep]]), "v": np.concatenate([m, m[keep]])}, schema=EDGE_SCHEMA
    )


def star_edges_to_components(batch: pa.Table) -> pa.Table:
    """Converged (leaf, centre) edges -> (uid, component) for the leaves and the centres."""
    u, v = batch["u"].to_numpy(), batch["v"].to_numpy()
    return pa.table(
        {"uid": np.concatenate([u, v]), "component": np.concatenate([v, v])},
        schema=COMPONENT_SCHEMA,
    )


# Distributed steps


def _distinct(ds, num_partitions: int):
    from ray.data.aggregate import Count

    return (
        ds.groupby(["u", "v"], num_partitions=num_partitions)
        .aggregate(Count())
        .select_columns(["u", "v"])
    )


def _star_step(edges, orient, emit, num_partitions: int):
    from ray.data.aggregate import Min

    directed = edges.map_batches(orient, batch_format="pyarrow")
    mins = directed.groupby("x", num_partitions=num_partitions).aggregate(Min("n", alias_name="m"))
    joined = directed.join(mins, join_type="inner", num_partitions=num_partitions, on=("x",))
    return _distinct(joined.map_batches(emit, batch_format="pyarrow"), num_partitions)


def large_star(edges, num_partitions: int):
    return _star_step(edges, both_directions, large_star_emit, num_partitions)


def small_star(edges, num_partitions: int):
    return _star_step(edges, larger_to_smaller, small_star_emit, num_partitions)


def is_star_forest(edges, num_partitions: int) -> bool:
    """Every u once, v < u, and no v is also a u: each component is a star around its minimum."""
    from ray.data.aggregate import Count
    from ray.data.expressions import col

    if edges.filter(expr=col("v") >= col("u")).count():
        return False
    repeated = edges.groupby("u", num_partitions=num_partitions).aggregate(Count(alias_name="k"))
    if repeated.filter(expr=col("k") > 1).count():
        return False
    centres = edges.select_columns(["v"]).rename_columns({"v": "u"})
    leaves = edges.select_columns(["u"])
    return (
        centres.join(
            leaves, join_type="left_semi", num_partitions=num_partitions, on=("u",)
        ).count()
        == 0
    )


def connected_components(
    out: OutputLayout, manifest: JobManifest, edges_stage: str, num_partitions: int, max_rounds: int
) -> tuple[str, int]:
    """Run large-star then small-star until the edges of `edges_stage` form a min-centred star forest;
    write `_stages/components` (uid, component) and return (that stage's name, rounds run)."""

    def check(source: str):
        def produce(folder: str) -> dict:
            return {"converged": is_star_forest(out.read_dataset(source), num_partitions)}

        return produce

    def step(source: str, star, name: str):
        def produce(folder: str) -> dict:
            out.write_dataset(star(out.read_dataset(source), num_partitions), folder, EDGE_SCHEMA)
            return {"edges": out.read_dataset(name).count()}

        return produce

    current, rounds = edges_stage, 0
    # The check's marker lives inside the stage it checks, so redoing that stage invalidates it.
    while not out.run_stage(f"{current}/_check", check(current), manifest).info["converged"]:
        if rounds == max_rounds:
            raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
        rounds += 1
        large, small = (
            f"_stages/cc/round-{rounds:03d}-large",
            f"_stages/cc/round-{rounds:03d}-small",
        )
        out.run_stage(large, step(current, large_star, large), manifest)
        out.run_stage(small, step(large, small_star, small), manifest)
        current = small

    def components(folder: str) -> dict:
        comp = out.read_dataset(current).map_batches(
            star_edges_to_components, batch_format="pyarrow"
        )
        comp = comp.groupby(["uid", "component"], num_partitions=num_partitions).count()
        out.write_dataset(comp.select_columns(["uid", "component"]), folder, COMPONENT_SCHEMA)
        return {"nodes": out.read_dataset("_stages/components").count()}

    out.run_stage("_stages/components", components, manifest)
    return "_stages/components", rounds
