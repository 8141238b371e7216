"""Fine-tune an embedding model on (query, positive[, negative]) pairs with in-batch negatives, on Ray Train.

python -m workloads.train.embedder make-pairs --out data/pairs.jsonl
python ray_jobs/finetune_embedder.py --config ray_jobs/configs/finetune_embedder/default.yaml [key=value ...]
ray job submit --working-dir . -- python ray_jobs/finetune_embedder.py --config ray_jobs/configs/finetune_embedder/cluster.yaml
"""

import sys

from workloads.common.entrypoint import run_job
from workloads.train.embedder import FinetuneEmbedderConfig, run

if __name__ == "__main__":
    sys.exit(run_job(FinetuneEmbedderConfig, run, description=__doc__))
