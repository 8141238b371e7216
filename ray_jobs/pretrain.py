"""Pretrain a small causal LM from scratch on Ray Train, measured against a unigram baseline.

python ray_jobs/pretrain.py --config ray_jobs/configs/pretrain/tiny-cpu.yaml [key=value ...]
ray job submit --working-dir . -- python ray_jobs/pretrain.py --config ray_jobs/configs/pretrain/cluster.yaml
"""

import sys

from workloads.common.entrypoint import run_job
from workloads.train.pretrain import PretrainJobConfig, run

if __name__ == "__main__":
    sys.exit(run_job(PretrainJobConfig, run, description=__doc__))
