"""Ray Tune sweeps over LoRA hyperparameters (ASHA by default), each trial an SFT or DPO run on Ray Train.

python ray_jobs/tune_lora.py --config ray_jobs/configs/tune_lora/sft-cpu.yaml [key=value ...]
ray job submit --working-dir . -- python ray_jobs/tune_lora.py --config ray_jobs/configs/tune_lora/sft-8b.yaml
"""

import sys

from workloads.common.entrypoint import run_job
from workloads.train.tune import LoraSweepConfig, run

if __name__ == "__main__":
    sys.exit(run_job(LoraSweepConfig, run, description=__doc__))
