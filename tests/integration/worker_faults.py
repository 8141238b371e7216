"""Kill a Ray Train worker mid-run, as a dead node would, once a checkpoint is committed: shared by the
SFT and preference reliability tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil


def committed_checkpoints(storage: Path, run_glob: str) -> list[str]:
    """Checkpoints Ray Train has registered (every rank's files uploaded), not folders mid-upload."""
    for snapshot in storage.glob(f"{run_glob}/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (json.JSONDecodeError, KeyError):
            continue  # being rewritten
        return [r["checkpoint_dir_name"] for r in results]
    return []


def training_workers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if cmdline.startswith("ray::RayTrainWorker"):
            found.append(p)
    return found


def run_and_kill_a_worker(
    job: Callable[[], Any], storage: Path, run_glob: str, timeout: float = 300
) -> tuple[int | None, dict[str, Any]]:
    """Run `job` in a thread; SIGKILL one training worker (no cleanup, as when a node dies) once
    the run has a committed checkpoint. Returns (killed pid or None, {"result" or "error"})."""
    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["result"] = job()
        except BaseException as exc:  # surfaced by the caller's assertions
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    killed = None
    deadline = time.monotonic() + timeout
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        if committed_checkpoints(storage, run_glob):
            workers = training_workers()
            if workers:
                killed = workers[-1].pid
                workers[-1].kill()
        time.sleep(0.1)
    thread.join(timeout=600)
    return killed, outcome
