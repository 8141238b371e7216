"""Batch embedding: token-aware chunks with character offsets, a sentence-transformers actor pool.

python ray_jobs/embed.py --config ray_jobs/configs/embed/default.yaml [key=value ...]
ray job submit --working-dir . -- python ray_jobs/embed.py --config ray_jobs/configs/embed/default.yaml
"""

import sys

from workloads.common.entrypoint import run_job
from workloads.embed.embedding import EmbedConfig, run

if __name__ == "__main__":
    sys.exit(run_job(EmbedConfig, run, description=__doc__))
