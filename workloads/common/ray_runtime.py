"""Connect to the Ray cluster a job should run on.

    RAY_ADDRESS=auto python ray_jobs/dedup_exact.py ...   # join the cluster from `make cluster-up`
    python ray_jobs/dedup_exact.py ...                    # start a private local Ray for this job

Under `ray job submit` (locally or on KubeRay), Ray sets RAY_ADDRESS for the entrypoint, so the
same command joins the cluster. Without an address the job starts its own local instance rather
than silently attaching to whatever cluster happens to run on the machine.
"""

from __future__ import annotations

import logging
import os
import socket

from workloads.common.config import RayConfig
from workloads.common.manifest import JobFailed

log = logging.getLogger(__name__)

# How long an idle worker process outlives its last task on a private local Ray.
IDLE_WORKER_SECONDS = 60


def local_system_config(num_cpus: int | None) -> dict:
    """`_system_config` for a private local Ray that keeps idle worker processes warm.

    Ray Data runs shuffle map tasks and join reduce tasks with their own `runtime_env` (an env
    var each), so they cannot reuse the default workers, and Ray kills idle workers above
    `num_workers_soft_limit` (default: the CPU count) after one second. Each shuffle then paid
    for cold Python processes: measured on 2 cores, a keyed repartition of 4,000 rows took 6.5 s
    with the defaults and 0.2 s with warm workers, a join 6 s and 0.2 s, and a Parquet write
    3 s and 0.2 s. Room for four workers per CPU covers the default pool and Ray Data's two.
    Idle workers up to the soft limit are never killed, so this Ray keeps up to four per CPU
    (those that imported torch hold a GB or more): right for a job's own Ray, which ends with
    the job. On a cluster, set the same keys on `ray start` as RAY_num_workers_soft_limit and
    RAY_idle_worker_killing_time_threshold_ms (the dedup RayJob does)."""
    cpus = num_cpus or os.cpu_count() or 1
    return {
        "num_workers_soft_limit": 4 * cpus,
        "idle_worker_killing_time_threshold_ms": IDLE_WORKER_SECONDS * 1000,
    }


def init_ray(cfg: RayConfig, *, dashboard: bool = False) -> None:
    """Join `cfg.address` / $RAY_ADDRESS, else start a private local Ray. `dashboard` starts the
    dashboard with it: Ray Train's controller watchdog queries actor state through it."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            log.info("joining Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=True)
        else:
            object_store = (
                int(cfg.object_store_memory_gb * 2**30) if cfg.object_store_memory_gb else None
            )
            ports = {}
            if dashboard and "RAY_API_SERVER_ADDRESS" not in os.environ:
                # Ray's state API, which Ray Train's placement-group cleaner calls from inside
                # the cluster, finds "its" Ray by scanning the machine's processes and gives up
                # when a second Ray runs there (a `ray start` head, a test session). Name this
                # Ray's dashboard before starting it, so every process it starts inherits it.
                ports["dashboard_port"] = free_port()
                os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{ports['dashboard_port']}"
            ray.init(
                address="local",
                num_cpus=cfg.num_cpus,
                object_store_memory=object_store,
                include_dashboard=dashboard,
                _system_config=local_system_config(cfg.num_cpus),
                **ports,
            )
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.data_progress_bars


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_fixed_size_ray(cfg: RayConfig) -> bool:
    """True for a local Ray the job started itself: its CPUs are all there will be. A cluster may
    autoscale, so its size now says little."""
    return not (cfg.address or os.environ.get("RAY_ADDRESS"))


def check_cpus_left_for_tasks(cfg: RayConfig, held: float, holders: str, remedy: str) -> None:
    """On a fixed-size Ray, actor pools that hold every CPU leave none for the read and write
    tasks around them, and the job would hang: fail before any work instead."""
    import ray

    if not on_fixed_size_ray(cfg):
        return
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus - held < 1:
        raise JobFailed(
            f"the actors of {holders} hold {held:g} of {cpus:g} CPUs, leaving less than one for "
            f"reading and writing: {remedy}"
        )


def resolve_device(device: str) -> str:
    """`cuda` or `cpu` for a stage's `device` setting: `auto` means a GPU per actor when the
    cluster has GPUs (an autoscaling cluster lists the GPUs it can add)."""
    import ray

    if device == "auto":
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    return device


def max_actors(concurrency: int | tuple[int, int]) -> int:
    """The largest size of an actor pool configured as a count or as (min, max)."""
    return concurrency if isinstance(concurrency, int) else concurrency[1]
