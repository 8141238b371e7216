"""Build a FAISS vector index (flat, HNSW or IVF-PQ) from the embed job's output.

python ray_jobs/build_index.py --config ray_jobs/configs/build_index/default.yaml [key=value ...]
ray job submit --working-dir . -- python ray_jobs/build_index.py --config ray_jobs/configs/build_index/cluster.yaml
"""

import sys

from workloads.common.entrypoint import run_job
from workloads.embed.index import BuildIndexConfig, run

if __name__ == "__main__":
    sys.exit(run_job(BuildIndexConfig, run, description=__doc__))
