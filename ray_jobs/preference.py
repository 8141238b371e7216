"""Preference optimisation on Ray Train (DPO/IPO, KTO, ORPO; LoRA or full; DeepSpeed ZeRO 0-3) through TRL.

python -m workloads.train.preference.job make-pairs --out data/preferences.jsonl
python ray_jobs/preference.py --config ray_jobs/configs/preference/dpo-lora-cpu.yaml [key=value ...]
ray job submit --working-dir . -- python ray_jobs/preference.py --config ray_jobs/configs/preference/dpo-lora-8b.yaml
"""

import sys

from workloads.common.entrypoint import run_job
from workloads.train.preference.config import PreferenceJobConfig
from workloads.train.preference.job import run

if __name__ == "__main__":
    sys.exit(run_job(PreferenceJobConfig, run, description=__doc__))
