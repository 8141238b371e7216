"""Preference benchmark: held-out reward accuracy before and after DPO, KTO and ORPO on the demo
set, the reference computed online against the Ray Data reference pass, and what Ray Train adds to
a plain TRL DPOTrainer. Writes bench/preference_results.json and the `preference` section of
bench/RESULTS.md.

    .venv/bin/python bench/preference_bench.py                         # all three, ~25 min on 2 cores
    .venv/bin/python bench/preference_bench.py --only quality          # or: reference, overhead

quality    ray_jobs/configs/preference/{dpo,kto,orpo}-lora-cpu.yaml as they are, on the demo set
           (`make-pairs`: grounded answer against its words scrambled, 5 bad records planted), from
           the demo SFT model (outputs/sft/merged after `make demo`; otherwise the bench runs the
           demo's pretraining and SFT configs first): held-out pair metrics at step 0 and at the end.
reference  DPO on a 49M-parameter Llama, full weights and LoRA, with `preference.reference: online`
           and `precomputed`: the reference pass's time, the training time, and each worker's peak
           memory (process RSS).
overhead   tokens/s of `workloads.train.preference.job.run` (DPO, LoRA, one Ray Train worker
           holding both cores, no DeepSpeed, no held-out split) against TRL's DPOTrainer in a
           process without Ray, on an 11M-parameter Llama: the same pairs (the job's own
           `_stages/pairs`, split train), the same arguments, LoRA config, seed, steps and batch.
           Job, baseline, job, baseline, to show the noise.

Every run is a fresh Python process (this script with `--child`).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench import sft_bench  # noqa: E402
from bench.results_md import write_section  # noqa: E402
from bench.sft_bench import MEMORY_MODEL, OVERHEAD_MODEL, machine, save_llama, throughput  # noqa: E402
from workloads.common.manifest import package_versions  # noqa: E402

RESULTS_JSON = HERE / "preference_results.json"
COMMAND = ".venv/bin/python bench/preference_bench.py"
MEASUREMENTS = ("quality", "reference", "overhead")
CONFIGS = REPO / "ray_jobs" / "configs"
DPO_CONFIG = CONFIGS / "preference" / "dpo-lora-cpu.yaml"
DEMO_SFT_MODEL = REPO / "outputs" / "sft" / "merged"
TARGET_RATIO = 0.9
OVERHEAD_STEPS, OVERHEAD_LOGGING = 30, 5
REFERENCE_STEPS = 20

OVERHEAD_OVERRIDES = [
    f"train.max_steps={OVERHEAD_STEPS}",
    f"train.logging_steps={OVERHEAD_LOGGING}",
    "checkpoint.every_steps=1000",
    "deepspeed.config=null",
    "scaling.num_workers=1",
    "scaling.resources_per_worker={CPU: 2}",
    "data.eval_fraction=0",
    "ray.data_progress_bars=false",
]
# One epoch: 20 steps x 2 workers x 2 pairs = the first 80 records. The reference pass scores each
# pair once per dataset and the online reference once per pair per epoch, so over one epoch both do
# the same number of reference forwards; more epochs only widen the gap.
REFERENCE_OVERRIDES = [
    f"train.max_steps={REFERENCE_STEPS}",
    f"data.max_records={REFERENCE_STEPS * 2 * 2}",
    "train.batch_size=2",
    "train.logging_steps=5",
    "data.max_length=192",
    "data.eval_fraction=0",
    "checkpoint.every_steps=1000",
    "deepspeed.config=zero2",
    "scaling.num_workers=2",
    "scaling.resources_per_worker={CPU: 1}",
    "reference_pass.batch_size=8",
    "ray.data_progress_bars=false",
]


# ---------------------------------------------------------------------------------------------
# Children: one run each, in its own process


def child_job(spec: dict) -> dict:
    from workloads.common.config import load_config
    from workloads.train.preference.config import PreferenceJobConfig
    from workloads.train.preference.job import run

    cfg = load_config(PreferenceJobConfig, Path(spec["config"]), spec["overrides"])
    start = time.perf_counter()
    manifest = run(cfg)
    wall = time.perf_counter() - start
    out = Path(cfg.output.path)
    marker = json.loads((out / "model" / "_SUCCESS.json").read_text())
    return {
        "run_seconds": wall,
        "stages": {s.name: round(s.seconds, 1) for s in manifest.stages},
        "counts": {"read": manifest.read, "kept": manifest.kept, "rejected": manifest.rejected},
        "extra": manifest.extra,
        "log_history": marker["info"]["log_history"],
        "pairs": str(out / "_stages" / "pairs"),
    }


def child_trl_baseline(spec: dict) -> dict:
    """The DPO recipe (workloads.train.preference.recipes.dpo_train_loop) minus Ray Train and
    DeepSpeed: the same helpers build the data, arguments, tokenizer, model and adapter."""
    start = time.perf_counter()
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from workloads.common.config import load_config
    from workloads.train.preference.config import PreferenceJobConfig
    from workloads.train.preference.recipes import (
        PAIR_COLUMNS,
        TRAIN,
        _arguments,
        _model,
        _pairs_dataset,
    )
    from workloads.train.ray_train import make_throughput_callback, read_tokenized_split

    cfg = load_config(PreferenceJobConfig, Path(spec["config"]), spec["overrides"])
    rows = read_tokenized_split(spec["pairs"], TRAIN, PAIR_COLUMNS).to_pylist()
    train_dataset = _pairs_dataset(rows)
    args = DPOConfig(
        **_arguments(cfg),
        beta=cfg.preference.beta,
        loss_type=[cfg.preference.loss_type],
    )
    set_seed(cfg.train.seed)
    tokenizer, model, peft_config = _model(cfg)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[make_throughput_callback()],
    )
    trainer.train()
    import torch

    return {
        "run_seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
        "train_pairs": len(train_dataset),
        "log_history": trainer.state.log_history,
    }


def child_demo_model(spec: dict) -> dict:
    """The demo's pretraining and SFT (with merge), outputs in the bench's folder."""
    from workloads.common.config import load_config
    from workloads.train.pretrain import PretrainJobConfig
    from workloads.train.pretrain import run as pretrain
    from workloads.train.sft import SFTJobConfig
    from workloads.train.sft import run as sft

    work = Path(spec["work"])
    pretrain(
        load_config(
            PretrainJobConfig,
            CONFIGS / "pretrain" / "tiny-cpu.yaml",
            [
                f"tokenizer={spec['tiny']}",
                f"data.path={spec['corpus']}",
                f"output.path={work / 'pretrain'}",
                f"storage_path={work / 'ray-train'}",
            ],
        )
    )
    sft(
        load_config(
            SFTJobConfig,
            CONFIGS / "sft" / "lora-cpu.yaml",
            [
                f"model.name_or_path={work / 'pretrain' / 'model'}",
                f"data.path={spec['instructions']}",
                f"output.path={work / 'sft'}",
                f"storage_path={work / 'ray-train'}",
            ],
        )
    )
    return {"model": str(work / "sft" / "merged")}


CHILDREN = {"job": child_job, "trl_baseline": child_trl_baseline, "demo_model": child_demo_model}


def run_child(kind: str, spec: dict, work: Path, label: str) -> dict:
    return sft_bench.run_child(kind, spec, work, label, script=__file__)


# ---------------------------------------------------------------------------------------------
# Models and data


def prepare(work: Path, names: list[str]) -> dict:
    from workloads.train.preference.job import make_pairs

    prepared: dict = {"pairs": work / "preferences.jsonl"}
    prepared["pair_counts"] = make_pairs(prepared["pairs"])
    needs_tiny = {"reference", "overhead"} & set(names) or (
        "quality" in names and not DEMO_SFT_MODEL.is_dir()
    )
    if needs_tiny:
        sft_bench.build_sample_and_tiny(work)
    if "quality" in names:
        if DEMO_SFT_MODEL.is_dir():
            prepared["demo_model"] = DEMO_SFT_MODEL
            prepared["demo_model_source"] = "outputs/sft/merged (make demo)"
        else:
            from workloads.train.sft import make_instructions

            make_instructions(work / "instructions.jsonl")
            built = run_child(
                "demo_model",
                {
                    "work": str(work / "demo"),
                    "tiny": str(work / "tiny"),
                    "corpus": str(work / "sample" / "corpus"),
                    "instructions": str(work / "instructions.jsonl"),
                },
                work,
                "demo-model",
            )
            prepared["demo_model"] = Path(built["model"])
            prepared["demo_model_source"] = "the demo's pretrain and SFT configs, run by the bench"
    for name, shape in (("overhead", OVERHEAD_MODEL), ("reference", MEMORY_MODEL)):
        if name in names:
            prepared[f"{name}_model"] = work / f"llama-{name}"
            prepared[f"{name}_parameters"] = save_llama(
                work / f"llama-{name}", work / "tiny", shape
            )
    return prepared


# ---------------------------------------------------------------------------------------------
# The three measurements


def _common(prepared: dict, out: Path, model: Path) -> list[str]:
    return [
        f"model.name_or_path={model}",
        f"data.path={prepared['pairs']}",
        f"output.path={out}",
        f"storage_path={out}-ray-train",
        "output.mode=overwrite",
        "ray.data_progress_bars=false",
    ]


def bench_quality(work: Path, prepared: dict) -> dict:
    runs = []
    for algorithm in ("dpo", "kto", "orpo"):
        config = CONFIGS / "preference" / f"{algorithm}-lora-cpu.yaml"
        out = work / f"quality-{algorithm}"
        job = run_child(
            "job",
            {"config": str(config), "overrides": _common(prepared, out, prepared["demo_model"])},
            work,
            f"quality-{algorithm}",
        )
        extra = job["extra"]
        runs.append(
            {
                "algorithm": algorithm,
                "config": str(config.relative_to(REPO)),
                "before": extra["heldout_before"],
                "after": extra["heldout_after"],
                "steps": extra["global_step"],
                "pairs": extra["pairs"],
                "rejected": job["counts"]["rejected"],
                "first_loss": extra["first_loss"],
                "last_loss": extra["last_loss"],
                "model_seconds": job["stages"]["model"],
            }
        )
    return {"model": prepared["demo_model_source"], "runs": runs}


def bench_reference(work: Path, prepared: dict) -> dict:
    runs = []
    for method in ("full", "lora"):
        for reference in ("online", "precomputed"):
            label = f"reference-{method}-{reference}"
            out = work / label
            overrides = [
                *_common(prepared, out, prepared["reference_model"]),
                f"method={method}",
                f"preference.reference={reference}",
                "train.learning_rate=" + ("1.0e-5" if method == "full" else "1.0e-3"),
                *REFERENCE_OVERRIDES,
            ]
            job = run_child("job", {"config": str(DPO_CONFIG), "overrides": overrides}, work, label)
            extra = job["extra"]
            ref_seconds = job["stages"].get("_stages/reference", 0.0)
            runs.append(
                {
                    "method": method,
                    "reference": reference,
                    "reference_seconds": ref_seconds,
                    "train_seconds": job["stages"]["model"],
                    "reference_plus_train_seconds": round(ref_seconds + job["stages"]["model"], 1),
                    "train_runtime": throughput(job["log_history"])["train_runtime"],
                    "peak_mb_per_worker": extra["peak_memory_mb_per_worker"],
                    "peak_mb_max": max(extra["peak_memory_mb_per_worker"]),
                    "last_loss": extra["last_loss"],
                    "steps": extra["global_step"],
                    "pairs": extra["pairs"]["train"],
                }
            )
    return {
        "parameters": prepared["reference_parameters"],
        "shape": MEMORY_MODEL,
        "overrides": REFERENCE_OVERRIDES,
        "runs": runs,
    }


def bench_overhead(work: Path, prepared: dict) -> dict:
    runs = []
    pairs = None
    for i in (1, 2):
        out = work / f"overhead-job-{i}"
        overrides = [
            *_common(prepared, out, prepared["overhead_model"]),
            *OVERHEAD_OVERRIDES,
        ]
        spec = {"config": str(DPO_CONFIG), "overrides": overrides}
        job = run_child("job", spec, work, f"overhead-job-{i}")
        pairs = pairs or job["pairs"]
        runs.append(
            {
                "side": "job",
                "round": i,
                **throughput(job["log_history"]),
                "process_seconds": job["process_seconds"],
                "pairs": job["extra"]["pairs"]["train"],
            }
        )
        base = run_child("trl_baseline", {**spec, "pairs": pairs}, work, f"overhead-baseline-{i}")
        runs.append(
            {
                "side": "baseline",
                "round": i,
                **throughput(base["log_history"]),
                "process_seconds": base["process_seconds"],
                "torch_threads": base["torch_threads"],
                "pairs": base["train_pairs"],
            }
        )
    job_runs = [r for r in runs if r["side"] == "job"]
    base_runs = [r for r in runs if r["side"] == "baseline"]

    def ratio(key: str) -> float:
        return round(
            statistics.mean(r[key] for r in job_runs) / statistics.mean(r[key] for r in base_runs),
            3,
        )

    return {
        "parameters": prepared["overhead_parameters"],
        "shape": OVERHEAD_MODEL,
        "overrides": OVERHEAD_OVERRIDES,
        "runs": runs,
        "ratio_end_to_end": ratio("end_to_end"),
        "ratio_steady": ratio("steady"),
        "target": TARGET_RATIO,
    }


BENCHES = {"quality": bench_quality, "reference": bench_reference, "overhead": bench_overhead}


# ---------------------------------------------------------------------------------------------
# Report


def section_quality(r: dict) -> list[str]:
    lines = [
        "### quality: held-out pairs before and after, on the demo set",
        "",
        "The demo set (`python -m workloads.train.preference.job make-pairs`): for each sample "
        "document, a context (its opening) and the question how it begins; chosen is the "
        "document's first sentence, rejected the same words scrambled; 5 malformed records "
        f"planted. Model: {r['model']}. Each config as shipped (LoRA r 16, two CPU workers, "
        "ZeRO-2, beta 0.5). Held-out pairs: 5% of the records by id hash. Reward = beta x "
        "(log pi - log pi_ref) of a whole completion, reference = the model with the adapters "
        "off; accuracy counts a tie as half, so step 0 is 0.5 by construction. KL is "
        "KL(policy || reference) of the next-token distributions, averaged over completion tokens.",
        "",
        "| algorithm | steps | held-out pairs | reward accuracy before → after | reward margin after "
        "| log-prob chosen − rejected before → after | KL/token after | loss first → last | rejected records |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        b, a = run["before"], run["after"]
        gap_b = b["heldout/logps_chosen"] - b["heldout/logps_rejected"]
        gap_a = a["heldout/logps_chosen"] - a["heldout/logps_rejected"]
        lines.append(
            f"| {run['algorithm']} | {run['steps']} | {run['pairs'].get('eval', 0)} "
            f"| {b['heldout/reward_accuracy']:.3f} → **{a['heldout/reward_accuracy']:.3f}** "
            f"| {a['heldout/reward_margin']:.2f} | {gap_b:.1f} → {gap_a:.1f} "
            f"| {a.get('heldout/kl', float('nan')):.3f} | {run['first_loss']:.3f} → {run['last_loss']:.3f} "
            f"| {sum(run['rejected'].values())} |"
        )
    lines += [
        "",
        "ORPO's loss is its SFT term plus beta x the odds-ratio term, so it does not start near "
        "log 2 as DPO's does; its held-out rewards use the same reference as the others.",
    ]
    return lines


def section_reference(r: dict) -> list[str]:
    lines = [
        "### reference: online against the Ray Data reference pass",
        "",
        f"DPO on a {r['parameters'] / 1e6:.1f}M-parameter Llama (hidden {r['shape']['hidden_size']}, "
        f"{r['shape']['num_hidden_layers']} layers), fp32, two CPU workers under ZeRO-2, "
        "`" + " ".join(r["overrides"]) + "`: one epoch. Online: the trainer runs the reference on "
        "every batch (LoRA: the base with adapters off; full: TRL's frozen copy of the model). "
        "Precomputed: a Ray Data actor scores every pair once before training "
        "(`_stages/reference`), and the trainer holds no reference model. Peak = each worker "
        "process's peak RSS.",
        "",
        "| weights | reference | reference pass | training (model stage) | sum | train_runtime "
        "| peak rank 0 | peak rank 1 | last loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        peaks = run["peak_mb_per_worker"]
        lines.append(
            f"| {run['method']} | {run['reference']} | {run['reference_seconds']:.0f} s "
            f"| {run['train_seconds']:.0f} s | **{run['reference_plus_train_seconds']:.0f} s** "
            f"| {run['train_runtime']:.1f} s | {peaks[0]:,.0f} MB | {peaks[1]:,.0f} MB "
            f"| {run['last_loss']:.3f} |"
        )
    by = {(x["method"], x["reference"]): x for x in r["runs"]}
    lines.append("")
    for method in ("full", "lora"):
        on, pre = by[(method, "online")], by[(method, "precomputed")]
        lines.append(
            f"- {method}: peak memory per worker {on['peak_mb_max']:,.0f} → "
            f"{pre['peak_mb_max']:,.0f} MB ({pre['peak_mb_max'] - on['peak_mb_max']:+,.0f}); "
            f"train_runtime {on['train_runtime']:.1f} → {pre['train_runtime']:.1f} s "
            f"({pre['train_runtime'] / on['train_runtime']:.2f}x), plus a "
            f"{pre['reference_seconds']:.0f} s reference pass that runs once per dataset."
        )
    lines += [
        "",
        "Same last loss to three decimals either way: the precomputed log-probs are the ones the "
        "trainer would have computed. What the pass buys: with full weights, no frozen copy of the "
        "model in any worker (here the 49M x 4 bytes of the copy, about 200 MB a worker; at 8B in "
        "bf16, 16 GB a GPU, or its ZeRO-3 shard plus the per-layer gathers), and with either, "
        "training steps without the reference forward. What it costs: one forward per pair, once "
        "per dataset, on its own actors. Over a single epoch on this 2-core machine it costs more "
        "wall time than it saves, since its one actor (1 CPU, one torch thread, model load and Ray "
        "Data start included) uses half the machine while the two training workers use all of it; "
        "it pays for itself in time from the third epoch, or on a cluster where the pass runs on "
        "otherwise idle GPUs.",
    ]
    return lines


def section_overhead(r: dict) -> list[str]:
    lines = [
        "### overhead: the DPO job against plain TRL",
        "",
        f"DPO with LoRA (dpo-lora-cpu.yaml: r 16, batch 4 pairs, max_length 256, beta 0.5) on a "
        f"{r['parameters'] / 1e6:.1f}M-parameter Llama, {OVERHEAD_STEPS} steps. Job: "
        "`workloads.train.preference.job.run` with `" + " ".join(r["overrides"]) + "`. "
        "Baseline: TRL DPOTrainer in a process without Ray on the job's own prepared train pairs, "
        "with the same arguments (`_arguments`), model loader, LoRA config and ThroughputCallback. "
        "Both sides use 2 torch threads.",
        "",
        "| run | side | tokens/s end to end | tokens/s steady | train_runtime | process wall | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(r["runs"], 1):
        lines.append(
            f"| {i} | {run['side']} | {run['end_to_end']:,.0f} | {run['steady']:,.0f} "
            f"| {run['train_runtime']:.1f} s | {run['process_seconds']:.0f} s | {run['final_loss']:.3f} |"
        )
    lines += [
        "",
        f"Ratio job / baseline (means of the two runs each): end to end **{r['ratio_end_to_end']:.3f}**, "
        f"steady **{r['ratio_steady']:.3f}** (target ≥ {r['target']}). Measured as in the sft "
        "section's overhead table.",
    ]
    return lines


def section(results: dict) -> str:
    lines = [
        "<!-- preference:start -->",
        "## preference",
        "",
        f"Command: `{results['command']}` ({results['machine']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
        + "). Each run is its own process; nothing else ran on the machine.",
    ]
    if results.get("note"):
        lines += ["", results["note"]]
    for name, render in (
        ("quality", section_quality),
        ("reference", section_reference),
        ("overhead", section_overhead),
    ):
        if name in results:
            lines += ["", *render(results[name])]
    lines.append("<!-- preference:end -->")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=MEASUREMENTS, help="run one measurement")
    parser.add_argument(
        "--child", nargs=3, metavar=("KIND", "SPEC", "RESULT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        kind, spec, result = args.child
        value = CHILDREN[kind](json.loads(Path(spec).read_text()))
        Path(result).write_text(json.dumps(value, default=str))
        return 0

    names = [args.only] if args.only else list(MEASUREMENTS)
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    with tempfile.TemporaryDirectory(prefix="preference_bench-") as tmp:
        work = Path(tmp)
        prepared = prepare(work, names)
        for name in names:
            start = time.perf_counter()
            results[name] = BENCHES[name](work, prepared)
            results[name]["bench_seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps({name: results[name]}, indent=1, default=str)[:3000], flush=True)
            results.update(command=COMMAND, machine=machine(), versions=package_versions())
            RESULTS_JSON.write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_section("preference", section(results))
    if "overhead" in names and results["overhead"]["ratio_end_to_end"] < TARGET_RATIO:
        print(
            f"NOTE: overhead ratio {results['overhead']['ratio_end_to_end']} < 0.9", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
