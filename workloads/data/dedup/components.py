"""Connected components of a duplicate graph, distributed: large-star / small-star rounds (Kiveris et
al., "Connected Components in MapReduce and Beyond", SoCC 2014; the algorithm text-dedup's Spark job
uses). No step gathers the edges on the driver or on one worker: each star step is one hash-partitioned
shuffle (`partitioned`), and every node's edges are handled, vectorised, in the block that holds it.

Edges are (u, v) int64 pairs with u > v. A round is large-star then small-star in one Ray Data
execution, written to `_stages/cc/round-<k>`, so a rerun resumes at the first unfinished round. Every
output edge carries `changed` (null when the steps left it as it was); a round in which neither step
changed anything is the fixed point: a star forest centred on each component's minimum node. Rounds:
O(log^2 n) in theory, two or three on real duplicate graphs (LSH buckets already emit stars), the last
of them the one that confirms.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from workloads.common.manifest import JobManifest
from workloads.common.storage import OutputLayout
from workloads.data.dedup.partition import flags, group_starts, partitioned

EDGE_SCHEMA = pa.schema([("u", pa.int64()), ("v", pa.int64())])
ROUND_SCHEMA = EDGE_SCHEMA.append(pa.field("changed", pa.bool_()))
COMPONENT_SCHEMA = pa.schema([("uid", pa.int64()), ("component", pa.int64())])
_LARGE_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("changed", pa.bool_())])


# Per-block steps (pure). Each block holds every edge of the nodes hashed to it.


def both_directions(batch: pa.Table) -> pa.Table:
    """(u, v) -> (x, n) rows for both u->v and v->u: every node sees all its neighbours."""
    u, v = batch["u"].to_numpy(), batch["v"].to_numpy()
    return pa.table({"x": np.concatenate([u, v]), "n": np.concatenate([v, u])})


def large_star(block: pa.Table) -> pa.Table:
    """Per node x with neighbours N(x) and m = min(N(x) + x): link every larger neighbour n > x to
    m. Changed: m < x (x had a smaller neighbour too)."""
    if not len(block):
        return pa.table({"a": [], "b": [], "changed": []}, schema=_LARGE_SCHEMA)
    x, n = block["x"].to_numpy(), block["n"].to_numpy()
    order = np.lexsort((n, x))
    x, n = x[order], n[order]
    distinct = group_starts(x, n)
    x, n = x[distinct], n[distinct]
    starts = group_starts(x)
    m = np.minimum(np.minimum.reduceat(n, np.flatnonzero(starts)), x[starts])
    m = m[np.cumsum(starts) - 1]
    keep = n > x
    return pa.table(
        {"a": n[keep], "b": m[keep], "changed": m[keep] != x[keep]}, schema=_LARGE_SCHEMA
    )


def small_star(block: pa.Table) -> pa.Table:
    """Per node a with smaller neighbours S(a) and m = min(S(a)): link a and every b in S(a) to m.
    Changed: a had two or more smaller neighbours, or large-star changed an edge of a."""
    if not len(block):
        return ROUND_SCHEMA.empty_table()
    a, b = block["a"].to_numpy(), block["b"].to_numpy()
    flag = block["changed"].to_numpy(zero_copy_only=False).astype(bool)
    order = np.lexsort((b, a))
    a, b, flag = a[order], b[order], flag[order]
    distinct = group_starts(a, b)
    starts = group_starts(a)
    first = np.flatnonzero(starts)
    group = np.cumsum(starts) - 1
    m = b[first]  # sorted: the first b of each a is its minimum
    changed = (np.add.reduceat(distinct.astype(np.int64), first) > 1) | np.logical_or.reduceat(
        flag, first
    )
    linked = distinct & (b != m[group])
    return pa.table(
        {
            "u": np.concatenate([a[first], b[linked]]),
            "v": np.concatenate([m, m[group][linked]]),
            "changed": flags(np.concatenate([changed, changed[group][linked]])),
        },
        schema=ROUND_SCHEMA,
    )


def component_rows(batch: pa.Table) -> pa.Table:
    """Converged (leaf, centre) edges -> (uid, component) for the leaves and the centres."""
    u, v = batch["u"].to_numpy(), batch["v"].to_numpy()
    return pa.table(
        {"uid": np.concatenate([u, v]), "component": np.concatenate([v, v])},
        schema=COMPONENT_SCHEMA,
    )


def distinct_nodes(block: pa.Table) -> pa.Table:
    """One (uid, component) row per node: a centre appears once per leaf before this."""
    uid, comp = block["uid"].to_numpy(), block["component"].to_numpy()
    order = np.lexsort((comp, uid))
    uid, comp = uid[order], comp[order]
    first = group_starts(uid, comp)
    return pa.table({"uid": uid[first], "component": comp[first]}, schema=COMPONENT_SCHEMA)


# Distributed steps


def star_round(edges, num_partitions: int):
    """One large-star + small-star round over a Dataset of (u, v): two shuffles, one execution."""
    large = partitioned(
        edges.map_batches(both_directions, batch_format="pyarrow"),
        ["x"],
        num_partitions,
        large_star,
    )
    return partitioned(large, ["a"], num_partitions, small_star)


def connected_components(
    out: OutputLayout,
    manifest: JobManifest,
    edges,
    num_partitions: int,
    max_rounds: int,
) -> tuple[str, int]:
    """Run rounds from `edges` (a function returning a Dataset of (u, v) edges with u > v) until one
    changes nothing; write `_stages/components` (uid, component = the component's minimum uid) and
    return (that stage's name, rounds run, the confirming one included)."""

    def step(source, name: str):
        def produce(folder: str) -> dict:
            out.write_dataset(star_round(source(), num_partitions), folder, ROUND_SCHEMA)
            stats = out.footer_stats(name, ["changed"])
            return {"edges": stats.rows, "changes": stats.non_null["changed"]}

        return produce

    current, rounds = edges, 0
    while True:
        if rounds == max_rounds:
            raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
        rounds += 1
        name = f"_stages/cc/round-{rounds:03d}"
        info = out.run_stage(name, step(current, name), manifest).info

        def current(name=name):
            return out.read_dataset(name, ["u", "v"])

        if info["changes"] == 0:
            break

    def components(folder: str) -> dict:
        rows = current().map_batches(component_rows, batch_format="pyarrow")
        out.write_dataset(
            partitioned(rows, ["uid"], num_partitions, distinct_nodes), folder, COMPONENT_SCHEMA
        )
        return {"nodes": out.count_rows("_stages/components")}

    out.run_stage("_stages/components", components, manifest)
    return "_stages/components", rounds
