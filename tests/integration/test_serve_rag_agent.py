"""The RAG and agent apps as a user runs them: `serve run serve_configs/agent-cpu.yaml` (apps
`llm`, `rag` and `agent`) on a Ray head, real vLLM behind the LLM app, the RAG app generating
through the LLM app's deployment handle, queried with the real `openai` client.

One deployment serves the module. It is the shipped YAML pointed at test material: the tiny model,
an index built here from sample-corpus documents (MiniLM + FAISS, through the store's own ingest
path), a SQLite file for the agent's threads, and the port; plus a second RAG app over an empty
index and an MCP server whose command does not exist, to see both fail cleanly while the rest
serves.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import REPO
from tests.integration.ray_head import free_ports, ray_head, serve_run
from tests.integration.test_serve_llm import KEY, _http

pytestmark = pytest.mark.slow
MODEL = "demo-llm"
UNIQUE = "The staging cluster is called bramblefinch and it is rebooted every Tuesday at 04:00."


def _sample_docs(corpus: Path, n: int) -> list[dict]:
    docs = []
    for path in sorted(corpus.glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                continue  # the sample corpus plants malformed records for the data jobs
            if isinstance(record.get("text"), str) and record["text"].strip():
                docs.append({"id": record["id"], "text": record["text"]})
            if len(docs) == n:
                return docs
    return docs


@pytest.fixture(scope="module")
def served(tiny_model, sample_corpus, tmp_path_factory):
    from workloads.embed.chunking import ChunkConfig
    from workloads.serve.rag.store import IndexStore, IngestDocument

    work = tmp_path_factory.mktemp("rag-agent")
    model = "sentence-transformers/all-MiniLM-L6-v2"
    index, empty = str(work / "index"), str(work / "empty-index")
    IndexStore.create_empty(index, model)
    IndexStore.create_empty(empty, model)
    store = IndexStore(index, chunk=ChunkConfig(size_tokens=200, overlap_tokens=32))
    docs = _sample_docs(sample_corpus / "corpus", 60)
    assert len(docs) == 60
    report = store.append(store.load(), [IngestDocument(**d) for d in docs])
    assert report.kept == len(docs)

    config = yaml.safe_load((REPO / "serve_configs" / "agent-cpu.yaml").read_text())
    (port,) = free_ports(1)
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    apps = {a["name"]: a for a in config["applications"]}
    llm = apps["llm"]["args"]
    llm["model_source_candidates"][MODEL] = [str(tiny_model)]
    del llm["adapters"]
    rag = apps["rag"]["args"]
    rag["index"] = index
    rag["reload_interval_s"] = 1
    rag["retriever_deployment_config"]["ray_actor_options"] = {"num_cpus": 0.25}
    empty_app = json.loads(json.dumps(apps["rag"]))
    empty_app.update(name="rag-empty", route_prefix="/rag-empty")
    empty_app["args"]["index"] = empty
    config["applications"].append(empty_app)
    agent = apps["agent"]["args"]
    agent["llm"]["base_url"] = f"http://127.0.0.1:{port}/v1"
    agent["checkpointer"]["path"] = str(work / "threads.sqlite")
    agent["mcp_servers"].append({"name": "broken", "command": str(work / "no-such-server")})
    path = work / "agent-cpu.yaml"
    path.write_text(yaml.safe_dump(config))

    base = f"http://127.0.0.1:{port}"
    log_path = work / "serve-run.log"
    ready = [f"{base}{route}" for route in ("/ready", "/rag/ready", "/agent/ready")]
    with ray_head(num_cpus=4, LLM_API_KEY=KEY) as head, serve_run(head, path, ready, log_path):
        yield {"base": base, "docs": docs, "index": index, "log": log_path}


@pytest.fixture(scope="module")
def rag_client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"{served['base']}/rag/v1", api_key=KEY, max_retries=0, timeout=120)


def _post(served, route: str, body: dict, key: str | None = KEY):
    code, headers, raw = _http(f"{served['base']}{route}", body=body, key=key)
    return code, json.loads(raw) if raw else None


def test_retrieve_returns_cited_chunks_and_needs_the_key(served):
    doc = served["docs"][7]
    query = " ".join(doc["text"].split()[:12])
    code, body = _post(served, "/rag/retrieve", {"query": query, "k": 3})
    assert code == 200 and len(body["chunks"]) == 3
    top = body["chunks"][0]
    # the document, or a planted duplicate of it that says the same
    assert query in " ".join(top["text"].split()) and top["rank"] == 1
    source = {d["id"]: d["text"] for d in served["docs"]}[top["doc_id"]]
    assert source[top["start"] : top["end"]] == top["text"]  # offsets point into the document
    assert {"score", "dense_rank", "lexical_rank", "chunk_id"} <= set(top)
    assert _post(served, "/rag/retrieve", {"query": query}, key=None)[0] == 401
    assert _post(served, "/rag/retrieve", {"query": "", "k": 3})[0] == 400
    assert _post(served, "/rag/retrieve", {"query": "x", "k": 999})[0] == 400
    assert _post(served, "/rag/retrieve", {"query": "x", "mode": "magic"})[0] == 400


def test_rag_chat_through_the_openai_client_carries_citations(served, rag_client):
    doc = served["docs"][3]
    question = "What does this say: " + " ".join(doc["text"].split()[:10])
    reply = rag_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0
    )
    assert reply.choices[0].message.content and reply.usage.completion_tokens <= 12
    citations = reply.model_extra["citations"]
    assert [c["n"] for c in citations] == list(range(1, len(citations) + 1))
    top = _post(served, "/rag/retrieve", {"query": question, "k": 1})[1]["chunks"][0]
    assert citations[0]["doc_id"] == top["doc_id"] and citations[0]["flagged"] is False
    # the sources are in the prompt: far more prompt tokens than the question alone
    assert reply.usage.prompt_tokens > 100

    stream = rag_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices == [] and chunks[0].model_extra["citations"] == citations
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks[1:] if c.choices)
    assert streamed == reply.choices[0].message.content

    from openai import APIStatusError, BadRequestError, NotFoundError

    # the engine's own errors come back as HTTP errors, not a 200 without choices
    with pytest.raises(BadRequestError):
        rag_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=5000
        )
    with pytest.raises(APIStatusError) as unknown_adapter:
        rag_client.chat.completions.create(
            model=f"{MODEL}:no-such-adapter", messages=[{"role": "user", "content": question}]
        )
    assert unknown_adapter.value.status_code == 404
    assert _post(served, "/rag/v1/chat/completions", {"model": MODEL, "messages": ["hi"]})[0] == 400

    with pytest.raises(NotFoundError):
        rag_client.chat.completions.create(
            model="other-model", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(BadRequestError):
        rag_client.chat.completions.create(
            model=MODEL, messages=[{"role": "assistant", "content": "hi"}]
        )


def test_ingest_is_served_at_once_and_rejects_reconcile(served):
    code, report = _post(
        served,
        "/rag/ingest",
        {
            "documents": [
                {"id": "ops-note-1", "text": UNIQUE},
                {"id": served["docs"][0]["id"], "text": "a duplicate id"},
                {"id": "no-text"},
                "not an object",
            ]
        },
    )
    assert code == 200
    assert (report["read"], report["kept"], report["rejected"]) == (4, 1, 3)
    assert report["read"] == report["kept"] + len(report["rejects"])
    assert {r["reason"] for r in report["rejects"]} >= {"duplicate_doc_id"}
    code, body = _post(
        served, "/rag/retrieve", {"query": "what is the staging cluster called", "k": 1}
    )
    assert body["chunks"][0]["doc_id"] == "ops-note-1"
    segments = sorted(p.name for p in (Path(served["index"]) / "segments").iterdir())
    assert report["segment"] == segments[-1]


def test_empty_index_is_a_clean_error_and_the_app_keeps_serving(served, rag_client):
    code, body = _post(served, "/rag-empty/retrieve", {"query": "anything"})
    assert code == 409 and body["error"]["type"] == "empty_index"
    code, body = _post(
        served,
        "/rag-empty/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert code == 409 and "ingest" in body["error"]["message"]
    code, report = _post(
        served, "/rag-empty/ingest", {"documents": [{"id": "first", "text": UNIQUE}]}
    )
    assert code == 200 and report["chunks_in_index"] == 1
    code, body = _post(served, "/rag-empty/retrieve", {"query": "bramblefinch"})
    assert code == 200 and body["chunks"][0]["doc_id"] == "first"


def _agent_pid() -> int:
    pids = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any("ServeReplica:agent:AgentServer" in part for part in (p.info["cmdline"] or []))
    ]
    assert len(pids) == 1, pids
    return pids[0]


def test_agent_thread_survives_a_replica_restart(served):
    code, _, ready = _http(f"{served['base']}/agent/ready", key=None)
    ready = json.loads(ready)
    assert "utils__unit_convert" in ready["tools"] and "search_documents" in ready["tools"]
    assert "broken" in ready["mcp_errors"]  # left out, reported; the agent serves without it

    code, first = _post(
        served, "/agent/threads/ops-1/runs", {"message": "Remember the word kestrel."}
    )
    assert code == 200 and first["messages"][0] == {
        "type": "human",
        "content": "Remember the word kestrel.",
    }
    assert first["answer"] and sorted(first["allowed_tools"]) == [
        "calculator",
        "search_documents",
        "utils__days_between",
        "utils__unit_convert",
        "utils__word_count",
    ]

    before = _agent_pid()
    os.kill(before, signal.SIGKILL)  # the replica dies; Serve starts another
    deadline = time.time() + 180
    while True:
        try:
            code = _http(f"{served['base']}/agent/ready", key=None, timeout=30)[0]
        except OSError:
            code = None
        if code == 200:
            break
        assert time.time() < deadline, "the agent replica did not come back"
        time.sleep(2)
    assert _agent_pid() != before

    code, second = _post(
        served, "/agent/threads/ops-1/runs", {"message": "Which word?", "stream": False}
    )
    assert code == 200
    code, _, thread = _http(f"{served['base']}/agent/threads/ops-1")
    messages = json.loads(thread)["messages"]
    assert [m["type"] for m in messages] == ["human", "ai", "human", "ai"]
    assert (
        messages[0]["content"] == "Remember the word kestrel."
        and messages[2]["content"] == "Which word?"
    )


def test_agent_streams_steps_and_refuses_bad_requests(served):
    code, headers, raw = _http(
        f"{served['base']}/agent/threads/ops-2/runs",
        body={"message": "Say hello.", "tools": ["calculator"], "stream": True},
    )
    assert code == 200 and headers["content-type"].startswith("text/event-stream")
    events = [block for block in raw.decode().split("\n\n") if block.strip()]
    kinds = [b.split("\n", 1)[0].removeprefix("event: ") for b in events]
    assert "step" in kinds and kinds[-2] == "final" and events[-1] == "data: [DONE]"
    final = json.loads(events[-2].split("data: ", 1)[1])
    assert final["thread_id"] == "ops-2" and final["steps"] == 1

    assert (
        _post(served, "/agent/threads/ops-3/runs", {"message": "x", "tools": ["rm_rf"]})[0] == 400
    )
    assert _post(served, "/agent/threads/ops-3/runs", {"message": ""})[0] == 400
    assert _post(served, "/agent/threads/ops-3/runs", {"message": "x", "extra": 1})[0] == 400
    assert _post(served, "/agent/threads/bad%20id/runs", {"message": "x"})[0] in (400, 404)
    assert _post(served, "/agent/threads/ops-3/runs", {"message": "x"}, key=None)[0] == 401
    assert _http(f"{served['base']}/agent/threads/never-seen")[0] == 404
