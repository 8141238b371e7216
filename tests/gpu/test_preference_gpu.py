"""Preference optimisation on a CUDA GPU: DPO with QLoRA (NF4 base, bf16) and with the Ray Data
reference pass on a GPU actor, on the tiny model. Skipped without CUDA (see tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.integration.test_preference import preference_config, preferences  # noqa: F401
from workloads.train.preference.job import run

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

GPU = {"num_workers": 1, "use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 1}}


def test_dpo_qlora_on_a_gpu(ray_session, tiny_model, preferences, tmp_path):  # noqa: F811
    pytest.importorskip("bitsandbytes")
    cfg = preference_config(
        tiny_model,
        preferences,
        tmp_path / "qlora",
        method="qlora",
        deepspeed={"config": None},
        scaling=GPU,
        train={"precision": "bf16", "optim": "paged_adamw_8bit"},
    )
    extra = run(cfg).extra
    assert extra["global_step"] == 16
    assert extra["heldout_after"]["heldout/reward_accuracy"] > 0.6


def test_dpo_reference_pass_on_a_gpu_actor(ray_session, tiny_model, preferences, tmp_path):  # noqa: F811
    cfg = preference_config(
        tiny_model,
        preferences,
        tmp_path / "precomputed",
        method="full",
        deepspeed={"config": "zero2"},
        scaling=GPU,
        preference={"beta": 0.5, "reference": "precomputed"},
        reference_pass={"num_gpus": 1, "num_cpus": 1},
        train={"precision": "bf16", "learning_rate": 1e-4, "max_steps": 8},
    )
    extra = run(cfg).extra
    assert extra["reference_pass"]["pairs"] > 0
    assert extra["heldout_after"]["heldout/reward_margin"] > 0
