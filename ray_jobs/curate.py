"""Curation: exact and MinHash dedup, Gopher/C4/FineWeb quality, language, toxicity and PII steps.

python ray_jobs/curate.py --config ray_jobs/configs/curate/default.yaml [key=value ...]
ray job submit --working-dir . -- python ray_jobs/curate.py --config ray_jobs/configs/curate/default.yaml
"""

import sys

from workloads.common.entrypoint import run_job
from workloads.data.filters.pipeline import CurateConfig, run

if __name__ == "__main__":
    sys.exit(run_job(CurateConfig, run, description=__doc__))
