"""A private Ray head started with `ray start --head` on free ports, beside the test session's Ray.

Used by the tests that go through Ray's own command line (`ray job submit`, `serve run`): the path
every cluster user takes. `ray stop` would also stop the session's Ray, so teardown stops only this
head's process group and whatever else runs from its temp dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def worker_port_window(size: int = 100) -> int:
    """The first port of `size` free ports for the head's workers.

    The window lies between the session's `ray.init` cluster's default worker range (10002-19999)
    and the kernel's ephemeral range, which `free_ports` and every outgoing connection draw from:
    a window inside the ephemeral range can hold a port that `free_ports` just handed to another
    component of the same head (Ray refuses to start then) or that a client socket holds.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    starts = list(range(20000, low - size + 1, size))
    if not starts:
        raise RuntimeError(f"no room for {size} worker ports below the ephemeral range ({low})")
    first = os.getpid() % len(starts)
    for start in starts[first:] + starts[:first]:
        if all(_bindable(port) for port in range(start, start + size)):
            return start
    raise RuntimeError(f"no {size} free ports for Ray workers between 20000 and {low}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # `ray start --head` turns on token auth by default (the token lives in ~/.ray/auth_token);
    # the CLI clients only send it in token mode.
    env["RAY_AUTH_MODE"] = "token"
    # As in an activated venv: the job's `python` is the one Ray and this project are installed in.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@dataclass(frozen=True)
class RayHead:
    gcs_address: str  # for `ray.init` / `serve run --address`
    dashboard_address: str  # for `ray job submit --address`
    metrics_port: int  # Prometheus text of this node: http://127.0.0.1:<port>/metrics
    temp_dir: str
    env: dict[str, str]


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, **env: str) -> Iterator[RayHead]:
    """`ray start --head --block` on free ports; `env` is the environment of the head (and so of
    every worker it starts)."""
    gcs, dashboard, client, node_mgr, obj_mgr, agent, agent_grpc, metrics, rt_env = free_ports(9)
    worker_lo = worker_port_window()
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray puts unix sockets here
    log_path = Path(temp_dir) / "ray-start.log"
    head_env = cli_env(**env)
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        f"--num-cpus={num_cpus}",
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
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=head_env
        )
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 180
        while True:
            ready = subprocess.run(
                [RAY, "job", "list", "--address", address], capture_output=True, env=head_env
            )
            if ready.returncode == 0:
                break
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"ray start --head did not come up: {log_path.read_text()[-3000:]}")
            time.sleep(2)
        try:
            yield RayHead(f"127.0.0.1:{gcs}", address, metrics, temp_dir, head_env)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            for p in psutil.process_iter(["cmdline"]):
                with contextlib.suppress(psutil.Error):
                    if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                        p.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


SERVE = str(Path(sys.executable).with_name("serve"))


def _status(url: str) -> int | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


@contextlib.contextmanager
def serve_run(
    head: RayHead, config: Path, ready_urls: list[str], log_path: Path, timeout: float = 480
) -> Iterator[subprocess.Popen]:
    """`serve run --address <head> <config>` from the repository root, as a user runs a serve
    config, until every URL in `ready_urls` answers 200; on exit, SIGTERM (serve run then shuts
    its applications down)."""
    repo = Path(__file__).resolve().parents[2]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [SERVE, "run", "--address", head.gcs_address, str(config)],
            cwd=repo,
            env=head.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.time() + timeout
            while [_status(u) for u in ready_urls] != [200] * len(ready_urls):
                if proc.poll() is not None or time.time() > deadline:
                    proc.kill()
                    pytest.fail(f"serve run did not become ready: {log_path.read_text()[-5000:]}")
                time.sleep(3)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
