"""Train a linear probe on sentence embeddings of labelled texts; report held-out accuracy and F1.

python -m workloads.embed.classify make-sample --out data/labelled.jsonl
python ray_jobs/train_probe.py --config ray_jobs/configs/train_probe/default.yaml [key=value ...]
ray job submit --working-dir . -- python ray_jobs/train_probe.py --config ray_jobs/configs/train_probe/cluster.yaml
"""

import sys

from workloads.common.entrypoint import run_job
from workloads.embed.classify import TrainProbeConfig, run

if __name__ == "__main__":
    sys.exit(run_job(TrainProbeConfig, run, description=__doc__))
