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

from workloads.common.config import RayConfig
from workloads.common.manifest import JobFailed

log = logging.getLogger(__name__)


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
            ray.init(
                address="local",
                num_cpus=cfg.num_cpus,
                object_store_memory=object_store,
                include_dashboard=dashboard,
            )
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.data_progress_bars


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
