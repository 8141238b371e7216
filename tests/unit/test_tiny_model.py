"""The embedded tiny model: loads like a hub model, its chat template masks assistant turns."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from workloads.train.tiny import IM_END, TinyModelConfig, build_tiny_model  # noqa: E402


def test_tokenizer_round_trips_any_text(tiny_model):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    for text in (
        "def f(x):\n    return x ** 2",
        "naïve café — 東京 🚀",
        "  leading and trailing  ",
    ):
        assert tok.decode(tok(text)["input_ids"]) == text


def test_chat_template_masks_exactly_the_assistant_turn_with_its_end_token(tiny_model):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A mutable sequence."},
    ]
    enc = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    kept = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tok.decode(kept) == "A mutable sequence." + IM_END
    assert tok.eos_token == IM_END
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_model_shapes_and_untrained_loss(tiny_model):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = model.config
    assert cfg.head_dim == 64 and cfg.num_hidden_layers == 2 and cfg.model_type == "llama"
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    loss = model(ids, labels=ids).loss.item()
    # Random weights: the loss is that of a uniform guess over the vocabulary, give or take.
    assert abs(loss - math.log(cfg.vocab_size)) < 0.5


def test_rebuild_is_skipped_for_the_same_config(tiny_model, sample_corpus):
    stamp = (tiny_model / "model.safetensors").stat().st_mtime_ns
    build_tiny_model(tiny_model, corpus=sample_corpus / "corpus")
    assert (tiny_model / "model.safetensors").stat().st_mtime_ns == stamp
    assert TinyModelConfig().head_dim == 64
