"""Exact dedup: keep one document per hash of normalised text.

python ray_jobs/dedup_exact.py --config ray_jobs/configs/dedup_exact/local.yaml [key=value ...]
ray job submit --working-dir . -- python ray_jobs/dedup_exact.py --config ray_jobs/configs/dedup_exact/local.yaml
"""

import sys

from workloads.common.entrypoint import run_job
from workloads.data.dedup.exact import ExactDedupConfig, run

if __name__ == "__main__":
    sys.exit(run_job(ExactDedupConfig, run, description=__doc__))
