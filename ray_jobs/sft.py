"""Supervised fine-tuning on Ray Train (full, LoRA/DoRA, QLoRA; DeepSpeed ZeRO 0-3) through TRL.

python -m workloads.train.sft make-instructions --out data/instructions.jsonl
python ray_jobs/sft.py --config ray_jobs/configs/sft/lora-cpu.yaml [key=value ...]
ray job submit --working-dir . -- python ray_jobs/sft.py --config ray_jobs/configs/sft/lora-8b.yaml
"""

import sys

from workloads.common.entrypoint import run_job
from workloads.train.sft import SFTJobConfig, run

if __name__ == "__main__":
    sys.exit(run_job(SFTJobConfig, run, description=__doc__))
