"""MinHash dedup benchmark: quality against exact Jaccard, signature speed against datasketch, end-to-end
throughput and memory on local Ray. Writes bench/RESULTS.md (the `dedup` section) and a JSON beside it.

    .venv/bin/python bench/dedup_bench.py                    # everything, about 15 minutes on 2 cores
    .venv/bin/python bench/dedup_bench.py --only quality     # or: signatures, scale

Data: the embedded sample corpus (pydoc + stdlib, planted duplicates) and the larger corpus built from
the docstrings of every installed package (`python -m workloads.data.sample build --site-packages`).
Ground truth: exact Jaccard on the same shingles (NFKC, lowercase, digits folded, \\w+ words, 5-grams).
"""

from __future__ import annotations

import os

os.environ.setdefault("POLARS_MAX_THREADS", "1")  # per-core numbers: one thread, as in one Ray task
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import unicodedata  # noqa: E402
from collections import defaultdict  # noqa: E402
from itertools import combinations  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from results_md import write_section  # noqa: E402  (bench/, beside this script)

from workloads.common.config import load_config  # noqa: E402
from workloads.common.ray_runtime import local_system_config  # noqa: E402
from workloads.data.dedup.minhash import (  # noqa: E402
    MinHashConfig,
    ShingleConfig,
    minhash_signatures,
    shingle_hashes,
)
from workloads.data.dedup.minhash_lsh import MinHashDedupConfig, run  # noqa: E402
from workloads.data.sample import build, read_corpus_texts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "ray_jobs/configs/dedup/minhash-local.yaml"
RESULTS = REPO / "bench" / "RESULTS.md"
_WORD = re.compile(r"\w+")


def shingles(text: str, n: int = 5) -> set[str]:
    words = _WORD.findall(re.sub(r"\d", "0", unicodedata.normalize("NFKC", text).lower()))
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def true_pairs(
    docs: dict[str, str], threshold: float, max_df: int = 200
) -> dict[tuple[str, str], float]:
    """Every pair with exact Jaccard >= threshold. Candidates share a shingle held by at most max_df
    documents: a pair at J >= 0.8 shares 80% of its shingles, so it always shares a rarer one."""
    sets = {d: shingles(t) for d, t in docs.items()}
    index: dict[str, list[str]] = defaultdict(list)
    for d, s in sets.items():
        for sh in s:
            index[sh].append(d)
    candidates = set()
    for members in index.values():
        if 1 < len(members) <= max_df:
            candidates.update(combinations(sorted(members), 2))
    out = {}
    for a, b in candidates:
        sa, sb = sets[a], sets[b]
        if not sa or not sb:
            continue
        j = len(sa & sb) / len(sa | sb)
        if j >= threshold:
            out[(a, b)] = j
    return out


def run_job(corpus: Path, out: Path, *overrides: str):
    cfg = load_config(
        MinHashDedupConfig,
        CONFIG,
        [f"input.path={corpus}", f"output.path={out}", "output.mode=overwrite", *overrides],
    )
    return cfg, run(cfg)


def quality(corpus: Path, out: Path) -> dict:
    docs = read_corpus_texts(corpus)
    cfg, manifest = run_job(corpus, out)
    t = cfg.minhash.threshold
    truth = true_pairs(docs, t)
    removed = {r["id"]: r["duplicate_of"] for r in pq.read_table(out / "removed").to_pylist()}

    def cluster(d: str) -> str:
        return removed.get(d, d)

    sets = {}

    def jac(a: str, b: str) -> float:
        for d in (a, b):
            if d not in sets:
                sets[d] = shingles(docs[d])
        return len(sets[a] & sets[b]) / max(1, len(sets[a] | sets[b]))

    predicted = [(d, k) for d, k in removed.items()]
    pair_tp = sum(1 for d, k in predicted if jac(d, k) >= t)
    pair_recall_hits = sum(1 for a, b in truth if cluster(a) == cluster(b))
    true_docs = {d for pair in truth for d in pair}
    flagged = set(removed) | set(removed.values())
    near_truth = {p: j for p, j in truth.items() if j < 1.0}
    return {
        "documents": len(docs),
        "threshold": t,
        "bands_x_rows": f"{manifest.extra['bands']} x {manifest.extra['rows_per_band']}",
        "true_pairs": len(truth),
        "true_pairs_below_1": len(near_truth),
        "predicted_pairs": len(predicted),
        "pair_precision": pair_tp / max(1, len(predicted)),
        "pair_recall": pair_recall_hits / max(1, len(truth)),
        "near_pair_recall": sum(1 for a, b in near_truth if cluster(a) == cluster(b))
        / max(1, len(near_truth)),
        "doc_precision": len(flagged & true_docs) / max(1, len(flagged)),
        "doc_recall": len(flagged & true_docs) / max(1, len(true_docs)),
        "rejected_by_verification": manifest.extra["rejected_by_verification"],
    }


def signature_speed(texts: list[str], num_perm: int = 128) -> dict:
    from datasketch import MinHash

    shingle_cfg, mh_cfg = ShingleConfig(), MinHashConfig(num_perm=num_perm)
    mb = sum(len(t.encode()) for t in texts) / 1e6

    # Each side gets its natural input: ours an Arrow string column (what Ray Data's map_batches
    # hands the signature stage), datasketch Python strings.
    batches = [pa.array(texts[i : i + 1024], pa.large_string()) for i in range(0, len(texts), 1024)]
    # Warm-up, untimed: the numba kernels load from their cache and polars starts on first use.
    minhash_signatures(*shingle_hashes(batches[0], shingle_cfg, mh_cfg.seed), mh_cfg)
    start = time.perf_counter()
    for batch in batches:  # 1024 rows: Ray Data's default batch size
        h, c = shingle_hashes(batch, shingle_cfg, mh_cfg.seed)
        minhash_signatures(h, c, mh_cfg)
    ours = time.perf_counter() - start

    start = time.perf_counter()
    for text in texts:  # the same normalisation and 5-word shingles, hashed by datasketch (sha1)
        m = MinHash(num_perm=num_perm)
        m.update_batch([s.encode() for s in shingles(text)])
        m.hashvalues  # noqa: B018
    theirs = time.perf_counter() - start
    return {
        "documents": len(texts),
        "mb": round(mb, 2),
        "num_perm": num_perm,
        "ours_mb_s": mb / ours,
        "ours_docs_s": len(texts) / ours,
        "datasketch_mb_s": mb / theirs,
        "datasketch_docs_s": len(texts) / theirs,
        "speedup": theirs / ours,
    }


class RssSampler:
    """Peak RSS of this (driver) process and of every Ray worker process, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.driver = 0
        self.workers: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if cmd.startswith("ray::") and p.info["memory_info"] is not None:
                    self.workers[p.pid] = max(self.workers.get(p.pid, 0), p.info["memory_info"].rss)
            time.sleep(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


_LETTERS = re.compile(r"[A-Za-z]+")


def scaled_corpus(base: Path, out: Path, copies: int) -> Path:
    """`copies` copies of the corpus under `base`, each a different corpus of the same shape: copy
    c > 0 appends three letters of its own to every word and `~c` to every id, so no shingle or id
    repeats across copies, while lengths, the duplicates planted inside a copy and the malformed
    lines all do."""
    folder = out / "corpus"
    if (out / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(base.glob("*.jsonl")):
        lines = [line for line in f.read_bytes().split(b"\n") if line.strip()]
        for c in range(copies):
            suffix = "" if c == 0 else "q" + chr(ord("a") + c - 1) * 2
            rows = []
            for raw in lines:
                try:
                    record = json.loads(raw)
                except ValueError:
                    record = None
                if c and isinstance(record, dict):
                    if isinstance(record.get("text"), str):
                        record["text"] = _LETTERS.sub(r"\g<0>" + suffix, record["text"])
                    if isinstance(record.get("id"), str):
                        record["id"] = f"{record['id']}~{c}"
                    raw = json.dumps(record).encode()
                rows.append(raw)
            (folder / f"{f.stem}-copy{c}.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    (out / "done").touch()
    return folder


def scale_corpora(work: Path, copies: tuple[int, ...]) -> dict[int, Path]:
    """{copies: corpus folder}: the 16,000-document corpus and its scaled copies."""
    base = work / "site-16000"
    if not (base / "planted.json").exists():
        build(base, docs=16000, seed=0, shards=16, site_packages=True)
    return {
        k: base / "corpus"
        if k == 1
        else scaled_corpus(base / "corpus", work / f"site-16000-x{k}", k)
        for k in copies
    }


def corpus_mb(corpus: Path) -> float:
    """Input size: the corpus's JSONL files, in MB."""
    return sum(p.stat().st_size for p in corpus.glob("*.jsonl")) / 1e6


def cold_run(corpus: Path, out: Path) -> dict:
    """The job's own command in a fresh process, as a user runs it: Python start, imports, a new
    local Ray and its worker processes all count."""
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(REPO / "ray_jobs/dedup_minhash.py"),
            "--config",
            str(CONFIG),
            f"input.path={corpus}",
            f"output.path={out}",
            "output.mode=overwrite",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    wall = time.perf_counter() - start
    mb = corpus_mb(corpus)
    cpus = load_config(MinHashDedupConfig, CONFIG).ray.num_cpus or os.cpu_count()
    return {"mb": round(mb, 1), "wall_s": round(wall, 1), "mb_s_per_core": mb / wall / cpus}


def scale(work: Path, corpora: dict[int, Path]) -> list[dict]:
    # One untimed run first, so that every timed one finds Ray's worker processes started.
    run_job(corpora[min(corpora)], work / "out-warmup")
    rows = []
    for k, corpus in corpora.items():
        mb = corpus_mb(corpus)
        out = work / f"out-x{k}"
        with RssSampler() as rss:
            start = time.perf_counter()
            _, manifest = run_job(corpus, out)
            wall = time.perf_counter() - start
        cpus = int(__import__("ray").cluster_resources().get("CPU", 1))
        stage_bytes = {}
        for s in manifest.stages:
            folder = out / s.name
            if folder.is_dir():
                stage_bytes[s.name] = sum(f.stat().st_size for f in folder.rglob("*.parquet"))
        rows.append(
            {
                "copies": k,
                "documents": manifest.read,
                "mb": round(mb, 1),
                "cpus": cpus,
                "wall_s": round(wall, 1),
                "mb_s_per_core": mb / wall / cpus,
                "driver_peak_rss_mb": rss.driver / 2**20,
                "worker_peak_rss_mb": max(rss.workers.values(), default=0) / 2**20,
                "stages": {s.name: round(s.seconds, 1) for s in manifest.stages},
                "stage_bytes": stage_bytes,
                "counts": {
                    "kept": manifest.kept,
                    **manifest.dropped,
                    "rejected": manifest.total_rejected,
                },
                "extra": manifest.extra,
            }
        )
    return rows


def render(results: dict) -> str:
    lines = [
        "<!-- dedup:start -->",
        "## MinHash dedup (`bench/dedup_bench.py`)",
        "",
        f"Machine: {results['machine']}. Command: `.venv/bin/python bench/dedup_bench.py`.",
        "",
    ]
    if "quality" in results:
        lines += [
            "### Quality against exact Jaccard (default settings)",
            "",
            "| corpus | docs | threshold | b x r | true pairs (J<1) | pair P | pair R | near-pair R | doc P | doc R |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, q in results["quality"].items():
            lines.append(
                f"| {name} | {q['documents']:,} | {q['threshold']} | {q['bands_x_rows']} | {q['true_pairs']:,} "
                f"({q['true_pairs_below_1']:,}) | {q['pair_precision']:.3f} | {q['pair_recall']:.3f} | "
                f"{q['near_pair_recall']:.3f} | {q['doc_precision']:.3f} | {q['doc_recall']:.3f} |"
            )
        lines += [
            "",
            "Pair P: removed documents whose exact Jaccard to their kept document is >= the threshold. "
            "Pair R: true pairs that end in one cluster. Doc P/R: documents flagged as duplicates "
            "against documents that have a true partner. Reference: text-dedup's MinHash reports "
            "P 0.959 / R 0.942 on CORE.",
            "",
        ]
    if "signatures" in results:
        s = results["signatures"]
        lines += [
            "### Signature stage, one core, same shingles and K",
            "",
            "| K | docs | MB | ours MB/s | ours docs/s | datasketch MB/s | datasketch docs/s | speed-up |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {s['num_perm']} | {s['documents']:,} | {s['mb']} | {s['ours_mb_s']:.1f} | {s['ours_docs_s']:,.0f} | "
            f"{s['datasketch_mb_s']:.2f} | {s['datasketch_docs_s']:,.0f} | **{s['speedup']:.1f}x** |",
            "",
        ]
    if "scale" in results:
        lines += [
            "### End to end on local Ray (ingest, exact, signatures through removal) and memory",
            "",
            "The corpus is the 16,000-document one above; larger inputs are copies of it with every "
            "word and id suffixed per copy (`scaled_corpus`), so they scale without adding duplicates "
            "across copies.",
            "",
            "| input | docs | MB | CPUs | wall s | MB/s per core | driver peak RSS MB | largest worker peak RSS MB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in results["scale"]:
            lines.append(
                f"| {r.get('copies', 1)}x | {r['documents']:,} | {r['mb']} | {r['cpus']} | {r['wall_s']} | "
                f"{r['mb_s_per_core']:.2f} | {r['driver_peak_rss_mb']:.0f} | {r['worker_peak_rss_mb']:.0f} |"
            )
        small, big = results["scale"][0], results["scale"][-1]
        if big is not small:
            marginal = (big["mb"] - small["mb"]) / (big["wall_s"] - small["wall_s"]) / big["cpus"]
            lines += [
                "",
                f"Marginal throughput between the smallest and largest input: {marginal:.2f} MB/s per "
                "core. Target: 2 MB/s per core end to end. These runs share the benchmark's Ray "
                "session, as jobs submitted to a running cluster do: each pays one Ray Data execution "
                "per stage, not the start of Ray's worker processes. Peak RSS that stays flat while "
                "the input grows is the evidence that no stage gathers data on one process.",
            ]
        if "cold" in results:
            c = results["cold"]
            lines += [
                "",
                f"Cold, as a user runs it (`python ray_jobs/dedup_minhash.py`, a fresh process that "
                f"starts its own local Ray and worker processes) on the {c['copies']}x input: "
                f"{c['mb']} MB in {c['wall_s']} s, **{c['mb_s_per_core']:.2f} MB/s per core**.",
            ]
        lines += [
            "",
            f"Seconds per stage at {big['documents']:,} documents, and Parquet bytes each stage wrote:",
            "",
            "| stage | seconds | bytes written | bytes per input document |",
            "| --- | --- | --- | --- |",
        ]
        for name, sec in big["stages"].items():
            b = big["stage_bytes"].get(name)
            per = f"{b / big['documents']:.1f}" if b else ""
            lines.append(f"| {name} | {sec} | {b:,} | {per} |" if b else f"| {name} | {sec} | | |")
    lines.append("<!-- dedup:end -->")
    return "\n".join(lines)


def write_results(section: str) -> None:
    write_section("dedup", section, RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/dedup-bench"))
    parser.add_argument("--only", choices=["quality", "signatures", "scale"], action="append")
    parser.add_argument(
        "--copies",
        type=int,
        nargs="+",
        default=[1, 4, 8],
        help="input sizes for the scale run, in copies of the 16,000-document corpus",
    )
    args = parser.parse_args()
    only = set(args.only or ["quality", "signatures", "scale"])
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = REPO / "bench" / "dedup_results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if "scale" in only:
        corpora = scale_corpora(args.work, tuple(args.copies))
        largest = max(corpora)
        # First, before this process starts its Ray: the job as a user starts it, cold.
        results["cold"] = {"copies": largest, **cold_run(corpora[largest], args.work / "out-cold")}
        print(json.dumps(results["cold"], indent=1))
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _system_config=local_system_config(2),  # as the job's own init_ray does
    )
    results["machine"] = (
        f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.processor() or platform.machine()}"
    )
    if "quality" in only:
        stdlib = args.work / "stdlib"
        if not (stdlib / "planted.json").exists():
            build(stdlib, seed=0)
        site = args.work / "site-4000"
        if not (site / "planted.json").exists():
            build(site, docs=4000, seed=0, shards=16, site_packages=True)
        results["quality"] = {
            "stdlib sample": quality(stdlib / "corpus", args.work / "q-stdlib"),
            "site-packages 4k": quality(site / "corpus", args.work / "q-site"),
        }
        print(json.dumps(results["quality"], indent=1))
    if "signatures" in only:
        site = args.work / "site-16000"
        if not (site / "planted.json").exists():
            build(site, docs=16000, seed=0, shards=16, site_packages=True)
        texts = list(read_corpus_texts(site / "corpus").values())
        results["signatures"] = signature_speed(texts)
        print(json.dumps(results["signatures"], indent=1))
    if "scale" in only:
        results["scale"] = scale(args.work, corpora)
        print(json.dumps(results["scale"], indent=1, default=str))
    results_path.write_text(json.dumps(results, indent=1, default=str))
    write_results(render(results))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
