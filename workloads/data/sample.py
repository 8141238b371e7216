"""The embedded sample corpus: real English text from this machine's Python installation, with planted
duplicates and malformed records whose ground truth is written beside it.

    python -m workloads.data.sample build --out data/sample            # corpus/ + planted.json
    python -m workloads.data.sample report --sample data/sample --output outputs/dedup_exact

Text comes from the pydoc topic pages (`pydoc_data.topics`) and the docstrings of the standard library
(read with `ast`, nothing is imported), so no third-party text is committed or downloaded. Base
documents are filtered so that no two of them share much text; then the builder plants
  exact     byte-identical copies under new ids,
  reformat  copies that differ only in whitespace (re-wrapped lines, doubled spaces),
  near      copies with about 1 word in 100 substituted, deleted, inserted or swapped
            (word 5-gram Jaccard to the original stays near 0.9),
  malformed records of every kind the readers reject (bad JSON, bad UTF-8, missing/non-string/empty
            text, a JSON value that is not an object, an id that is not a scalar),
and records each of them in planted.json.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import re
import sysconfig
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from workloads.common import documents as reasons

MIN_WORDS = 50
MAX_WORDS = 300
SHINGLE = 5
# A base document is dropped when this share of its shingles already appears in accepted ones, so
# the planted pairs are the only near duplicates in the corpus (stdlib repeats docstrings: _pyio/io).
MAX_SHARED_SHINGLES = 0.2
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "turtledemo",
    "ensurepip",
    "__pycache__",
}
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class BaseDoc:
    source: str
    title: str
    text: str


def _paragraph_docs(source: str, title: str, text: str) -> list[BaseDoc]:
    """Split text on blank lines and pack paragraphs into documents of MIN..MAX words."""
    docs, current, words = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        n = len(para.split())
        if n == 0:
            continue
        if words and words + n > MAX_WORDS:
            if words >= MIN_WORDS:
                docs.append(BaseDoc(source, title, "\n\n".join(current)))
            current, words = [], 0
        current.append(para.strip("\n"))
        words += n
    if words >= MIN_WORDS:
        docs.append(BaseDoc(source, title, "\n\n".join(current)))
    return docs


def _pydoc_topics() -> list[BaseDoc]:
    from pydoc_data.topics import topics

    out: list[BaseDoc] = []
    for name in sorted(topics):
        out.extend(_paragraph_docs(f"pydoc:{name}", name, topics[name]))
    return out


def _module_docstrings(root: Path, label: str) -> list[BaseDoc]:
    out: list[BaseDoc] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.endswith(".py") or filename.startswith(("_py", "test_")):
                continue
            path = Path(dirpath, filename)
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            # A module's docstrings, in source order, packed into documents of MIN..MAX words.
            nodes = [
                tree,
                *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))),
            ]
            texts = [d for d in (ast.get_docstring(n) for n in nodes) if d and len(d.split()) >= 8]
            out.extend(_paragraph_docs(f"{label}:{module}", module, "\n\n".join(texts)))
    return out


def _shingles(text: str) -> set[str]:
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return {" ".join(words[i : i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1))}


def base_documents(site_packages: bool = False) -> list[BaseDoc]:
    """Distinct documents: no two share more than MAX_SHARED_SHINGLES of their word 5-grams.

    The pydoc topics and the standard library give about 1,000 documents (2 MB). With
    `site_packages`, the docstrings of every installed package join them (tens of MB in this
    project's venv): the larger corpus the benchmarks scale with.
    """
    paths = sysconfig.get_paths()
    sources = _pydoc_topics() + _module_docstrings(Path(paths["stdlib"]), "stdlib")
    if site_packages:
        sources += _module_docstrings(Path(paths["purelib"]), "site-packages")
    seen: set[str] = set()
    accepted: list[BaseDoc] = []
    for doc in sources:
        sh = _shingles(doc.text)
        if len(sh & seen) > MAX_SHARED_SHINGLES * len(sh):
            continue
        seen |= sh
        accepted.append(doc)
    return accepted


# ---------------------------------------------------------------------------------------------
# Variants


def reformat(text: str, rng: random.Random) -> str:
    """Whitespace-only changes: re-wrap paragraphs, double some spaces, add trailing blanks."""
    width = rng.randint(50, 90)
    paras = [
        textwrap.fill(p, width=width, break_on_hyphens=False, break_long_words=False)
        for p in re.split(r"\n\s*\n", text)
    ]
    out = "\n\n".join(paras)
    out = re.sub(r" ", lambda m: "  " if rng.random() < 0.05 else " ", out)
    return out + "\n" * rng.randint(1, 2)


def near_duplicate(text: str, rng: random.Random, vocabulary: list[str]) -> str:
    """About 1 edit per 100 words: substitute, delete, insert or swap adjacent words."""
    words = text.split()
    for _ in range(max(1, len(words) // 100)):
        i = rng.randrange(len(words) - 1)
        op = rng.choice(("substitute", "delete", "insert", "swap"))
        if op == "substitute":
            words[i] = rng.choice(vocabulary)
        elif op == "delete":
            del words[i]
        elif op == "insert":
            words.insert(i, rng.choice(vocabulary))
        else:
            words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def _malformed_lines(n_each: int, rng: random.Random) -> list[tuple[bytes, str]]:
    """(raw line, the reason the readers must give) for every kind of bad record."""
    lines: list[tuple[bytes, str]] = []
    for k in range(n_each):
        tag = f"bad-{k:03d}"
        lines += [
            (
                f'{{"id": "{tag}-json", "text": "unterminated string'.encode(),
                reasons.MALFORMED_JSON,
            ),
            (
                b'{"id": "' + tag.encode() + b'-utf8", "text": "caf\xe9 cr\xe8me"}',
                reasons.INVALID_UTF8,
            ),
            (
                json.dumps({"id": f"{tag}-missing", "body": "text under the wrong key"}).encode(),
                reasons.MISSING_TEXT,
            ),
            (
                json.dumps({"id": f"{tag}-number", "text": rng.randint(1, 10**6)}).encode(),
                reasons.NON_STRING_TEXT,
            ),
            (json.dumps({"id": f"{tag}-empty", "text": " \n\t "}).encode(), reasons.EMPTY_TEXT),
            (json.dumps(["a list", "is not a document"]).encode(), reasons.NOT_AN_OBJECT),
            (
                json.dumps(
                    {"id": {"nested": tag}, "text": "an id must be a string or integer"}
                ).encode(),
                reasons.INVALID_ID,
            ),
        ]
    return lines


def build(
    out: Path,
    *,
    docs: int | None = None,
    seed: int = 0,
    shards: int = 4,
    exact_rate: float = 0.08,
    reformat_rate: float = 0.05,
    near_rate: float = 0.08,
    malformed_each: int = 3,
    site_packages: bool = False,
) -> dict:
    """Write `out/corpus/part-*.jsonl` and `out/planted.json`; return the planted ground truth."""
    rng = random.Random(seed)
    base = base_documents(site_packages)
    rng.shuffle(base)
    if docs is not None:
        base = base[:docs]
    vocabulary = sorted(
        {w for d in base[:200] for w in d.text.split() if w.isalpha() and len(w) > 3}
    )

    records: list[dict] = [{"text": d.text, "source": d.source, "title": d.title} for d in base]
    planted: dict[str, list[list[int]]] = {"exact": [], "reformat": [], "near": []}
    for kind, rate, make in (
        ("exact", exact_rate, lambda t: t),
        ("reformat", reformat_rate, lambda t: reformat(t, rng)),
        ("near", near_rate, lambda t: near_duplicate(t, rng, vocabulary)),
    ):
        for original in rng.sample(range(len(base)), int(rate * len(base))):
            planted[kind].append([len(records), original])
            src = base[original]
            records.append({"text": make(src.text), "source": src.source, "title": src.title})

    # Ids are assigned after shuffling, so a copy's id is as likely to sort before its original's as after.
    order = list(range(len(records)))
    rng.shuffle(order)
    ids = {}
    for position, index in enumerate(order):
        ids[index] = f"doc-{position:06d}"
    lines: list[tuple[bytes, str | None]] = [
        (json.dumps({"id": ids[i], **records[i]}, ensure_ascii=False).encode(), None) for i in order
    ]
    for raw, reason in _malformed_lines(malformed_each, rng):
        lines.insert(rng.randrange(len(lines) + 1), (raw, reason))

    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for stale in corpus.glob("part-*.jsonl"):
        stale.unlink()
    per_shard = -(-len(lines) // shards)
    malformed = []
    for s in range(shards):
        chunk = lines[s * per_shard : (s + 1) * per_shard]
        name = f"part-{s:05d}.jsonl"
        with open(corpus / name, "wb") as f:
            for line_no, (raw, reason) in enumerate(chunk, start=1):
                f.write(raw + b"\n")
                if reason is not None:
                    malformed.append({"file": name, "line": line_no, "reason": reason})

    truth = {
        "seed": seed,
        "requested_docs": docs,
        "site_packages": site_packages,
        "python": platform.python_version(),
        "records": len(lines),
        "documents": len(records),
        "base_documents": len(base),
        "pairs": {kind: [[ids[a], ids[b]] for a, b in pairs] for kind, pairs in planted.items()},
        "malformed": malformed,
    }
    (out / "planted.json").write_text(json.dumps(truth, indent=1))
    return truth


# ---------------------------------------------------------------------------------------------
# Scoring a dedup output against what was planted


def score_dedup(
    truth: dict, duplicate_of: dict[str, str], rejects: list[tuple[str, str]]
) -> list[tuple[str, int, int]]:
    """(category, planted, found) rows. A planted pair is found when both ids land in one cluster;
    a malformed record is found when the job rejected it with the planted reason."""

    def cluster(doc_id: str) -> str:
        return duplicate_of.get(doc_id, doc_id)

    rows = []
    for kind, pairs in truth["pairs"].items():
        found = sum(1 for a, b in pairs if cluster(a) == cluster(b))
        rows.append((f"duplicates: {kind}", len(pairs), found))
    planted_dups = {a for pairs in truth["pairs"].values() for a, b in pairs} | {
        b for pairs in truth["pairs"].values() for a, b in pairs
    }
    unplanted = sum(
        1 for d, k in duplicate_of.items() if d not in planted_dups or k not in planted_dups
    )
    rows.append(("removed but not planted", 0, unplanted))
    want = {(m["file"], m["line"]): m["reason"] for m in truth["malformed"]}
    got = {(os.path.basename(src), line): reason for src, line, reason in rejects}
    by_reason: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, reason in want.items():
        by_reason[reason][0] += 1
        by_reason[reason][1] += got.get(key) == reason
    rows += [(f"rejected: {r}", n, f) for r, (n, f) in sorted(by_reason.items())]
    return rows


def score_output(truth: dict, output: Path) -> list[tuple[str, int, int]]:
    """score_dedup on a dedup job's output folder (its removed/ and rejects/)."""
    import pyarrow.parquet as pq

    removed = pq.read_table(output / "removed", columns=["id", "duplicate_of"]).to_pylist()
    rejects = pq.read_table(
        output / "rejects", columns=["source", "line", "reject_reason"]
    ).to_pylist()
    return score_dedup(
        truth,
        {r["id"]: r["duplicate_of"] for r in removed},
        [(r["source"], r["line"], r["reject_reason"]) for r in rejects],
    )


def read_corpus_texts(corpus: Path) -> dict[str, str]:
    """{id: text} of the well-formed documents in a folder of JSONL files (malformed lines skipped)."""
    texts: dict[str, str] = {}
    for path in sorted(corpus.glob("*.jsonl")):
        for raw in path.read_bytes().splitlines():
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(record, dict):
                continue
            doc_id, text = record.get("id"), record.get("text")
            if isinstance(doc_id, str) and isinstance(text, str) and text.strip():
                texts[doc_id] = text
    return texts


def report(sample: Path, output: Path) -> str:
    truth = json.loads((sample / "planted.json").read_text())
    rows = score_output(truth, output)
    width = max(len(r[0]) for r in rows)
    lines = [f"{'planted vs found':<{width}}  planted  found", "-" * (width + 16)]
    lines += [f"{name:<{width}}  {planted:>7}  {found:>5}" for name, planted, found in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m workloads.data.sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the corpus and planted.json")
    b.add_argument("--out", type=Path, default=Path("data/sample"))
    b.add_argument("--docs", type=int, default=None, help="base documents to use (default: all)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--shards", type=int, default=4)
    b.add_argument(
        "--site-packages",
        action="store_true",
        help="also use the docstrings of installed packages (a corpus of tens of MB)",
    )
    b.add_argument("--force", action="store_true", help="rebuild even if planted.json exists")
    r = sub.add_parser("report", help="score a dedup output against planted.json")
    r.add_argument("--sample", type=Path, default=Path("data/sample"))
    r.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "build":
        existing = args.out / "planted.json"
        if existing.exists() and not args.force:
            truth = json.loads(existing.read_text())
            if (
                truth.get("seed"),
                truth.get("requested_docs"),
                truth.get("site_packages", False),
            ) == (args.seed, args.docs, args.site_packages):
                print(f"{existing} exists ({truth['records']} records); --force rebuilds")
                return
        truth = build(
            args.out,
            docs=args.docs,
            seed=args.seed,
            shards=args.shards,
            site_packages=args.site_packages,
        )
        counts = {k: len(v) for k, v in truth["pairs"].items()}
        print(
            f"wrote {truth['records']} records ({truth['base_documents']} base documents, planted {counts}, "
            f"{len(truth['malformed'])} malformed) to {args.out / 'corpus'}"
        )
    else:
        print(report(args.sample, args.output))


if __name__ == "__main__":
    main()
