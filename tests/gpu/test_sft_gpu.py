"""SFT on a CUDA GPU: QLoRA (bitsandbytes NF4 base, bf16 compute, paged AdamW) and LoRA under ZeRO-2
with NCCL, on the tiny model. Skipped without CUDA (see tests/conftest.py)."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_sft import instructions, sft_config  # noqa: F401  (fixture)
from workloads.train.sft import run

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

GPU = {"num_workers": 1, "use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 1}}


def test_qlora_trains_a_4bit_base_on_a_gpu(ray_session, tiny_model, instructions, tmp_path):  # noqa: F811
    pytest.importorskip("bitsandbytes")
    cfg = sft_config(
        tiny_model,
        instructions,
        tmp_path / "qlora",
        method="qlora",
        deepspeed={"config": None},
        scaling=GPU,
        train={"precision": "bf16", "optim": "paged_adamw_8bit"},
    )
    manifest = run(cfg)
    assert manifest.extra["global_step"] == 12
    assert manifest.extra["last_loss"] < manifest.extra["first_loss"]
    adapter = json.loads((tmp_path / "qlora" / "model" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"


def test_lora_under_zero2_with_nccl(ray_session, tiny_model, instructions, tmp_path):  # noqa: F811
    cfg = sft_config(
        tiny_model,
        instructions,
        tmp_path / "lora-gpu",
        scaling=GPU,
        train={"precision": "bf16"},
    )
    manifest = run(cfg)
    assert manifest.extra["global_step"] == 12
    assert manifest.extra["last_loss"] < manifest.extra["first_loss"]
