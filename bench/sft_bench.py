"""SFT and pretraining benchmark: what Ray Train adds to a TRL step, peak memory per worker under
ZeRO 0/2/3, and the pretraining yardstick. Writes bench/sft_results.json and the `sft` section of
bench/RESULTS.md.

    .venv/bin/python bench/sft_bench.py                                  # all three, ~20 min on 2 cores
    .venv/bin/python bench/sft_bench.py --only overhead                  # or: memory, pretrain

overhead  tokens/s of `workloads.train.sft.run` (LoRA, one Ray Train worker holding both cores, no
          DeepSpeed) against a plain TRL SFTTrainer in a process without Ray, on a 16M-parameter
          Llama: the same tokenized rows (the job's own `_stages/tokenized`, split train), the same
          TrainingArguments (`training_arguments(...)`), LoRA config, seed, steps, batch and
          max_length. Run job, baseline, job, baseline, to show the noise.
memory    peak memory per worker (`extra.peak_memory_mb_per_worker`: process RSS on CPU) of full
          fine-tuning with two workers under ZeRO-0, ZeRO-2 and ZeRO-3, on a 49M-parameter Llama.
pretrain  `ray_jobs/configs/pretrain/tiny-cpu.yaml` as it is, with a tokenizer built on the sample
          corpus and every output in a temporary folder: held-out perplexity before and after
          training against the unigram baseline.

Every run (each side of `overhead` included) is a fresh Python process (this script with
`--child`), so no two runs share a Ray session, threads or allocator state.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench.results_md import write_section  # noqa: E402
from workloads.common.manifest import package_versions  # noqa: E402

RESULTS_JSON = HERE / "sft_results.json"
COMMAND = ".venv/bin/python bench/sft_bench.py"
MEASUREMENTS = ("overhead", "memory", "pretrain")
SFT_CONFIG = REPO / "ray_jobs" / "configs" / "sft" / "lora-cpu.yaml"
PRETRAIN_CONFIG = REPO / "ray_jobs" / "configs" / "pretrain" / "tiny-cpu.yaml"
CURATED = REPO / "outputs" / "curate" / "kept"

# TinyModelConfig's layout (head_dim 64, GQA 2:1), scaled up so a step's compute dwarfs fixed costs.
OVERHEAD_MODEL = dict(
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=3,
)
MEMORY_MODEL = dict(
    hidden_size=640,
    intermediate_size=1792,
    num_hidden_layers=10,
    num_attention_heads=10,
    num_key_value_heads=5,
)
OVERHEAD_STEPS, OVERHEAD_LOGGING = 40, 5
MEMORY_STAGES = ("zero0", "zero2", "zero3", "zero3-small")
TARGET_RATIO = 0.9

# The job side of `overhead`: lora-cpu.yaml with one worker that holds both CPUs (Ray sets
# OMP_NUM_THREADS to a worker's CPUs, so {CPU: 1} would leave torch one thread against the
# baseline's two), no DeepSpeed, no held-out split (so no evaluation in either), and no checkpoint
# before the one the Trainer always writes at the last step.
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
MEMORY_OVERRIDES = [
    "method=full",
    "train.max_steps=5",
    "train.batch_size=2",
    "train.logging_steps=1",
    "train.learning_rate=1.0e-4",
    "data.max_length=128",
    "data.eval_fraction=0",
    "checkpoint.every_steps=1000",
    "scaling.num_workers=2",
    "scaling.resources_per_worker={CPU: 1}",
    # The same allocator setting for every stage, so the comparison is of what ZeRO partitions.
    "deepspeed.release_host_memory=on",
    "ray.data_progress_bars=false",
]


# ---------------------------------------------------------------------------------------------
# Children: one run each, in its own process


def child_sft_job(spec: dict) -> dict:
    from workloads.common.config import load_config
    from workloads.train.sft import SFTJobConfig, run

    cfg = load_config(SFTJobConfig, SFT_CONFIG, spec["overrides"])
    start = time.perf_counter()
    manifest = run(cfg)
    wall = time.perf_counter() - start
    out = Path(cfg.output.path)
    # The model stage's marker keeps rank 0's whole log_history, final train_runtime entry included.
    marker = json.loads((out / "model" / "_SUCCESS.json").read_text())
    return {
        "run_seconds": wall,
        "stages": {s.name: round(s.seconds, 1) for s in manifest.stages},
        "extra": manifest.extra,
        "log_history": marker["info"]["log_history"],
        "tokenized": str(out / "_stages" / "tokenized"),
    }


def child_trl_baseline(spec: dict) -> dict:
    """The job's recipe (workloads.train.sft.train_loop_per_worker) minus Ray Train and DeepSpeed:
    the same helpers build the arguments, tokenizer, model and adapter."""
    start = time.perf_counter()
    import datasets
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from workloads.common.config import load_config
    from workloads.train.config import load_tokenizer
    from workloads.train.ray_train import (
        load_causal_lm,
        lora_config,
        make_throughput_callback,
        read_tokenized_split,
        resolve_precision,
        training_arguments,
    )
    from workloads.train.sft import MASKED, TRAIN, SFTJobConfig

    cfg = load_config(SFTJobConfig, SFT_CONFIG, spec["overrides"])
    train_dataset = datasets.Dataset(read_tokenized_split(spec["tokenized"], TRAIN, MASKED))
    args = SFTConfig(
        **training_arguments(
            optim=cfg.train,
            checkpointing=cfg.checkpoint,
            deepspeed=None,
            use_gpu=False,
            has_eval=False,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
        ),
        max_length=cfg.data.max_length,
        packing=cfg.data.packing,
        assistant_only_loss=False,
        ddp_find_unused_parameters=False,
    )
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(
        cfg.model, method=cfg.method, precision=resolve_precision(cfg.train.precision, False)
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora),
        callbacks=[make_throughput_callback()],
    )
    trainer.train()
    import torch

    return {
        "run_seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
        "train_sequences": len(train_dataset),
        "log_history": trainer.state.log_history,
    }


def child_pretrain(spec: dict) -> dict:
    from workloads.common.config import load_config
    from workloads.train.pretrain import PretrainJobConfig, run

    cfg = load_config(PretrainJobConfig, PRETRAIN_CONFIG, spec["overrides"])
    start = time.perf_counter()
    manifest = run(cfg)
    wall = time.perf_counter() - start
    marker = json.loads((Path(cfg.output.path) / "model" / "_SUCCESS.json").read_text())
    return {
        "run_seconds": wall,
        "stages": {s.name: round(s.seconds, 1) for s in manifest.stages},
        "read": manifest.read,
        "kept": manifest.kept,
        "extra": manifest.extra,
        "log_history": marker["info"]["log_history"],
    }


CHILDREN = {
    "sft_job": child_sft_job,
    "trl_baseline": child_trl_baseline,
    "pretrain": child_pretrain,
}


def run_child(kind: str, spec: dict, work: Path, label: str, script: str = __file__) -> dict:
    """Run `script --child kind` in its own process; its result, plus the process's wall time."""
    name = Path(script).stem
    spec_path, result_path = work / f"{label}.spec.json", work / f"{label}.result.json"
    log_path = work / f"{label}.log"
    spec_path.write_text(json.dumps(spec))
    print(f"[{name}] {label} ...", flush=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, script, "--child", kind, str(spec_path), str(result_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(log_path.read_text()[-6000:], file=sys.stderr)
        raise RuntimeError(f"{label} failed (exit {proc.returncode}); log above")
    result = json.loads(result_path.read_text())
    result["process_seconds"] = round(wall, 1)
    print(f"[{name}] {label}: {wall:.0f} s", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# Models and data


def save_llama(out: Path, tokenizer_dir: Path, shape: dict) -> int:
    """A Llama of `shape` (random weights, seed 0) with the tiny tokenizer; its parameter count."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    from workloads.train.tiny import TinyModelConfig, llama_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = llama_config(
        TinyModelConfig(**shape),
        tokenizer,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig.from_pretrained(tokenizer_dir).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def build_sample_and_tiny(work: Path) -> None:
    """The sample corpus in work/sample and the tiny tokenizer and Llama trained on it in
    work/tiny, each by its own command (`make demo` builds them the same way)."""
    subprocess.run(
        [sys.executable, "-m", "workloads.data.sample", "build", "--out", str(work / "sample")],
        check=True,
        cwd=REPO,
    )
    subprocess.run(
        [sys.executable, "-m", "workloads.train.tiny", "--out", str(work / "tiny")]
        + ["--corpus", str(work / "sample" / "corpus")],
        check=True,
        cwd=REPO,
    )


def prepare(work: Path, names: list[str]) -> dict:
    """Sample corpus, tiny tokenizer, instruction set and the models the measurements need."""
    build_sample_and_tiny(work)
    from workloads.train.sft import make_instructions

    prepared = {"tiny": work / "tiny", "instructions": work / "instructions.jsonl"}
    prepared["instruction_counts"] = make_instructions(prepared["instructions"])
    for name, shape in (("overhead", OVERHEAD_MODEL), ("memory", MEMORY_MODEL)):
        if name in names:
            prepared[f"{name}_model"] = work / f"llama-{name}"
            prepared[f"{name}_parameters"] = save_llama(
                work / f"llama-{name}", work / "tiny", shape
            )
    return prepared


# ---------------------------------------------------------------------------------------------
# The three measurements


def throughput(log_history: list[dict]) -> dict:
    """Tokens/s two ways, read the same way from either side's rank-0 log_history:
    `end_to_end` = num_input_tokens_seen / train_runtime (the whole `trainer.train()`: first steps,
    the final checkpoint and, in the job, its report to Ray Train); `steady` = mean of the
    ThroughputCallback windows after the first (logged before the save of their step)."""
    final = next(e for e in reversed(log_history) if "train_runtime" in e)
    tokens = max(e.get("num_input_tokens_seen", 0) for e in log_history)
    windows = [e["tokens_per_second"] for e in log_history if "tokens_per_second" in e]
    return {
        "tokens": tokens,
        "train_runtime": final["train_runtime"],
        "end_to_end": round(tokens / final["train_runtime"], 1),
        "steady": round(statistics.mean(windows[1:]), 1),
        "windows": windows,
        "final_loss": [e["loss"] for e in log_history if "loss" in e][-1],
    }


def bench_overhead(work: Path, prepared: dict) -> dict:
    runs = []
    tokenized = None
    for i in (1, 2):
        out = work / f"overhead-job-{i}"
        overrides = [
            f"model.name_or_path={prepared['overhead_model']}",
            f"data.path={prepared['instructions']}",
            f"output.path={out}",
            f"storage_path={out}-ray-train",
            "output.mode=overwrite",
            *OVERHEAD_OVERRIDES,
        ]
        job = run_child("sft_job", {"overrides": overrides}, work, f"overhead-job-{i}")
        tokenized = tokenized or job["tokenized"]  # the baseline trains on the first run's rows
        runs.append(
            {
                "side": "job",
                "round": i,
                **throughput(job["log_history"]),
                "run_seconds": round(job["run_seconds"], 1),
                "process_seconds": job["process_seconds"],
                "stages": job["stages"],
                "sequences": job["extra"]["sequences"]["train"],
            }
        )
        base = run_child(
            "trl_baseline",
            {"overrides": overrides, "tokenized": tokenized},
            work,
            f"overhead-baseline-{i}",
        )
        runs.append(
            {
                "side": "baseline",
                "round": i,
                **throughput(base["log_history"]),
                "run_seconds": round(base["run_seconds"], 1),
                "process_seconds": base["process_seconds"],
                "torch_threads": base["torch_threads"],
                "sequences": base["train_sequences"],
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
        "ratio_process_seconds": round(
            statistics.mean(r["process_seconds"] for r in base_runs)
            / statistics.mean(r["process_seconds"] for r in job_runs),
            3,
        ),
        "target": TARGET_RATIO,
    }


def bench_memory(work: Path, prepared: dict) -> dict:
    stages = []
    for stage in MEMORY_STAGES:
        out = work / f"memory-{stage}"
        overrides = [
            f"model.name_or_path={prepared['memory_model']}",
            f"data.path={prepared['instructions']}",
            f"output.path={out}",
            f"storage_path={out}-ray-train",
            "output.mode=overwrite",
            f"deepspeed.config={stage}",
            *MEMORY_OVERRIDES,
        ]
        job = run_child("sft_job", {"overrides": overrides}, work, f"memory-{stage}")
        peaks = job["extra"]["peak_memory_mb_per_worker"]
        logged = [e["peak_memory_mb"] for e in job["log_history"] if "peak_memory_mb" in e]
        current = [e["memory_mb"] for e in job["log_history"] if "memory_mb" in e]
        stages.append(
            {
                "stage": stage,
                "peak_mb_per_worker": peaks,
                "peak_mb_max": max(peaks),
                # Rank 0's peak at the last logged step, before the final checkpoint is written.
                "rank0_peak_mb_before_final_save": logged[-1] if logged else None,
                # Rank 0's resident set at the last logged step: what training holds, steadily.
                "rank0_rss_mb_last_step": current[-1] if current else None,
                "steps": job["extra"]["global_step"],
                "trainable_parameters": job["extra"]["trainable_parameters"],
                "model_seconds": job["stages"].get("model"),
                "process_seconds": job["process_seconds"],
            }
        )
    return {
        "parameters": prepared["memory_parameters"],
        "shape": MEMORY_MODEL,
        "overrides": MEMORY_OVERRIDES,
        "stages": stages,
        "lowest": min(stages, key=lambda s: s["peak_mb_max"])["stage"],
    }


def bench_pretrain(work: Path, prepared: dict) -> dict:
    data = CURATED if CURATED.is_dir() else work / "sample" / "corpus"
    out = work / "pretrain"
    overrides = [
        f"tokenizer={prepared['tiny']}",
        f"data.path={data}",
        f"output.path={out}",
        f"storage_path={out}-ray-train",
        "output.mode=overwrite",
        "ray.data_progress_bars=false",
    ]
    job = run_child("pretrain", {"overrides": overrides}, work, "pretrain")
    extra = job["extra"]
    tokens = max(e.get("num_input_tokens_seen", 0) for e in job["log_history"])
    return {
        "data": str(data.relative_to(REPO)) if data.is_relative_to(REPO) else "sample corpus",
        "documents": extra["documents"],
        "corpus_tokens": extra["tokens"],
        "parameters": extra["parameters"],
        "steps": extra["global_step"],
        "tokens_trained": tokens,
        "perplexity": extra["perplexity"],
        "eval_loss": extra["eval_loss"],
        "tokens_per_second": extra["tokens_per_second"],
        "peak_mb_per_worker": extra["peak_memory_mb_per_worker"],
        "model_seconds": job["stages"].get("model"),
        "run_seconds": round(job["run_seconds"], 1),
        "process_seconds": job["process_seconds"],
    }


BENCHES = {"overhead": bench_overhead, "memory": bench_memory, "pretrain": bench_pretrain}


# ---------------------------------------------------------------------------------------------
# Report


def section_overhead(r: dict) -> list[str]:
    lines = [
        "### overhead: the SFT job against plain TRL",
        "",
        f"LoRA (lora-cpu.yaml: r 16, all-linear, batch 8, max_length 256, lr 1e-3) on a "
        f"{r['parameters'] / 1e6:.1f}M-parameter Llama (hidden {r['shape']['hidden_size']}, "
        f"{r['shape']['num_hidden_layers']} layers, intermediate {r['shape']['intermediate_size']}, "
        f"{r['shape']['num_attention_heads']}:{r['shape']['num_key_value_heads']} heads, tiny "
        f"tokenizer), {OVERHEAD_STEPS} steps, logging every {OVERHEAD_LOGGING}. Job: "
        "`workloads.train.sft.run` with `" + " ".join(r["overrides"]) + "`. Baseline: TRL "
        "SFTTrainer in a process without Ray on the job's own tokenized train rows, with the same "
        "`training_arguments(...)` (deepspeed=None), model loader, LoRA config and "
        "ThroughputCallback. Both sides use 2 torch threads.",
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
        f"steady **{r['ratio_steady']:.3f}** (target ≥ {r['target']}); process wall time "
        f"baseline / job {r['ratio_process_seconds']:.3f}.",
        "",
        "End to end is `num_input_tokens_seen / train_runtime` from the rank-0 `log_history` (the "
        "job's is kept in `<output>/model/_SUCCESS.json`): all of `trainer.train()`, including the "
        "first steps and the checkpoint the Trainer always writes at the last step (in the job, "
        "also its report to Ray Train storage). Steady is the mean of the ThroughputCallback's "
        "windows after the first, each logged before its step's save. Process wall time is the "
        "whole child process: for the job, Ray start, tokenization, rejects, training, export "
        "and curves; for the baseline, imports, loading and training on already tokenized rows.",
    ]
    return lines


def section_memory(r: dict) -> list[str]:
    lines = [
        "### memory: peak per worker under ZeRO-0, 2 and 3",
        "",
        f"Full fine-tuning of a {r['parameters'] / 1e6:.1f}M-parameter Llama (hidden "
        f"{r['shape']['hidden_size']}, {r['shape']['num_hidden_layers']} layers, intermediate "
        f"{r['shape']['intermediate_size']}, {r['shape']['num_attention_heads']}:"
        f"{r['shape']['num_key_value_heads']} heads), fp32, AdamW: "
        f"{r['parameters'] * 16 / 2**20:,.0f} MB of weights, gradients and optimizer state "
        "unpartitioned. Two CPU workers (gloo), `" + " ".join(r["overrides"]) + "`. The peak is "
        "each worker process's peak RSS (`extra.peak_memory_mb_per_worker`), so it includes the "
        "Python, torch, Ray and DeepSpeed imports, model loading and the final checkpoint.",
        "",
        "| DeepSpeed config | peak rank 0 | peak rank 1 | max | rank 0 peak before the final save "
        "| rank 0 RSS at the last step | model stage |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in r["stages"]:
        peaks = s["peak_mb_per_worker"]
        rss = s.get("rank0_rss_mb_last_step")
        lines.append(
            f"| {s['stage']} | {peaks[0]:,.0f} MB | {peaks[1]:,.0f} MB | **{s['peak_mb_max']:,.0f} MB** "
            f"| {s['rank0_peak_mb_before_final_save']:,.0f} MB "
            f"| {f'{rss:,.0f} MB' if rss else 'n/a'} | {s['model_seconds']:.0f} s |"
        )
    lines += [
        "",
        f"Lowest peak: {r['lowest']}.",
        "",
        "Two things make ZeRO's savings visible on CPU at this size. (1) The workers fix glibc's mmap "
        "and trim thresholds at 128 KiB (`workloads.train.ray_train.limit_heap_retention`): by "
        "default glibc raises the mmap threshold after large frees, so the 1-32 MB tensors ZeRO-3 "
        "gathers and frees every step came from a heap that only grew; a diagnostic run measured "
        "~600 MB of freed-but-held heap per worker under ZeRO-3 (`mallinfo2`), which made it peak "
        "above ZeRO-0 (2,141 MB against 1,861). (2) `zero3.json` keeps DeepSpeed's default "
        "limits (1e9 live parameters, 1e9-element optimizer sub-groups), which are sized for 1B+ "
        "models: at 49M the whole model stays gathered. `zero3-small.json` lowers them to 1e7. "
        "The thresholds cost speed: every large tensor becomes a fresh mmap with fresh page "
        "faults. In one run of the overhead measurement above with them on for the job (as "
        "`deepspeed.release_host_memory=on` would; this command does not rerun that variant), "
        "the job ran at 0.505x the baseline (609 and 579 against 1,219 and 1,134 tokens/s), so "
        "`deepspeed.release_host_memory: auto` turns them on only under ZeRO-3, which one picks "
        "to save memory.",
    ]
    if r.get("note"):
        lines += ["", r["note"]]
    return lines


def section_pretrain(r: dict) -> list[str]:
    p = r["perplexity"]
    return [
        "### pretrain: tiny-cpu.yaml against the unigram baseline",
        "",
        f"`ray_jobs/configs/pretrain/tiny-cpu.yaml` with the tokenizer built on the sample corpus "
        f"and data `{r['data']}` ({r['documents']['train']:,} train / {r['documents']['eval']:,} "
        f"held-out documents, {r['corpus_tokens']['train']:,} train tokens, "
        f"{r['corpus_tokens']['eval']:,} held-out tokens in blocks); "
        f"{r['parameters'] / 1e6:.2f}M parameters, two workers under ZeRO-2.",
        "",
        "| steps | tokens trained | perplexity before | after | unigram | after / unigram "
        "| tokens/s | model stage | whole job |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {r['steps']} | {r['tokens_trained']:,} | {p['before_training']:,.1f} "
        f"| **{p['after_training']:,.1f}** | {p['unigram_baseline']:,.1f} "
        f"| **{p['ratio_to_unigram']:.3f}** | {r['tokens_per_second']:,.0f} "
        f"| {r['model_seconds']:.0f} s | {r['run_seconds']:.0f} s |",
    ]


def section(results: dict) -> str:
    lines = [
        "<!-- sft:start -->",
        "## sft",
        "",
        f"Command: `{results['command']}` ({results['machine']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
        + "). Each run is its own process; nothing else ran on the machine.",
    ]
    for name, render in (
        ("overhead", section_overhead),
        ("memory", section_memory),
        ("pretrain", section_pretrain),
    ):
        if name in results:
            lines += ["", *render(results[name])]
    lines.append("<!-- sft:end -->")
    return "\n".join(lines)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}"


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
    with tempfile.TemporaryDirectory(prefix="sft_bench-") as tmp:
        work = Path(tmp)
        prepared = prepare(work, names)
        for name in names:
            start = time.perf_counter()
            results[name] = BENCHES[name](work, prepared)
            results[name]["bench_seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps({name: results[name]}, indent=1, default=str)[:4000], flush=True)
            # Written after each measurement, so a later one failing keeps the earlier ones.
            results.update(command=COMMAND, machine=machine(), versions=package_versions())
            RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    write_section("sft", section(results))
    failed = []
    if "overhead" in names and results["overhead"]["ratio_end_to_end"] < TARGET_RATIO:
        failed.append(f"overhead ratio {results['overhead']['ratio_end_to_end']} < {TARGET_RATIO}")
    if "memory" in names and not results["memory"]["lowest"].startswith("zero3"):
        failed.append(f"memory: {results['memory']['lowest']} peaks lowest, not ZeRO-3")
    for line in failed:
        print(f"NOTE: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
