"""Paths on any filesystem pyarrow knows (local, s3://, gs://), and the stage layout of a job's output.

A job's output folder looks like this:

    <output.path>/
      _manifest.json          config, versions, wall time per stage, counts (see manifest.py)
      rejects/                malformed input records, each with `reject_reason`
      <result folders>/       e.g. kept/, removed/
      _stages/<name>/         intermediate stages; each finished stage holds `_SUCCESS.json`

A stage folder counts as finished only when its `_SUCCESS.json` exists and carries the fingerprint of
the config that produced it, so a rerun resumes at the first missing (or stale) stage.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import posixpath
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

if TYPE_CHECKING:
    from workloads.common.manifest import JobManifest

log = logging.getLogger(__name__)

GLOB_CHARS = "*?["
SUCCESS_MARKER = "_SUCCESS.json"


EMPTY_FILE = "empty.parquet"  # what write_dataset leaves for a stage without rows


class InputNotFoundError(FileNotFoundError):
    """The configured input path does not exist or holds no readable files."""


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/key."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    local = pafs.LocalFileSystem()
    return local, posixpath.abspath(posixpath.expanduser(uri))


def _is_hidden(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root) if root else path
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def expand_input_paths(uri: str, extensions: tuple[str, ...]) -> tuple[pafs.FileSystem, list[str]]:
    """Expand a file, folder (recursively) or glob into a sorted list of files.

    Files and folders whose names start with `_` or `.` (markers, checksums) are skipped inside
    folders and globs. Raises InputNotFoundError naming the path when nothing matches.
    """
    fs, path = resolve_filesystem(uri)
    if any(c in path for c in GLOB_CHARS):
        parts = path.split("/")
        first_glob = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
        base = "/".join(parts[:first_glob]) or "/"
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            raise InputNotFoundError(f"input.path {uri!r}: folder {base!r} does not exist")
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        files = sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and fnmatch.fnmatchcase(i.path, path)
            and not _is_hidden(i.path, base)
        )
        if not files:
            raise InputNotFoundError(f"input.path {uri!r} matches no files")
        return fs, files
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputNotFoundError(f"input.path {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        return fs, [path]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.endswith(extensions)
        and not _is_hidden(i.path, path)
    )
    if not files:
        raise InputNotFoundError(
            f"input.path {uri!r} holds no files ending in {', '.join(extensions)}"
        )
    return fs, files


@dataclass
class FooterStats:
    """What a stage's Parquet footers say (`OutputLayout.footer_stats`)."""

    rows: int
    non_null: dict[str, int]  # per column: values that are not null
    max: dict[str, Any]  # per column: the largest value (None: no values)


@dataclass
class StageResult:
    name: str
    path: str
    resumed: bool
    info: dict[str, Any]


class OutputLayout:
    """The output folder of one job run: stage folders, success markers and the manifest."""

    def __init__(
        self, uri: str, fingerprint: str, overwrite: bool = False, task_footer_reads: bool = False
    ):
        """`task_footer_reads`: read stages with Ray Data's first Parquet reader (see
        `read_dataset`); the job must then filter with `where`, not `Dataset.filter(expr=...)`."""
        self.uri = uri.rstrip("/")
        self.fs, self.root = resolve_filesystem(self.uri)
        self.fingerprint = fingerprint
        self.overwrite = overwrite
        self.task_footer_reads = task_footer_reads
        self.fs.create_dir(self.root, recursive=True)

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def uri_of(self, name: str) -> str:
        """Where `name` is, for another process: a URI in object storage, an absolute local path
        (Ray Train workers do not run in the driver's working directory)."""
        return posixpath.join(self.uri, name) if "://" in self.uri else self.path(name)

    def _marker(self, name: str) -> str:
        return posixpath.join(self.path(name), SUCCESS_MARKER)

    def read_json(self, path: str) -> dict[str, Any] | None:
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def write_json(self, path: str, payload: dict[str, Any]) -> None:
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(json.dumps(payload, indent=2, sort_keys=True, default=str).encode())

    def finished(self, name: str) -> dict[str, Any] | None:
        """The marker of a stage finished with this config, or None."""
        if self.overwrite:
            return None
        marker = self.read_json(self._marker(name))
        if marker is None or marker.get("fingerprint") != self.fingerprint:
            return None
        return marker

    def clear(self, name: str) -> None:
        path = self.path(name)
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    def write_dataset(self, ds, folder: str, schema, min_bytes_per_file: int | None = None) -> None:
        """`ds.write_parquet(folder)`, plus one empty file with `schema` when `ds` has no rows, so
        that readers of every output (the next stage, the user) always find a typed Parquet table.
        `min_bytes_per_file` merges small blocks into fewer files, so the next stage runs fewer
        read tasks."""
        import pyarrow.parquet as pq

        ds.write_parquet(folder, filesystem=self.fs, min_bytes_per_file=min_bytes_per_file)
        if not any(
            i.path.endswith(".parquet") for i in self.fs.get_file_info(pafs.FileSelector(folder))
        ):
            with self.fs.open_output_stream(posixpath.join(folder, EMPTY_FILE)) as f:
                pq.write_table(schema.empty_table(), f)

    def read_dataset(self, name: str, columns: list[str] | None = None):
        """The Parquet stage `name` as a Ray Dataset.

        With `task_footer_reads`, read with Ray Data's first Parquet reader
        (`use_datasource_v2=False`), which reads the footers in its read tasks. The second one
        provisions a pool of 32 footer-reading actors for every read
        (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS), new processes each time: measured on 2 cores, a
        read of a stage of a few files took 1.5 to 2 s against 0.4 s, and a job of a dozen
        stages reads some twenty times. The first reader has one flaw the job must avoid: an
        expression filter pushed down into it that matches nothing yields blocks without a
        schema, and a join on them fails; `where` filters in a map instead."""
        import pyarrow.parquet as pq
        import ray.data
        from ray.data import DataContext

        files = sorted(
            i.path
            for i in self.fs.get_file_info(pafs.FileSelector(self.path(name)))
            if i.path.endswith(".parquet")
        )
        if [posixpath.basename(f) for f in files] == [EMPTY_FILE]:  # written by write_dataset
            with self.fs.open_input_file(files[0]) as f:
                empty = pq.read_table(f, columns=columns)
            return ray.data.from_arrow(empty)  # typed, where a read of it would have no columns
        ctx = DataContext.get_current()
        before = ctx.use_datasource_v2
        ctx.use_datasource_v2 = before and not self.task_footer_reads
        try:
            return ray.data.read_parquet(
                files,  # as listed above: Ray Data need not list the folder again
                filesystem=self.fs,
                columns=columns,
                # A task per file, not Ray Data's 200 blocks at least: a stage's files are sized
                # for its readers already, and split blocks cost a task each (~20 ms).
                **({"override_num_blocks": len(files)} if self.task_footer_reads else {}),
            )
        finally:
            ctx.use_datasource_v2 = before

    def count_rows(self, name: str) -> int:
        """Rows in the Parquet stage `name`, from the file footers: no data is read."""
        import pyarrow.dataset as pads

        return pads.dataset(self.path(name), format="parquet", filesystem=self.fs).count_rows()

    def footer_stats(self, name: str, columns: list[str]) -> FooterStats:
        """Rows of the Parquet stage `name`, and the non-null count and largest value of each of
        its top-level `columns`, from the row groups' statistics in the file footers: each footer
        is read once and no data is read. Stages mark what they count (a removed document, a
        changed edge) with a column that is null everywhere else."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pads
        import pyarrow.parquet as pq

        rows = 0
        non_null = dict.fromkeys(columns, 0)
        maxima: dict[str, list] = {c: [] for c in columns}
        dataset = pads.dataset(self.path(name), format="parquet", filesystem=self.fs)
        for path in dataset.files:
            with self.fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            rows += meta.num_rows
            groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
            for column in columns:
                index = meta.schema.names.index(column)
                stats = [g.column(index).statistics for g in groups]
                if all(s is not None and s.has_null_count for s in stats):
                    non_null[column] += sum(
                        g.num_rows - s.null_count for g, s in zip(groups, stats, strict=True)
                    )
                    maxima[column] += [s.max for s in stats if s.has_min_max]
                else:  # a writer without statistics: read this file's column
                    values = pq.read_table(path, columns=[column], filesystem=self.fs)[column]
                    non_null[column] += len(values) - values.null_count
                    if len(values) > values.null_count:
                        maxima[column].append(pc.max(values).as_py())
        return FooterStats(rows, non_null, {c: max(m, default=None) for c, m in maxima.items()})

    def non_null(self, name: str, column: str) -> int:
        """Non-null values of a top-level `column` in the stage, from the footers (`footer_stats`)."""
        return self.footer_stats(name, [column]).non_null[column]

    def run_stage(
        self,
        name: str,
        produce: Callable[[str], dict[str, Any] | None],
        manifest: JobManifest | None = None,
        attempts: int = 3,
    ) -> StageResult:
        """Run `produce(folder)` unless the stage is finished; record its returned info in the marker.

        A stale or half-written folder is deleted first, so a stage never mixes two runs' files. When
        Ray loses a worker, actor, node or object under the stage (beyond what Ray Data's own task
        retries absorb), the stage is redone from an empty folder, up to `attempts` times: every
        stage is a deterministic function of finished stages, so the redo writes the same rows.
        """
        timing = manifest.stage(name) if manifest is not None else nullcontext(SimpleNamespace())
        with timing as t:
            marker = self.finished(name)
            if marker is not None:
                t.resumed = True
                return StageResult(name, self.path(name), True, marker.get("info", {}))
            for attempt in range(1, attempts + 1):
                self.clear(name)
                self.fs.create_dir(self.path(name), recursive=True)
                try:
                    info = produce(self.path(name)) or {}
                    break
                except Exception as exc:
                    if attempt == attempts or not is_lost_ray_resource(exc):
                        raise
                    log.warning(
                        "stage %s lost a Ray resource (%s); redoing it (attempt %d of %d)",
                        name,
                        type(exc).__name__,
                        attempt + 1,
                        attempts,
                    )
            payload = {"fingerprint": self.fingerprint, "stage": name, "info": info}
            self.write_json(self._marker(name), payload)
            return StageResult(name, self.path(name), False, info)


def where(ds, predicate: Callable[[pa.Table], Any]):
    """`ds` filtered by `predicate(batch) -> boolean mask`, as a map: unlike an expression filter,
    never pushed down into a Parquet read (see OutputLayout.read_dataset), and an empty result keeps
    its columns."""
    return ds.map_batches(lambda b: b.filter(predicate(b)), batch_format="pyarrow")


def is_lost_ray_resource(exc: BaseException | None) -> bool:
    """True when `exc` (or what it wraps) says Ray lost a process, node or object, not user code."""
    try:
        from ray import exceptions as rex
    except ImportError:
        return False
    names = (
        "WorkerCrashedError",
        "ActorDiedError",
        "ActorUnavailableError",
        "ObjectLostError",
        "NodeDiedError",
        "OwnerDiedError",
        "ObjectReconstructionFailedError",
    )
    lost = tuple(getattr(rex, n) for n in names if hasattr(rex, n))
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, lost):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return False
