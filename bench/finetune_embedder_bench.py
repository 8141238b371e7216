"""Embedding fine-tuning benchmark: held-out recall@10 and MRR@10 of all-MiniLM-L6-v2 before and after
the finetune_embedder job. Writes bench/finetune_embedder_results.json and the `finetune_embedder`
section of bench/RESULTS.md.

    .venv/bin/python bench/finetune_embedder_bench.py                     # both sets, ~15 min on 2 cores
    .venv/bin/python bench/finetune_embedder_bench.py --only stdlib       # or: site-packages

Each set runs the embedded default config (ray_jobs/configs/finetune_embedder/default.yaml: two
gloo workers, batch 32 per worker, one epoch, max_seq_length 128) with only the data and output
paths changed. Pairs: (first sentence, rest of the document) from `workloads.data.sample`
documents, made by `python -m workloads.train.embedder make-pairs`:
  stdlib         every pair from the pydoc topics and standard-library docstrings (the default's data)
  site-packages  a seeded sample of 3,000 pairs from those plus every installed package's
                 docstrings: a held-out set about three times larger, so the gain is measured
                 on more queries
The job holds out 20% of the documents; their queries are ranked against all held-out documents.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench.results_md import write_section  # noqa: E402
from workloads.common.config import load_config  # noqa: E402
from workloads.common.manifest import package_versions  # noqa: E402
from workloads.train.embedder import FinetuneEmbedderConfig, pairs_from_documents, run  # noqa: E402

CONFIG = REPO / "ray_jobs" / "configs" / "finetune_embedder" / "default.yaml"
RESULTS_JSON = HERE / "finetune_embedder_results.json"
SITE_PACKAGES_PAIRS = 3000
COMMAND = ".venv/bin/python bench/finetune_embedder_bench.py"
SETS = ("stdlib", "site-packages")


def write_pairs(name: str, out: Path) -> int:
    from workloads.data.sample import base_documents

    records, _ = pairs_from_documents(base_documents(site_packages=name == "site-packages"))
    if name == "site-packages":
        records = random.Random(0).sample(records, SITE_PACKAGES_PAIRS)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return len(records)


def bench_set(name: str, work: Path) -> dict:
    pairs = work / f"{name}.jsonl"
    n_pairs = write_pairs(name, pairs)
    out = work / f"out-{name}"
    cfg = load_config(
        FinetuneEmbedderConfig,
        CONFIG,
        [
            f"data.path={pairs}",
            f"output.path={out}",
            f"storage_path={work / 'ray_train'}",
            "output.mode=overwrite",
        ],
    )
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    manifest = run(cfg)
    wall = time.perf_counter() - start
    extra = manifest.extra
    losses = [e["loss"] for e in extra["train_loss"]]
    return {
        "set": name,
        "pairs": n_pairs,
        "rejected": manifest.total_rejected,
        "train_pairs": extra["split"]["train"],
        "held_out_queries": extra["split"]["held_out"],
        "held_out_corpus": extra["held_out_corpus"],
        "steps": extra["steps"],
        "before": extra["before"],
        "after": extra["after"],
        "improvement": extra["improvement"],
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "train_seconds": round(next(s.seconds for s in manifest.stages if s.name == "model"), 1),
        "wall_seconds": round(wall, 1),
        "load_average_at_start": round(load_before, 2),
        "improved": extra["after"]["recall@10"] > extra["before"]["recall@10"]
        and extra["after"]["mrr@10"] > extra["before"]["mrr@10"],
    }


def section(results: dict) -> str:
    cfg = results["config"]
    lines = [
        "<!-- finetune_embedder:start -->",
        "## finetune_embedder",
        "",
        f"Command: `{COMMAND}` ({results['machine']}). Model {cfg['model']}, "
        f"{cfg['scaling']['num_workers']} CPU workers (gloo), batch {cfg['train']['batch_size']} "
        f"per worker (embeddings gathered: {cfg['train']['batch_size'] * cfg['scaling']['num_workers']} "
        f"in-batch candidates), {cfg['train']['epochs']:g} epoch, lr {cfg['train']['learning_rate']:g}, "
        f"max_seq_length {cfg['train']['max_seq_length']}: the embedded default config. Held-out "
        "queries are ranked against every held-out document (cosine).",
        "",
        "| pairs | train / held out | steps | recall@10 before → after | MRR@10 before → after "
        "| recall@1 before → after | held-out loss before → after | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["sets"]:
        b, a = r["before"], r["after"]
        lines.append(
            f"| {r['set']} ({r['pairs']:,}) | {r['train_pairs']:,} / {r['held_out_queries']:,} "
            f"| {r['steps']} | {b['recall@10']:.3f} → **{a['recall@10']:.3f}** "
            f"| {b['mrr@10']:.3f} → **{a['mrr@10']:.3f}** | {b['recall@1']:.3f} → {a['recall@1']:.3f} "
            f"| {b['loss']:.3f} → {a['loss']:.3f} | {r['train_seconds']:.0f} s |"
        )
    lines += [
        "",
        "Train time is the whole `model` stage (Ray Train start, the evaluation before and after, "
        "the steps, the checkpoint), measured on a shared 2-core machine (load average at start "
        + ", ".join(f"{r['set']}: {r['load_average_at_start']}" for r in results["sets"])
        + "), so it is an upper bound.",
        "<!-- finetune_embedder:end -->",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=SETS, help="run one set")
    args = parser.parse_args()
    names = [args.only] if args.only else list(SETS)
    previous = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    by_name = {r["set"]: r for r in previous.get("sets", [])}
    with tempfile.TemporaryDirectory(prefix="finetune_embedder_bench-") as tmp:
        for name in names:
            result = bench_set(name, Path(tmp))
            print(json.dumps(result, indent=2))
            by_name[name] = result
    results = {
        "command": COMMAND,
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
        "versions": package_versions(),
        "config": load_config(FinetuneEmbedderConfig, CONFIG).model_dump(
            mode="json", include={"model", "train", "eval", "scaling"}
        ),
        "sets": [by_name[n] for n in SETS if n in by_name],
    }
    RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    write_section("finetune_embedder", section(results))
    failed = [r["set"] for r in results["sets"] if not r["improved"]]
    if failed:
        print(f"FAIL: recall@10 or MRR@10 did not improve on {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
