"""LoRA sweep benchmark: the compute ASHA saves against running every config to the end, whether
it finds the same best config, and the best eval loss against the default LoRA config. Writes
bench/tune_results.json and the `tune` section of bench/RESULTS.md.

    .venv/bin/python bench/tune_bench.py          # ~15 min on 2 cores

Both sweeps run `ray_jobs/configs/tune_lora/sft-cpu.yaml` with the same grid of 6 configs (LoRA rank
4 or 16 x learning rate 3e-4, 1e-3 or 3e-3, alpha = 2 x rank), once with `scheduler.type=fifo` (every
trial to step 30: the full grid) and once with ASHA (grace period 10, reduction factor 2). One of
the six is the default LoRA config of ray_jobs/configs/sft/lora-cpu.yaml (rank 16, alpha 32, lr
1e-3), so the full grid also measures the default. Each sweep is its own process
(`python ray_jobs/tune_lora.py`), on the demo's pretrained model and instruction set (the bench
builds them in a temporary folder when `make demo` has not).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench.results_md import write_section  # noqa: E402
from bench.sft_bench import build_sample_and_tiny, machine  # noqa: E402
from workloads.common.manifest import package_versions  # noqa: E402

RESULTS_JSON = HERE / "tune_results.json"
COMMAND = ".venv/bin/python bench/tune_bench.py"
CONFIG = REPO / "ray_jobs" / "configs" / "tune_lora" / "sft-cpu.yaml"
PRETRAINED = REPO / "outputs" / "pretrain" / "model"
INSTRUCTIONS = REPO / "data" / "instructions.jsonl"
# Asynchronous ASHA judges each trial against those that reached its rung first, so the order
# trials start in matters: a grid walked from the worst config to the best never stops anything.
# The values are listed in a fixed shuffled order, as a random search would present them.
GRID = {
    "lora.r": {"grid": [16, 4]},
    "lora.alpha_over_r": {"grid": [2]},
    "train.learning_rate": {"grid": [1.0e-3, 3.0e-3, 3.0e-4]},
    "lora.target_modules": {"grid": ["all-linear"]},
}
DEFAULT = {"lora.r": 16, "train.learning_rate": 1.0e-3}  # ray_jobs/configs/sft/lora-cpu.yaml


def inputs(work: Path) -> tuple[Path, Path, str]:
    if PRETRAINED.is_dir() and INSTRUCTIONS.is_file():
        return (
            PRETRAINED,
            INSTRUCTIONS,
            "outputs/pretrain/model and data/instructions.jsonl (make demo)",
        )
    from workloads.train.sft import make_instructions

    build_sample_and_tiny(work)
    subprocess.run(
        [
            sys.executable,
            "ray_jobs/pretrain.py",
            "--config",
            "ray_jobs/configs/pretrain/tiny-cpu.yaml",
            f"tokenizer={work / 'tiny'}",
            f"data.path={work / 'sample' / 'corpus'}",
            f"output.path={work / 'pretrain'}",
            f"storage_path={work / 'ray-train'}",
        ],
        check=True,
        cwd=REPO,
    )
    make_instructions(work / "instructions.jsonl")
    return (
        work / "pretrain" / "model",
        work / "instructions.jsonl",
        "the demo's pretraining, run by the bench",
    )


def sweep(work: Path, label: str, model: Path, data: Path, scheduler: str) -> dict:
    out = work / label
    base = _base_overrides(model, data)
    args = [
        sys.executable,
        "ray_jobs/tune_lora.py",
        "--config",
        str(CONFIG),
        "base_overrides=" + json.dumps(base),
        "search_space=" + json.dumps(GRID),
        "search.algorithm=grid",
        f"scheduler.type={scheduler}",
        f"output.path={out}",
        "output.mode=overwrite",
    ]
    print(f"[tune_bench] {label} ...", flush=True)
    start = time.perf_counter()
    log = work / f"{label}.log"
    with log.open("w") as f:
        done = subprocess.run(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode:
        print(log.read_text()[-5000:], file=sys.stderr)
        raise RuntimeError(f"{label} failed")
    extra = json.loads((out / "_manifest.json").read_text())["extra"]
    print(f"[tune_bench] {label}: {wall:.0f} s", flush=True)
    return {"wall_seconds": round(wall, 1), **extra}


def _base_overrides(model: Path, data: Path) -> list[str]:
    import yaml

    shipped = yaml.safe_load(CONFIG.read_text())["base_overrides"]
    return [*shipped, f"model.name_or_path={model}", f"data.path={data}"]


def section(r: dict) -> str:
    full, asha = r["fifo"], r["asha"]

    def key(c: dict) -> str:
        return f"r {c['lora.r']}, lr {c['train.learning_rate']:g}"

    lines = [
        "<!-- tune:start -->",
        "## tune",
        "",
        f"Command: `{r['command']}` ({r['machine']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        + f"). Model and data: {r['inputs']}. Each sweep is its own process; nothing else ran.",
        "",
        "`ray_jobs/configs/tune_lora/sft-cpu.yaml` over the same grid of 6 configs (LoRA rank 4 or "
        "16, learning rate 3e-4, 1e-3 or 3e-3, alpha = 2 x rank, all linear layers), 30 steps at "
        "most, eval loss every 5 steps, 2 trials at a time (one CPU worker each).",
        "",
        "| trial | "
        + " | ".join(
            ["full grid: best eval loss", "steps", "ASHA: best eval loss", "steps", "stopped early"]
        )
        + " |",
        "|---|---|---|---|---|---|",
    ]
    asha_by = {key(t["config"]): t for t in asha["trials"]}
    for t in sorted(full["trials"], key=lambda t: key(t["config"])):
        a = asha_by.get(key(t["config"]), {})
        lines.append(
            f"| {key(t['config'])} | {t['best_eval_loss']:.4f} | {t['steps_run']} "
            f"| {a.get('best_eval_loss', float('nan')):.4f} | {a.get('steps_run')} | {a.get('stopped_early')} |"
        )
    saved = 1 - asha["trial_steps_run"] / full["trial_steps_run"]
    same = key(full["best"]["config"]) == key(asha["best"]["config"])
    default = next(t for t in full["trials"] if key(t["config"]) == key(DEFAULT))
    lines += [
        "",
        f"- Trial-steps: full grid **{full['trial_steps_run']}**, ASHA **{asha['trial_steps_run']}** "
        f"({saved:.0%} saved; {asha['stopped_early']} of 6 trials stopped early); sweep wall time "
        f"{full['wall_seconds']:.0f} s against {asha['wall_seconds']:.0f} s.",
        f"- Best config: full grid {key(full['best']['config'])} (eval loss "
        f"{full['best']['eval_loss']:.4f}), ASHA {key(asha['best']['config'])} "
        f"({asha['best']['eval_loss']:.4f}): {'the same' if same else 'different'}.",
        f"- The default LoRA config ({key(DEFAULT)}): eval loss {default['best_eval_loss']:.4f}; the "
        f"sweep's best is {full['best']['eval_loss']:.4f} "
        f"({(full['best']['eval_loss'] / default['best_eval_loss'] - 1):+.1%}).",
        "- Asynchronous ASHA judges a trial against those that reached its rung before it, so which "
        "trials it stops depends on when each gets there: a rerun can stop a different number of "
        "trials. The trials' losses are deterministic; only the stopping decisions vary.",
        "<!-- tune:end -->",
    ]
    return "\n".join(lines)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tune_bench-") as tmp:
        work = Path(tmp)
        model, data, source = inputs(work)
        results = {
            "fifo": sweep(work, "fifo", model, data, "fifo"),
            "asha": sweep(work, "asha", model, data, "asha"),
            "inputs": source,
            "command": COMMAND,
            "machine": machine(),
            "versions": package_versions(),
        }
    RESULTS_JSON.write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_section("tune", section(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
