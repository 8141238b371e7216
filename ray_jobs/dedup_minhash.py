"""Near-duplicate removal with MinHash-LSH (exact dedup first), distributed end to end on Ray Data.

python ray_jobs/dedup_minhash.py --config ray_jobs/configs/dedup/minhash-local.yaml [key=value ...]
ray job submit --working-dir . -- python ray_jobs/dedup_minhash.py --config ray_jobs/configs/dedup/minhash-local.yaml
"""

import sys

from workloads.common.entrypoint import run_job
from workloads.data.dedup.minhash_lsh import MinHashDedupConfig, run

if __name__ == "__main__":
    sys.exit(run_job(MinHashDedupConfig, run, description=__doc__))
