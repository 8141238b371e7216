"""Training configs, per-batch logic and outputs of the SFT and pretraining jobs, without Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from tests.conftest import REPO
from workloads.common.config import ConfigError, load_config
from workloads.common.documents import DOCUMENT_SCHEMA, MALFORMED_JSON
from workloads.train import conversations
from workloads.train.config import DeepSpeedConfig, ModelConfig, load_tokenizer
from workloads.train.pretrain import (
    NO_TOKENS,
    PretrainJobConfig,
    token_blocks,
    tokenize_documents,
    unigram_perplexity,
)
from workloads.train.ray_train import _is_training_state, run_name, write_training_curves
from workloads.train.sft import SFTJobConfig, tokenize_conversations
from workloads.train.tiny import IM_END, train_tokenizer

CPU_SFT = REPO / "ray_jobs" / "configs" / "sft" / "lora-cpu.yaml"
TEXTS = [
    "Lists are mutable sequences. Tuples are immutable sequences of values.",
    "A dictionary maps hashable keys to values; sets hold unique hashable items.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# Configs fail before any work, naming the key


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method=qlora", "method: qlora"),
        ("train.precision=fp16", "train.precision"),
        ("train.optim=paged_adamw_8bit", "train.optim"),
        ("deepspeed.offload_params=true", "offload_params"),
        ("deepspeed.config=zero9", "zero9"),
        ("lora.target_modules=[]", "lora.target_modules"),
        ("model.chat_template=nowhere.jinja", "model.chat_template"),
        ("data.formating=alpaca", "did you mean 'data.formatting'"),
    ],
)
def test_bad_sft_configs_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("'", ".")):
        load_config(SFTJobConfig, CPU_SFT, [override])


def test_qlora_on_cpu_says_what_to_do():
    with pytest.raises(ConfigError) as err:
        load_config(SFTJobConfig, CPU_SFT, ["method=qlora"])
    assert "scaling.use_gpu=true" in str(err.value) and "method: lora" in str(err.value)


def test_qlora_validates_on_gpu():
    cfg = load_config(SFTJobConfig, CPU_SFT, ["method=qlora", "scaling.use_gpu=true"])
    assert cfg.method == "qlora" and cfg.quantization.quant_type == "nf4"


def test_deepspeed_configs_by_name_with_offload():
    for stage in range(4):
        assert DeepSpeedConfig(config=f"zero{stage}").stage == stage
    # Only ZeRO-3 trades CPU speed for returning freed host memory, unless asked.
    assert DeepSpeedConfig(config="zero3").releases_host_memory()
    assert not DeepSpeedConfig(config="zero2").releases_host_memory()
    assert DeepSpeedConfig(config="zero2", release_host_memory="on").releases_host_memory()
    assert not DeepSpeedConfig().releases_host_memory()
    small = DeepSpeedConfig(config="zero3-small").load()["zero_optimization"]
    assert small["stage"] == 3 and small["stage3_max_live_parameters"] < 1e9
    ds = DeepSpeedConfig(config="zero3", offload_optimizer=True, offload_params=True).load()
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    # Every value the Trainer knows is "auto", so the JSON never contradicts the YAML.
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_clipping"] == "auto"
    assert DeepSpeedConfig().load() is None


def test_pretrain_block_longer_than_positions_is_refused():
    with pytest.raises(ConfigError, match="data.block_size"):
        load_config(
            PretrainJobConfig,
            REPO / "ray_jobs" / "configs" / "pretrain" / "tiny-cpu.yaml",
            ["data.block_size=4096"],
        )


def test_run_name_survives_checkpoint_settings_but_not_the_recipe():
    base = load_config(SFTJobConfig, CPU_SFT)
    same = load_config(SFTJobConfig, CPU_SFT, ["checkpoint.max_failures=5", "storage_path=/x"])
    other = load_config(SFTJobConfig, CPU_SFT, ["train.learning_rate=0.1"])
    assert run_name("sft", base) == run_name("sft", same) != run_name("sft", other)


# ---------------------------------------------------------------------------------------------
# The shipped Llama 3 template passes the assistant-mask check


def test_llama3_generation_template_masks_replies_and_eot(tokenizer, tmp_path):
    llama_like = train_tokenizer(TEXTS, vocab_size=400)
    llama_like.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    llama_like.eos_token = "<|eot_id|>"
    llama_like.save_pretrained(tmp_path)
    template = REPO / "ray_jobs" / "configs" / "chat_templates" / "llama3-generation.jinja"
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path), chat_template=str(template)))
    conversations.check_chat_template(loaded)  # raises if a reply or its <|eot_id|> is unmasked


# ---------------------------------------------------------------------------------------------
# Per-batch logic


def _documents(rows: list[dict]) -> pa.Table:
    full = [
        {"id": None, "text": None, "meta": None, "source": "f", "line": i, "reject_reason": None}
        | {"raw": None}
        | row
        for i, row in enumerate(rows)
    ]
    return pa.Table.from_pylist(full, schema=DOCUMENT_SCHEMA)


def test_tokenize_conversations_keeps_every_row_and_its_reason(tokenizer_dir):
    good = {
        "messages": [
            {"role": "user", "content": "Lists?"},
            {"role": "assistant", "content": "Mutable."},
        ]
    }
    batch = _documents(
        [
            {"id": "a", "text": json.dumps(good)},
            {"id": "b", "text": json.dumps({"instruction": "Say hi", "output": "hi"})},
            {"id": "c", "text": json.dumps({"messages": [{"role": "user", "content": "x"}]})},
            {"id": "d", "reject_reason": MALFORMED_JSON, "raw": '{"messages": ['},
        ]
    )
    out = tokenize_conversations(
        batch,
        model=ModelConfig(name_or_path=str(tokenizer_dir)).model_dump_json(),
        formatting="auto",
        max_length=64,
        assistant_only_loss=True,
        eval_fraction=0.0,
        seed=0,
    ).to_pylist()
    assert [r["id"] for r in out] == ["a", "b", "c", "d"]
    assert [r["reject_reason"] for r in out] == [
        None,
        None,
        conversations.NO_ASSISTANT_TURN,
        MALFORMED_JSON,
    ]
    assert out[2]["raw"] and out[3]["raw"] == '{"messages": ['
    a = out[0]
    assert (
        a["split"] == "train" and len(a["input_ids"]) == len(a["assistant_masks"]) == a["n_tokens"]
    )
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tokenizer_dir)))
    learnt = [t for t, m in zip(a["input_ids"], a["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(learnt) == "Mutable." + IM_END


def test_held_out_split_is_stable(tokenizer_dir):
    batch = _documents(
        [
            {"id": f"r{i}", "text": json.dumps({"instruction": "q", "output": "a"})}
            for i in range(200)
        ]
    )
    kwargs = dict(
        model=ModelConfig(name_or_path=str(tokenizer_dir)).model_dump_json(),
        formatting="alpaca",
        max_length=32,
        assistant_only_loss=True,
        eval_fraction=0.25,
        seed=3,
    )
    first = tokenize_conversations(batch, **kwargs)["split"].to_pylist()
    reversed_batch = tokenize_conversations(batch.take(list(range(199, -1, -1))), **kwargs)
    assert first == reversed_batch["split"].to_pylist()[::-1]  # by id, not by position
    assert 25 < first.count("eval") < 75


def test_tokenize_documents_appends_end_of_text_and_drops_empty(tokenizer_dir):
    batch = _documents(
        [
            {"id": "a", "text": "Lists are mutable."},
            {"id": "b", "text": ""},
            {"id": "c", "reject_reason": MALFORMED_JSON, "raw": "{"},
        ]
    )
    out = tokenize_documents(
        batch, tokenizer_path=str(tokenizer_dir), eval_fraction=0.01, seed=0
    ).to_pylist()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tokenizer_dir)))
    assert tokenizer.decode(out[0]["input_ids"]) == "Lists are mutable.<|endoftext|>"
    assert [r["reject_reason"] for r in out] == [None, NO_TOKENS, MALFORMED_JSON]


def test_token_blocks_concatenate_and_drop_the_tail():
    docs = pa.array([[1, 2, 3], [4, 5], [6, 7, 8, 9]], type=pa.list_(pa.int32()))
    assert token_blocks(docs, 4).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_unigram_perplexity():
    vocab = 8
    # Equal counts: every token has probability 1/8, so perplexity is the vocabulary size.
    assert unigram_perplexity(np.full(vocab, 10), np.array([[0, 1, 2, 3]]), vocab) == pytest.approx(
        8
    )
    # A skewed model is surprised by rare tokens: counts 70 for token 0, 0 elsewhere.
    counts = np.array([70] + [0] * 7)
    p0, p1 = 71 / 78, 1 / 78
    ppl = unigram_perplexity(counts, np.array([[5, 0, 1]]), vocab)  # predicts 0 and 1
    assert ppl == pytest.approx(math.exp(-(math.log(p0) + math.log(p1)) / 2))


# ---------------------------------------------------------------------------------------------
# Outputs


def test_only_the_servable_files_are_exported():
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_1.pth", "global_step40", "latest"):
        assert _is_training_state(name)
    for name in (
        "adapter_model.safetensors",
        "config.json",
        "tokenizer.json",
        "chat_template.jinja",
    ):
        assert not _is_training_state(name)


def test_training_curves(tmp_path):
    history = [
        {"loss": 3.0, "step": 5, "tokens_per_second": 100.0, "peak_memory_mb": 900.0},
        {"eval_loss": 2.9, "step": 5},
        {"loss": 2.0, "step": 10, "learning_rate": 1e-4},
        {"eval_loss": 2.1, "step": 10},
        {"train_runtime": 3.0, "step": 10},
    ]
    write_training_curves(history, str(tmp_path), pafs.LocalFileSystem())
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss,eval_loss")
    assert rows[1].startswith("5,,3.0,2.9") and rows[2].startswith("10,,2.0,2.1")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_local_paths_reach_workers_as_absolute_paths(tmp_path, monkeypatch):
    """Ray Train runs workers in the run's own folder: a relative model folder would be read there
    as a hub id, so configs turn existing local paths absolute; hub ids stay as they are."""
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        SFTJobConfig,
        CPU_SFT,
        ["model.name_or_path=models/tiny", "model.tokenizer=meta-llama/Llama-3.1-8B-Instruct"],
    )
    assert cfg.model.name_or_path == str(tmp_path / "models" / "tiny")
    assert cfg.model.tokenizer == "meta-llama/Llama-3.1-8B-Instruct"
    ds = DeepSpeedConfig(config="zero2")
    assert ds.config == "zero2" and ds.stage == 2  # a name stays a name
