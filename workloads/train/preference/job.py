"""Preference optimisation on Ray Train: DPO (or IPO), KTO and ORPO through TRL, with LoRA or full
weights under DeepSpeed ZeRO 0-3.

    python -m workloads.train.preference.job make-pairs --out data/preferences.jsonl
    python ray_jobs/preference.py --config ray_jobs/configs/preference/dpo-lora-cpu.yaml
    python ray_jobs/preference.py --config ray_jobs/configs/preference/kto-lora-cpu.yaml
    ray job submit --working-dir . -- python ray_jobs/preference.py --config ray_jobs/configs/preference/dpo-lora-8b.yaml

Stages (each writes its own folder; a rerun resumes at the first missing one):
  _stages/pairs      Ray Data: each record to TRL's conversational form (prompt messages, chosen and
                     rejected assistant messages, or KTO's completion + label), tokenized with the
                     model's chat template to catch what the trainer would silently drop; split
                     train/eval by a hash of the record id. Malformed records get a reason.
  rejects/           those records, with `reject_reason` and the raw record
  _stages/reference  (DPO with `preference.reference: precomputed`) Ray Data actors score every pair
                     with the reference model once; training then never runs it
  model/             the adapter (or full model) and tokenizer: what vLLM loads
  merged/            with `lora.merge`: the model with the adapter folded in
  training/          metrics.csv and preference.png: loss, TRL's batch rewards and log-probs, and the
                     held-out reward accuracy, margin, log-probs and KL(policy || reference)
  _manifest.json     read = kept (train + eval) + rejected; the held-out metrics before and after
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from workloads.common.documents import list_input_files, read_documents
from workloads.common.manifest import JobFailed, JobManifest, finish_job
from workloads.common.ray_runtime import check_cpus_left_for_tasks, init_ray, on_fixed_size_ray
from workloads.common.storage import OutputLayout
from workloads.train.config import ModelConfig, load_tokenizer
from workloads.train.preference import data as preference_data
from workloads.train.preference.config import PreferenceJobConfig
from workloads.train.preference.logprobs import HELDOUT_METRICS, ReferenceLogProbs, tokenize_pair
from workloads.train.preference.recipes import EVAL, TRAIN, TRAIN_LOOPS
from workloads.train.ray_train import (
    check_cluster_fits,
    export_model,
    fit,
    history_summary,
    merge_adapter,
    run_name,
    storage_path,
    torch_trainer,
    write_rejects,
    write_training_curves,
)
from workloads.train.splits import is_held_out

log = logging.getLogger(__name__)

PAIR, UNPAIRED = "pair", "unpaired"
PAIRS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("split", pa.string()),  # train | eval; null for rejects
        ("kind", pa.string()),  # pair | unpaired (KTO's prompt/completion/label)
        ("prompt", pa.string()),  # JSON: messages ending with a user turn
        ("chosen", pa.string()),  # JSON: [assistant message]
        ("rejected", pa.string()),
        ("completion", pa.string()),  # unpaired only
        ("label", pa.bool_()),  # unpaired only: desirable or not
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),  # chosen + rejected, or the one completion
        ("reject_reason", pa.string()),
        ("raw", pa.string()),
    ]
)

# metrics.csv: what TRL logs per step (DPO, KTO, ORPO name a few differently), then the held-out pairs.
PREFERENCE_FIELDS = (
    "step",
    "epoch",
    "loss",
    "learning_rate",
    "grad_norm",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "kl",
    "nll_loss",
    "log_odds_ratio",
    "eval_loss",
    "eval_kl",
    *HELDOUT_METRICS,
    "tokens_per_second",
    "peak_memory_mb",
)
PREFERENCE_PANELS = (
    ("training loss", ("loss",)),
    ("reward accuracy", ("heldout/reward_accuracy", "rewards/accuracies")),
    ("reward margin", ("heldout/reward_margin", "rewards/margins")),
    (
        "log-probs of the completions",
        ("heldout/logps_chosen", "heldout/logps_rejected", "logps/chosen", "logps/rejected"),
    ),
    ("KL(policy || reference) per token", ("heldout/kl",)),
)


# ---------------------------------------------------------------------------------------------
# Per-batch logic: records -> TRL's preference format (Ray Data calls this)


@functools.lru_cache(maxsize=4)
def _tokenizer(model_json: str):
    return load_tokenizer(ModelConfig.model_validate_json(model_json))


def _convert(record: Any, algorithm: str, formatting: str, min_margin: float):
    """(kind, {prompt, chosen, rejected} or {prompt, completion, label}) or a reject reason."""
    is_unpaired = formatting == UNPAIRED or (
        formatting == "auto"
        and isinstance(record, dict)
        and preference_data.detect_formatting(record) == UNPAIRED
    )
    if is_unpaired and algorithm == "kto":
        examples = preference_data.to_kto_examples(record, UNPAIRED)
        return examples if isinstance(examples, str) else (UNPAIRED, examples[0])
    pair = preference_data.to_preference_pair(
        record, "auto" if formatting == UNPAIRED else formatting, min_margin=min_margin
    )
    return pair if isinstance(pair, str) else (PAIR, pair)


def prepare_preferences(
    batch: pa.Table,
    *,
    model: str,
    algorithm: str,
    formatting: str,
    min_margin: float,
    max_length: int,
    eval_fraction: float,
    seed: int,
) -> pa.Table:
    """DOCUMENT_SCHEMA rows (`text` = the record as JSON) -> PAIRS_SCHEMA rows, one per record.

    Each record is tokenized as the trainer will tokenize it: a template that raises, or a prompt
    that alone fills `max_length` (TRL would drop it without a word), is a reject with its reason."""
    tokenizer = _tokenizer(model)
    cols: dict[str, list[Any]] = {name: [] for name in PAIRS_SCHEMA.names}
    for row in batch.to_pylist():
        reason, kind, example, n_prompt, n_completion = row["reject_reason"], None, None, None, None
        if reason is None:
            converted = _convert(json.loads(row["text"]), algorithm, formatting, min_margin)
            if isinstance(converted, str):
                reason = converted
            else:
                kind, example = converted
                second = example["rejected"] if kind == PAIR else example["completion"]
                first = example["chosen"] if kind == PAIR else example["completion"]
                try:
                    ids = tokenize_pair(tokenizer, example["prompt"], first, second)
                except Exception:  # noqa: BLE001 - jinja raises anything ("roles must alternate")
                    reason = preference_data.TEMPLATE_REJECTED
                else:
                    n_prompt = len(ids["prompt_ids"])
                    n_completion = len(ids["chosen_ids"]) + (
                        len(ids["rejected_ids"]) if kind == PAIR else 0
                    )
                    if n_prompt >= max_length:
                        reason = preference_data.PROMPT_TOO_LONG
        if reason is not None:
            kind = example = n_prompt = n_completion = None
        cols["id"].append(row["id"])
        cols["source"].append(row["source"])
        cols["line"].append(row["line"])
        cols["reject_reason"].append(reason)
        cols["raw"].append(None if reason is None else (row["raw"] or row["text"]))
        cols["kind"].append(kind)
        held_out = is_held_out(row["id"], eval_fraction=eval_fraction, seed=seed)
        cols["split"].append(None if reason else (EVAL if held_out else TRAIN))
        for name in ("prompt", "chosen", "rejected", "completion"):
            value = None if example is None else example.get(name)
            cols[name].append(None if value is None else json.dumps(value, ensure_ascii=False))
        cols["label"].append(None if example is None else example.get("label"))
        cols["prompt_tokens"].append(n_prompt)
        cols["completion_tokens"].append(n_completion)
    return pa.Table.from_pydict(cols, schema=PAIRS_SCHEMA)


def kept_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reject_reason"]))


def kept_eval_pairs(batch: pa.Table) -> pa.Table:
    kept = kept_rows(batch)
    return kept.filter(pc.and_(pc.equal(kept["split"], EVAL), pc.equal(kept["kind"], PAIR)))


# ---------------------------------------------------------------------------------------------
# The job


def check_tokenizer(cfg: PreferenceJobConfig) -> None:
    try:
        tokenizer = _tokenizer(cfg.model.model_dump_json())
    except OSError as exc:
        raise JobFailed(f"model.name_or_path: cannot load the tokenizer: {exc}") from None
    if not tokenizer.chat_template:
        raise JobFailed(
            "model.chat_template: the tokenizer has no chat template, and preference pairs are "
            "conversations: give a template file (ray_jobs/configs/chat_templates/)"
        )


def prepare_stage(
    cfg: PreferenceJobConfig, out: OutputLayout, files, folder: str
) -> dict[str, Any]:
    ds = read_documents(cfg.data, files, whole_record=True).map_batches(
        prepare_preferences,
        batch_format="pyarrow",
        fn_kwargs=dict(
            model=cfg.model.model_dump_json(),
            algorithm=cfg.algorithm,
            formatting=cfg.data.formatting,
            min_margin=cfg.data.min_score_margin,
            max_length=cfg.data.max_length,
            eval_fraction=cfg.data.eval_fraction,
            seed=cfg.data.seed,
        ),
    )
    out.write_dataset(ds, folder, PAIRS_SCHEMA)
    table = pads.dataset(folder, format="parquet", filesystem=out.fs).to_table(
        columns=["split", "kind", "label", "reject_reason", "prompt_tokens", "completion_tokens"]
    )
    good = table.filter(pc.is_null(table["reject_reason"]))
    by_split_kind = Counter(zip(good["split"].to_pylist(), good["kind"].to_pylist(), strict=True))
    labels = Counter(good.filter(pc.equal(good["kind"], UNPAIRED))["label"].to_pylist())
    return {
        "read": table.num_rows,
        "train": sum(n for (s, _), n in by_split_kind.items() if s == TRAIN),
        "eval": sum(n for (s, _), n in by_split_kind.items() if s == EVAL),
        "pairs": {s: n for (s, k), n in by_split_kind.items() if k == PAIR},
        "unpaired": {"desirable": labels.get(True, 0), "undesirable": labels.get(False, 0)},
        "rejected": dict(Counter(r for r in table["reject_reason"].to_pylist() if r)),
        "tokens": int(
            (pc.sum(good["prompt_tokens"]).as_py() or 0)
            + (pc.sum(good["completion_tokens"]).as_py() or 0)
        ),
    }


def needs_reference_pass(cfg: PreferenceJobConfig) -> bool:
    """DPO with `reference: precomputed` (every pair), or full-weight ORPO, whose held-out rewards
    need the starting model's log-probs and which loads no reference model (held-out pairs only)."""
    return cfg.precomputes_reference or (cfg.algorithm == "orpo" and cfg.method == "full")


def check_reference_pass_fits(cfg: PreferenceJobConfig) -> None:
    """On a fixed-size local Ray, reference actors that cannot be placed, or that take every CPU
    from the tasks feeding them, would wait forever."""
    import ray

    if not on_fixed_size_ray(cfg.ray):
        return
    have = ray.cluster_resources()
    passes = cfg.reference_pass
    if passes.num_gpus and have.get("GPU", 0) < passes.num_gpus:
        raise JobFailed(
            f"reference_pass.num_gpus={passes.num_gpus:g}: one reference actor needs "
            f"{passes.num_gpus:g} GPU, and this Ray has {have.get('GPU', 0):g}"
        )
    check_cpus_left_for_tasks(
        cfg.ray,
        held=passes.num_cpus * passes.concurrency,
        holders="the reference pass",
        remedy="lower reference_pass.num_cpus or reference_pass.concurrency",
    )


def _reference_pass(cfg: PreferenceJobConfig, out: OutputLayout, folder: str) -> dict[str, Any]:
    start = time.perf_counter()
    select = kept_rows if cfg.precomputes_reference else kept_eval_pairs
    passes = cfg.reference_pass
    ds = (
        out.read_dataset("_stages/pairs")
        .map_batches(select, batch_format="pyarrow")
        .map_batches(
            ReferenceLogProbs,
            batch_format="pyarrow",
            batch_size=passes.batch_size * 4,
            fn_constructor_kwargs=dict(
                model=cfg.model.model_dump_json(),
                max_length=cfg.data.max_length,
                batch_size=passes.batch_size,
                precision=cfg.train.precision,
            ),
            concurrency=passes.concurrency,
            num_cpus=passes.num_cpus,
            num_gpus=passes.num_gpus or None,
        )
    )
    schema = PAIRS_SCHEMA.append(pa.field("ref_chosen_logps", pa.float64())).append(
        pa.field("ref_rejected_logps", pa.float64())
    )
    out.write_dataset(ds, folder, schema)
    rows = pads.dataset(folder, format="parquet", filesystem=out.fs).count_rows()
    return {"pairs": rows, "seconds": round(time.perf_counter() - start, 1)}


def _train(cfg: PreferenceJobConfig, out: OutputLayout, has_reference: bool, folder: str) -> dict:
    start = time.perf_counter()
    trainer = torch_trainer(
        TRAIN_LOOPS[cfg.algorithm],
        {
            "cfg": cfg.model_dump(mode="json"),
            "pairs": out.uri_of("_stages/pairs"),
            "reference": out.uri_of("_stages/reference") if has_reference else None,
            # Every pair for DPO's precomputed reference; the held-out pairs only for ORPO's
            # full-weight evaluation.
            "reference_splits": [TRAIN, EVAL] if cfg.precomputes_reference else [EVAL],
        },
        name=run_name(f"preference-{cfg.algorithm}", cfg),
        scaling=cfg.scaling,
        checkpointing=cfg.checkpoint,
        storage=storage_path(cfg.storage_path, cfg.output.path),
    )
    result = fit(trainer)
    value = result.return_value or {}
    # What Ray Train holds with the last checkpoint: the metrics a dashboard or Tune sees.
    reported = result.best_checkpoints[-1][1] if result.best_checkpoints else {}
    files = export_model(result.checkpoint, folder, out.fs)
    history = value.get("log_history", [])
    heldout = [e for e in history if "heldout/reward_accuracy" in e]
    return {
        "files": files,
        "checkpoint": result.checkpoint.path,
        "ray_train_run": result.path,
        "train_seconds": round(time.perf_counter() - start, 1),
        "global_step": value.get("global_step"),
        "resumed_from_step": value.get("resumed_from_step"),
        "train_examples": value.get("train_examples"),
        "trainable_parameters": value.get("trainable_parameters"),
        "peak_memory_mb_per_worker": value.get("peak_memory_mb_per_worker"),
        **{k: v for k, v in history_summary(history).items() if k != "eval_loss"},
        # The held-out pairs at the first and the last evaluation (step 0 unless resumed).
        "heldout_before": heldout[0] if heldout else None,
        "heldout_after": heldout[-1] if heldout else None,
        "reported_metrics": reported,
        "log_history": history,
    }


def run(cfg: PreferenceJobConfig) -> JobManifest:
    manifest = JobManifest("preference", cfg)
    files = list_input_files(cfg.data)  # a missing path fails here, before Ray
    check_tokenizer(cfg)
    out = OutputLayout(cfg.output.path, cfg.fingerprint(), overwrite=cfg.output.mode == "overwrite")
    init_ray(cfg.ray, dashboard=True)  # Ray Train's placement-group cleanup needs the state API
    check_cluster_fits(cfg.ray, cfg.scaling)
    if needs_reference_pass(cfg):
        check_reference_pass_fits(cfg)

    prepared = out.run_stage(
        "_stages/pairs", lambda folder: prepare_stage(cfg, out, files, folder), manifest
    )
    counts = prepared.info
    manifest.read = counts["read"]
    manifest.kept = counts["train"] + counts["eval"]
    manifest.rejected = counts["rejected"]
    if counts["train"] == 0:
        raise JobFailed(f"no usable preference record among {counts['read']} read: see rejects/")
    out.run_stage(
        "rejects",
        lambda folder: write_rejects(out, folder, PAIRS_SCHEMA, "_stages/pairs"),
        manifest,
    )
    manifest.outputs["rejects"] = out.path("rejects")

    reference = None
    if needs_reference_pass(cfg):
        reference = out.run_stage(
            "_stages/reference", lambda folder: _reference_pass(cfg, out, folder), manifest
        ).info
    trained = out.run_stage(
        "model", lambda folder: _train(cfg, out, reference is not None, folder), manifest
    ).info
    manifest.outputs["model"] = out.path("model")
    manifest.outputs.update(
        write_training_curves(
            trained["log_history"],
            out.path("training"),
            out.fs,
            fields=PREFERENCE_FIELDS,
            panels=PREFERENCE_PANELS,
            png_name="preference.png",
        )
    )
    if cfg.method != "full" and cfg.lora.merge:
        out.run_stage(
            "merged",
            lambda folder: merge_adapter(cfg.model.name_or_path, out.path("model"), folder, out.fs),
            manifest,
        )
        manifest.outputs["merged"] = out.path("merged")
    manifest.extra = {
        "algorithm": cfg.algorithm,
        "records": {"train": counts["train"], "eval": counts["eval"]},
        "pairs": counts["pairs"],
        "unpaired": counts["unpaired"],
        "tokens": counts["tokens"],
        "reference_pass": reference,
        **{k: v for k, v in trained.items() if k != "log_history"},
    }
    return finish_job(manifest, out, cfg.output.keep_intermediate)


# ---------------------------------------------------------------------------------------------
# A preference set from the sample corpus (the demo and the tests)

_FIRST_SENTENCE = re.compile(r"^(.{20,240}?[.!?:])(\s|$)", re.DOTALL)
SYSTEM = "Answer from the context. If the context does not say, do not guess."


def scramble(sentence: str, rng: random.Random) -> str:
    """The same words in another order: what a grounded answer says, without its grammar."""
    words = sentence.split()
    for _ in range(8):
        rng.shuffle(words)
        if words != sentence.split():
            break
    return " ".join(words)


def preference_records(docs, *, context_words: int = 40, seed: int = 0) -> list[dict[str, Any]]:
    """One record per document whose answer its own text holds: the context is the document's
    opening, the question asks how it begins. Chosen: its first sentence, grounded in the context.
    Rejected: the same sentence with its words scrambled, which holds the same words but says
    nothing (the preference is measurable: every chosen answer is the context's own text).

    Layouts rotate so `formatting: auto` meets each: standard strings, conversational messages with
    a system turn, and UltraFeedback-style rated completions (grounded 9, another document's opening
    4, scrambled 2, so binarising must pick best against worst)."""
    rng = random.Random(seed)
    usable = []
    for doc in docs:
        text = " ".join(doc.text.split())
        match = _FIRST_SENTENCE.match(text)
        if match and doc.title.strip() and len(set(match.group(1).split())) > 3:
            usable.append((doc.title.strip(), text, match.group(1)))
    records = []
    for i, (title, text, first) in enumerate(usable):
        rejected = scramble(first, rng)
        context = " ".join(text.split()[:context_words])
        question = f"Context: {context}\n\nHow does the documentation of {title} begin?"
        layout = i % 5
        if layout < 3:
            records.append(
                {"id": f"pair-{i}", "prompt": question, "chosen": first, "rejected": rejected}
            )
        elif layout == 3:
            records.append(
                {
                    "id": f"pair-{i}",
                    "prompt": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": question},
                    ],
                    "chosen": [{"role": "assistant", "content": first}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            other = usable[(i + rng.randrange(1, len(usable))) % len(usable)][2]
            records.append(
                {
                    "id": f"pair-{i}",
                    "instruction": question,
                    "completions": [
                        {"response": other, "overall_score": 4},
                        {"response": first, "overall_score": 9},
                        {"response": rejected, "overall_score": 2},
                    ],
                }
            )
    return records


# Planted bad records: each is counted under its reason in the manifest and kept in rejects/.
PLANTED_BAD_RECORDS = [
    {
        "id": "bad-identical",
        "prompt": "What is a list?",
        "chosen": "A sequence.",
        "rejected": "A sequence.",
    },
    {"id": "bad-missing-rejected", "prompt": "What is a dict?", "chosen": "A mapping."},
    {"id": "bad-empty-chosen", "prompt": "What is a set?", "chosen": "  ", "rejected": "A list."},
    {
        "id": "bad-close-scores",
        "instruction": "What is a tuple?",
        "completions": [
            {"response": "An immutable sequence.", "overall_score": 7},
            {"response": "A sequence.", "overall_score": 7.5},
        ],
    },
]
PLANTED_REASONS = {
    preference_data.IDENTICAL_COMPLETIONS: 1,
    preference_data.MISSING_REJECTED: 1,
    preference_data.EMPTY_COMPLETION: 1,
    preference_data.MARGIN_TOO_SMALL: 1,
    "malformed_json": 1,
}


def make_pairs(out: Path, *, limit: int | None = None, planted_bad: bool = True) -> dict:
    from workloads.data.sample import base_documents

    records = preference_records(base_documents())[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if planted_bad:
            for record in PLANTED_BAD_RECORDS:
                f.write(json.dumps(record) + "\n")
            f.write('{"id": "bad-json", "prompt": "What is\n')  # a truncated line
    return {
        "records": len(records),
        "planted_bad": sum(PLANTED_REASONS.values()) if planted_bad else 0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-pairs", help="a preference set from the sample corpus (JSONL)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="write at most N records")
    p.add_argument("--no-bad", action="store_true", help="do not plant the 5 malformed records")
    args = parser.parse_args(argv)
    counts = make_pairs(args.out, limit=args.limit, planted_bad=not args.no_bad)
    print(json.dumps({"out": str(args.out), **counts}))


if __name__ == "__main__":
    main()
