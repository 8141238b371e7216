"""The preference job without Ray: its config rules, the per-batch preparation, the reference
log-probs against TRL's own, the held-out metrics and the demo set."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import REPO
from workloads.common.config import ConfigError, load_config
from workloads.common.documents import DOCUMENT_SCHEMA, MALFORMED_JSON
from workloads.train.config import ModelConfig
from workloads.train.preference import data as pref
from workloads.train.preference.config import PreferenceJobConfig
from workloads.train.preference.job import (
    PLANTED_BAD_RECORDS,
    preference_records,
    prepare_preferences,
    scramble,
)
from workloads.train.preference.logprobs import (
    completion_kl,
    completion_logps,
    pair_metrics,
    tokenize_pair,
)

CPU_DPO = REPO / "ray_jobs" / "configs" / "preference" / "dpo-lora-cpu.yaml"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["algorithm=kto", "preference.loss_type=ipo"], "preference.loss_type"),
        (["algorithm=orpo", "preference.reference=precomputed"], "preference.reference"),
        (["algorithm=kto", "preference.reference=precomputed"], "preference.reference"),
        (["preference.desirable_weight=2"], "desirable_weight"),
        (["preference.label_smoothing=0.1"], "preference.label_smoothing"),
        (["method=qlora", "scaling.use_gpu=true", "preference.reference=precomputed"], "qlora"),
        (["data.formatting=unpaired"], "data.formatting"),
        (["algorithm=kto", "train.batch_size=1"], "train.batch_size"),
        (["method=qlora"], "method: qlora"),
        (["preference.beta=0"], "preference.beta"),
        (["algorithm=simpo"], "algorithm"),
        (["preference.refrence=online"], "did you mean 'preference.reference'"),
    ],
)
def test_bad_preference_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("'", ".")):
        load_config(PreferenceJobConfig, CPU_DPO, overrides)


def test_each_algorithm_validates_with_its_own_options():
    ipo = load_config(PreferenceJobConfig, CPU_DPO, ["preference.loss_type=ipo"])
    assert ipo.preference.loss_type == "ipo" and not ipo.precomputes_reference
    pre = load_config(PreferenceJobConfig, CPU_DPO, ["preference.reference=precomputed"])
    assert pre.precomputes_reference
    kto = load_config(
        PreferenceJobConfig,
        CPU_DPO,
        ["algorithm=kto", "data.formatting=unpaired", "preference.undesirable_weight=1.3"],
    )
    assert kto.preference.undesirable_weight == 1.3
    assert load_config(PreferenceJobConfig, CPU_DPO, ["algorithm=orpo"]).algorithm == "orpo"


# ---------------------------------------------------------------------------------------------
# Per-batch preparation


def _documents(rows: list[dict]) -> pa.Table:
    full = [
        {"id": None, "text": None, "meta": None, "source": "f", "line": i, "reject_reason": None}
        | {"raw": None}
        | row
        for i, row in enumerate(rows)
    ]
    return pa.Table.from_pylist(full, schema=DOCUMENT_SCHEMA)


def _prepare(tiny_model, rows, *, algorithm="dpo", max_length=256) -> list[dict]:
    batch = _documents([{"id": f"r{i}", "text": json.dumps(r)} for i, r in enumerate(rows)])
    out = prepare_preferences(
        batch,
        model=ModelConfig(name_or_path=str(tiny_model)).model_dump_json(),
        algorithm=algorithm,
        formatting="auto",
        min_margin=1.0,
        max_length=max_length,
        eval_fraction=0.5,
        seed=0,
    )
    assert out.num_rows == batch.num_rows  # one row per record, kept or not
    return out.to_pylist()


def test_prepare_keeps_every_record_with_its_reason(tiny_model):
    good = {"prompt": "What is a list?", "chosen": "A mutable sequence.", "rejected": "A cat."}
    unpaired = {"prompt": "What is a set?", "completion": "Unique items.", "label": True}
    rows = _prepare(tiny_model, [good, unpaired, *PLANTED_BAD_RECORDS])
    reasons = [r["reject_reason"] for r in rows]
    assert reasons == [
        None,
        pref.UNPAIRED_RECORD,  # DPO needs pairs
        pref.IDENTICAL_COMPLETIONS,
        pref.MISSING_REJECTED,
        pref.EMPTY_COMPLETION,
        pref.MARGIN_TOO_SMALL,
    ]
    kept = rows[0]
    assert kept["kind"] == "pair" and kept["split"] in ("train", "eval")
    assert json.loads(kept["prompt"]) == [{"role": "user", "content": good["prompt"]}]
    assert json.loads(kept["chosen"]) == [{"role": "assistant", "content": good["chosen"]}]
    assert kept["prompt_tokens"] > 0 and kept["completion_tokens"] > 0
    assert all(r["raw"] for r in rows[1:]) and all(r["split"] is None for r in rows[1:])


def test_prepare_for_kto_keeps_unpaired_records_and_pairs(tiny_model):
    unpaired = {"prompt": "What is a set?", "completion": "Unique items.", "label": False}
    pair = {"prompt": "What is a list?", "chosen": "A mutable sequence.", "rejected": "A cat."}
    rows = _prepare(tiny_model, [unpaired, pair], algorithm="kto")
    assert [(r["kind"], r["label"], r["reject_reason"]) for r in rows] == [
        ("unpaired", False, None),
        ("pair", None, None),
    ]


def test_a_prompt_that_fills_max_length_is_rejected_not_dropped(tiny_model):
    long = {"prompt": "word " * 300, "chosen": "Yes.", "rejected": "No."}
    rows = _prepare(tiny_model, [long], max_length=64)
    assert rows[0]["reject_reason"] == pref.PROMPT_TOO_LONG


def test_a_template_that_raises_is_a_reject(tiny_model, tmp_path):
    """Jinja templates raise on what they do not support (here a system turn, as Gemma's and
    Mistral's older templates do): that record is rejected, the job goes on."""
    from workloads.train.tiny import CHAT_TEMPLATE

    template = tmp_path / "no-system.jinja"
    template.write_text(
        "{%- if messages[0]['role'] == 'system' %}"
        "{{- raise_exception('System role not supported') }}{%- endif %}" + CHAT_TEMPLATE
    )
    system = {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is a list?"},
        ],
        "chosen": [{"role": "assistant", "content": "A sequence."}],
        "rejected": [{"role": "assistant", "content": "A cat."}],
    }
    plain = {"prompt": "What is a list?", "chosen": "A sequence.", "rejected": "A cat."}
    batch = _documents(
        [{"id": f"r{i}", "text": json.dumps(r)} for i, r in enumerate([system, plain])]
    )
    model = ModelConfig(name_or_path=str(tiny_model), chat_template=str(template))
    rows = prepare_preferences(
        batch,
        model=model.model_dump_json(),
        algorithm="dpo",
        formatting="auto",
        min_margin=1.0,
        max_length=256,
        eval_fraction=0.0,
        seed=0,
    ).to_pylist()
    assert [r["reject_reason"] for r in rows] == [pref.TEMPLATE_REJECTED, None]


def test_kto_examples_are_shuffled_with_the_seed():
    """TRL's KTO reads in order and pairs each completion with its neighbour's prompt for its KL
    estimate: a pair's two completions must not stay side by side."""
    from workloads.train.preference.recipes import _kto_dataset

    rows = [
        {
            "kind": "pair",
            "prompt": json.dumps([{"role": "user", "content": f"q{i}"}]),
            "chosen": json.dumps([{"role": "assistant", "content": f"good {i}"}]),
            "rejected": json.dumps([{"role": "assistant", "content": f"bad {i}"}]),
            "completion": None,
            "label": None,
        }
        for i in range(50)
    ]
    first = _kto_dataset(rows, seed=0)
    again = _kto_dataset(rows, seed=0)
    assert first["completion"] == again["completion"] and len(first) == 100
    assert sorted(first["label"]) == [False] * 50 + [True] * 50
    prompts = [p[0]["content"] for p in first["prompt"]]
    same_neighbour = sum(a == b for a, b in zip(prompts, prompts[1:], strict=False))
    assert same_neighbour < 10  # in input order all 50 pairs would be neighbours


def test_reader_rejects_pass_through(tiny_model):
    batch = _documents([{"id": "x", "text": None, "raw": "{oops", "reject_reason": MALFORMED_JSON}])
    out = prepare_preferences(
        batch,
        model=ModelConfig(name_or_path=str(tiny_model)).model_dump_json(),
        algorithm="dpo",
        formatting="auto",
        min_margin=1.0,
        max_length=64,
        eval_fraction=0.1,
        seed=0,
    ).to_pylist()
    assert out[0]["reject_reason"] == MALFORMED_JSON and out[0]["raw"] == "{oops"


# ---------------------------------------------------------------------------------------------
# Log-probs: the Ray Data reference pass computes what TRL's DPOTrainer computes


def test_reference_pass_matches_trl_dpo_precompute(tiny_model, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from workloads.train.preference.logprobs import ReferenceLogProbs

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pairs = [pref.to_preference_pair(r, "auto") for r in _demo_records()]
    # Prompts shorter than max_length (the job rejects the others, as prompt_too_long), whose
    # completions still get cut by it: truncation must match too.
    max_length = 96
    lengths = [{k: len(v) for k, v in tokenize_pair(tokenizer, **p).items()} for p in pairs]
    pairs = [p for p, n in zip(pairs, lengths, strict=True) if n["prompt_ids"] < max_length][:12]
    assert any(n["prompt_ids"] < max_length < n["prompt_ids"] + n["chosen_ids"] for n in lengths)
    args = DPOConfig(
        output_dir=str(tmp_path),
        precompute_ref_log_probs=True,
        per_device_train_batch_size=4,
        max_length=max_length,
        bf16=False,
        use_cpu=True,
        report_to="none",
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model),
        args=args,
        train_dataset=datasets.Dataset.from_list(pairs),
        processing_class=tokenizer,
    )
    for i, pair in enumerate(pairs):
        ours = tokenize_pair(tokenizer, pair["prompt"], pair["chosen"], pair["rejected"])
        theirs = trainer.train_dataset[i]
        assert all(ours[k] == theirs[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))

    table = pa.table(
        {k: [json.dumps(p[k]) for p in pairs] for k in ("prompt", "chosen", "rejected")}
    )
    stage = ReferenceLogProbs(
        model=ModelConfig(name_or_path=str(tiny_model)).model_dump_json(),
        max_length=max_length,
        batch_size=5,  # not the trainer's 4: batching must not change a sequence's log-prob
    )
    scored = stage(table)
    np.testing.assert_allclose(
        scored["ref_chosen_logps"].to_numpy(),
        np.array(trainer.train_dataset["ref_chosen_logps"]),
        rtol=1e-5,
        atol=1e-3,
    )
    np.testing.assert_allclose(
        scored["ref_rejected_logps"].to_numpy(),
        np.array(trainer.train_dataset["ref_rejected_logps"]),
        rtol=1e-5,
        atol=1e-3,
    )


def test_completion_logps_and_kl_by_hand():
    import torch

    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]])
    ids = torch.tensor([[0, 0, 1]])
    mask = torch.tensor([[0, 1, 1]])  # tokens 1 and 2 are the completion
    expected = np.log(0.5) + np.log(1 / (1 + np.exp(2.0)))
    assert completion_logps(logits, ids, mask).item() == pytest.approx(expected, rel=1e-6)
    kl, n = completion_kl(logits, logits, mask)
    assert kl.item() == pytest.approx(0.0, abs=1e-7) and n.item() == 2
    other = torch.zeros_like(logits)
    kl, _ = completion_kl(logits, other, mask)
    p = np.array([1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(2.0))])
    assert kl.item() == pytest.approx(float((p * np.log(p / 0.5)).sum()), rel=1e-5)


def test_pair_metrics_count_ties_half():
    same = pair_metrics(
        np.array([-5.0, -6.0]),
        np.array([-4.0, -7.0]),
        np.array([-5.0, -6.0]),
        np.array([-4.0, -7.0]),
        beta=0.1,
    )
    assert same["heldout/reward_accuracy"] == 0.5 and same["heldout/reward_margin"] == 0.0
    moved = pair_metrics(
        np.array([-4.0, -6.0]),  # chosen up by 1 on pair 0
        np.array([-4.0, -8.0]),  # rejected down by 1 on pair 1
        np.array([-5.0, -6.0]),
        np.array([-4.0, -7.0]),
        beta=0.5,
    )
    assert moved["heldout/reward_accuracy"] == 1.0
    assert moved["heldout/reward_margin"] == pytest.approx(0.5)
    assert moved["heldout/logps_chosen"] == -5.0


# ---------------------------------------------------------------------------------------------
# The demo set


def _demo_records() -> list[dict]:
    from workloads.data.sample import base_documents

    return preference_records(base_documents()[:60])


def test_demo_set_rotates_layouts_and_every_record_converts():
    records = _demo_records()
    layouts = Counter(pref.detect_formatting(r) for r in records)
    assert set(layouts) == {"standard", "conversational", "ultrafeedback"}
    for record in records:
        pair = pref.to_preference_pair(record, "auto")
        assert isinstance(pair, dict), (record["id"], pair)
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        # Grounded: the chosen answer is in the context; the rejected one is its words scrambled.
        assert chosen.split()[0] in pair["prompt"][-1]["content"]
        assert sorted(chosen.split()) == sorted(rejected.split()) and chosen != rejected


def test_scramble_keeps_the_words():
    import random

    sentence = "Assert statements are a convenient way to insert debugging assertions"
    out = scramble(sentence, random.Random(0))
    assert out != sentence and sorted(out.split()) == sorted(sentence.split())
