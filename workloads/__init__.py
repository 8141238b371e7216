"""The LLM full stack as Ray workloads: data, training, tuning, evaluation and serving.

Start at the README; every job is `python ray_jobs/<job>.py --config <yaml> [key=value ...]`.
"""

__version__ = "0.1.0"
