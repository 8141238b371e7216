"""Group-wise work on Ray Data without a Python call per group.

`partitioned(ds, keys, n, fn)` hash-partitions `ds` on `keys` into `n` blocks and calls `fn` once per
block: every row of a key lands in the same block. This is how Ray Data's own `map_groups` works
(`repartition(n, keys=...)`, then `map_batches(batch_size=None)`), less its per-group Python call:
`fn` handles all the groups of its block at once with numpy (sort, then `group_starts`). A dedup
stage's groups are mostly of one or two rows, so a call per group would cost more than the work.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa


def partitioned(ds, keys: list[str], num_partitions: int, fn: Callable[..., pa.Table], **kwargs):
    """`fn(block, **kwargs)` on each of `num_partitions` hash partitions of `ds` by `keys`."""
    return ds.repartition(num_partitions, keys=keys).map_batches(
        fn, batch_format="pyarrow", batch_size=None, fn_kwargs=kwargs or None
    )


def group_starts(*keys: np.ndarray) -> np.ndarray:
    """For rows sorted by `keys`: True where a row's keys differ from the previous row's."""
    n = len(keys[0])
    starts = np.ones(n, dtype=bool)
    if n > 1:
        same = np.ones(n - 1, dtype=bool)
        for k in keys:
            same &= k[1:] == k[:-1]
        starts[1:] = ~same
    return starts


def flags(mask: np.ndarray) -> pa.Array:
    """True where `mask`, null elsewhere: a column whose non-null count the stage's Parquet footers
    hold (`OutputLayout.footer_stats`), so counting it reads no data."""
    return pa.array(np.where(mask, True, None) if len(mask) else [], pa.bool_())
