"""Stage markers (resume, stale config, overwrite) and the manifest's reconciliation."""

from __future__ import annotations

import json

import pytest

from workloads.common.config import DataJobConfig, InputConfig, OutputConfig
from workloads.common.manifest import CountsDoNotReconcile, JobManifest
from workloads.common.storage import OutputLayout


def _produce(calls: list[str], rows: int):
    def produce(folder: str) -> dict:
        calls.append(folder)
        with open(f"{folder}/part-0.txt", "w") as f:
            f.write("x")
        return {"rows": rows}

    return produce


def test_finished_stage_is_reused_with_its_info(tmp_path):
    calls: list[str] = []
    first = OutputLayout(str(tmp_path), "fp1").run_stage("s", _produce(calls, 5))
    again = OutputLayout(str(tmp_path), "fp1").run_stage("s", _produce(calls, 99))
    assert not first.resumed and again.resumed
    assert again.info == {"rows": 5} and len(calls) == 1


def test_stale_or_half_written_stage_is_redone_from_empty(tmp_path):
    calls: list[str] = []
    OutputLayout(str(tmp_path), "fp1").run_stage("s", _produce(calls, 5))
    (tmp_path / "s" / "leftover.txt").write_text("from the old config")
    redone = OutputLayout(str(tmp_path), "fp2").run_stage("s", _produce(calls, 7))
    assert not redone.resumed and redone.info == {"rows": 7}
    assert not (tmp_path / "s" / "leftover.txt").exists()
    # A crash before the marker is written leaves a folder that does not count as finished.
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "partial.txt").write_text("half")
    assert OutputLayout(str(tmp_path), "fp2").finished("t") is None


def test_overwrite_mode_ignores_markers(tmp_path):
    calls: list[str] = []
    OutputLayout(str(tmp_path), "fp").run_stage("s", _produce(calls, 1))
    OutputLayout(str(tmp_path), "fp", overwrite=True).run_stage("s", _produce(calls, 1))
    assert len(calls) == 2


def _manifest(**counts) -> JobManifest:
    cfg = DataJobConfig(input=InputConfig(path="in"), output=OutputConfig(path="out"))
    m = JobManifest("job", cfg)
    for k, v in counts.items():
        setattr(m, k, v)
    return m


def test_counts_that_reconcile():
    m = _manifest(read=10, kept=6, dropped={"dup": 3}, rejected={"malformed_json": 1})
    m.reconcile()
    payload = m.to_dict()
    assert payload["counts"]["reconciled"] is True
    assert payload["config"]["input"]["path"] == "in"
    assert "ray" in payload["versions"] and "python" in payload["versions"]
    json.dumps(payload)  # serialisable as written to _manifest.json
    table = m.summary_table()
    assert "dropped: dup" in table and "rejected: malformed_json" in table


def test_lost_rows_fail_reconciliation():
    m = _manifest(read=10, kept=6, dropped={"dup": 3})
    with pytest.raises(CountsDoNotReconcile, match="read 10 rows but kept 6"):
        m.reconcile()
    assert m.to_dict()["counts"]["reconciled"] is False


def test_stage_timer_records_resumed_flag():
    m = _manifest()
    with m.stage("a") as t:
        t.resumed = True
    assert m.stages[0].name == "a" and m.stages[0].resumed


def test_a_stage_that_lost_a_ray_worker_is_redone_and_a_bug_is_not(tmp_path):
    from ray.exceptions import RayTaskError, WorkerCrashedError

    calls: list[int] = []

    def flaky(folder: str) -> dict:
        calls.append(1)
        (tmp_path / "s" / f"attempt-{len(calls)}.txt").write_text("partial")
        if len(calls) == 1:
            raise RayTaskError("map", "traceback", WorkerCrashedError())
        return {"rows": 3}

    result = OutputLayout(str(tmp_path), "fp").run_stage("s", flaky)
    assert result.info == {"rows": 3} and len(calls) == 2
    assert not (tmp_path / "s" / "attempt-1.txt").exists()  # the redo started from an empty folder

    def buggy(folder: str) -> dict:
        calls.append(1)
        raise ValueError("a bug in the stage")

    with pytest.raises(ValueError):
        OutputLayout(str(tmp_path), "fp").run_stage("t", buggy)
    assert len(calls) == 3  # user errors are not retried
    assert OutputLayout(str(tmp_path), "fp").finished("t") is None
