"""Cluster an embed job's output: FAISS k-means, c-TF-IDF top terms, per-document assignments.

python ray_jobs/cluster_docs.py --config ray_jobs/configs/cluster_docs/default.yaml [key=value ...]
ray job submit --working-dir . -- python ray_jobs/cluster_docs.py --config ray_jobs/configs/cluster_docs/cluster.yaml
"""

import sys

from workloads.common.entrypoint import run_job
from workloads.embed.clustering import ClusterDocsConfig, run

if __name__ == "__main__":
    sys.exit(run_job(ClusterDocsConfig, run, description=__doc__))
