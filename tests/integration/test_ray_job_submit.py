"""`ray job submit` against a real head node started with `ray start --head` on free ports.

This is the path every cluster user takes (local head, a VM cluster, KubeRay's RayJob), so it runs
the job exactly as the README says: the repo as working dir, the entrypoint as a command line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO
from workloads.data.sample import score_output

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # `ray start --head` turns on token auth by default (the token lives in ~/.ray/auth_token);
    # the CLI clients only send it in token mode.
    env["RAY_AUTH_MODE"] = "token"
    # As in an activated venv: the job's `python` is the one Ray and this project are installed in.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def ray_head():
    gcs, dashboard, client, node_mgr, obj_mgr, agent, agent_grpc, metrics, rt_env = _free_ports(9)
    # A worker-port window of its own, away from the session's `ray.init` cluster's default range.
    worker_lo = 40000 + (os.getpid() % 200) * 100
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray puts unix sockets here
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 (closed at teardown)
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        "--disable-usage-stats",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}",
        f"--min-worker-port={worker_lo}",
        f"--max-worker-port={worker_lo + 99}",
        f"--temp-dir={temp_dir}",
    ]
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=_env()
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 180
    while True:
        ready = subprocess.run(
            [RAY, "job", "list", "--address", address], capture_output=True, env=_env()
        )
        if ready.returncode == 0:
            break
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(
                f"ray start --head did not come up: {(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}"
            )
        time.sleep(2)
    yield address
    # `ray stop` would also stop the test session's own Ray; stop only this head's process group,
    # then anything left that belongs to its temp dir.
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in (p.info["cmdline"] or [])):
            p.kill()
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, *job_args: str) -> subprocess.CompletedProcess:
    cmd = [
        RAY,
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "ray_jobs/dedup_exact.py",
        "--config",
        "ray_jobs/configs/dedup_exact/local.yaml",
        "ray.data_progress_bars=false",
        *job_args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=REPO)


def test_dedup_exact_through_ray_job_submit(ray_head, sample_corpus, tmp_path):
    out = tmp_path / "submitted"
    result = _submit(ray_head, f"input.path={sample_corpus / 'corpus'}", f"output.path={out}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    assert "dedup_exact summary" in result.stdout  # the job's own table, streamed back

    manifest = json.loads((out / "_manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["reconciled"]
    assert counts["read"] == counts["kept"] + sum(counts["dropped"].values()) + sum(
        counts["rejected"].values()
    )

    truth = json.loads((sample_corpus / "planted.json").read_text())
    rows = {name: (planted, found) for name, planted, found in score_output(truth, out)}
    assert rows["duplicates: exact"][0] == rows["duplicates: exact"][1] > 0
    assert sum(counts["rejected"].values()) == len(truth["malformed"])


def test_a_misspelt_key_fails_the_job_before_any_work(ray_head, tmp_path):
    out = tmp_path / "never"
    result = _submit(
        ray_head, "input.path=/nonexistent", f"output.path={out}", "normalize.lowercse=true"
    )
    assert result.returncode != 0
    logs = result.stdout + result.stderr
    assert "normalize.lowercse" in logs and "did you mean 'normalize.lowercase'" in logs
    assert not out.exists()
