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

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
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
                include_dashboard=False,
            )
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.data_progress_bars
