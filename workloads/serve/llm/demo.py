"""The end of `make demo`: serve the demo's models with `serve run`, ask them, stop.

    python -m workloads.serve.llm.demo                       # serve_configs/llm-cpu.yaml
    python -m workloads.serve.llm.demo --config serve_configs/llm-cpu.yaml --question "..."

Starts `serve run <config>` (a local Ray, or the one `make cluster-up` started), waits for /ready
(a real one-token generation), lists the models, and asks the base model and every adapter the
same question through the `openai` client, then an embedding. Prints the answers and stops the app.
The app stays up with `make serve`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

DEFAULT_CONFIG = "serve_configs/llm-cpu.yaml"
DEFAULT_QUESTION = "How do I remove duplicate lines from a file?"


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> float:
    start = time.time()
    while True:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{base}/ready", timeout=30) as resp,
        ):
            if resp.status == 200:
                return time.time() - start
        if proc.poll() is not None:
            raise SystemExit(
                f"serve run exited with {proc.returncode} before the app was ready (see its log)"
            )
        if time.time() - start > timeout_s:
            raise SystemExit(f"the app was not ready after {timeout_s:.0f} s")
        time.sleep(3)


def ask(base: str, question: str, max_tokens: int, embedders: set[str]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key=os.environ.get("LLM_API_KEY", "none"))
    models = [m.id for m in client.models.list().data]
    print("models:", ", ".join(models), flush=True)
    for model in models:
        if model in embedders:
            out = client.embeddings.create(model=model, input=[question])
            print(f"[{model}] embedding of {len(out.data[0].embedding)} dimensions", flush=True)
            continue
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=max_tokens,
            temperature=0,
        )
        answer = " ".join((reply.choices[0].message.content or "").split())
        print(f"[{model}] {answer!r} ({reply.usage.completion_tokens} tokens)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--log", default="outputs/serve/serve-run.log", help="serve run's output")
    opts = parser.parse_args(argv)

    config = yaml.safe_load(Path(opts.config).read_text())
    http = config.get("http_options", {})
    embedders = {
        llm["model_loading_config"]["model_id"]
        for app in config["applications"]
        for llm in app["args"]["llm_configs"]
        if (llm.get("engine_kwargs") or {}).get("runner") == "pooling"
    }
    base = f"http://127.0.0.1:{http.get('port', 8000)}"
    serve = str(Path(sys.executable).with_name("serve"))
    log_path = Path(opts.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")  # noqa: SIM115 - closed below, after serve run exits
    print(f"serve run {opts.config} (its log: {log_path})", flush=True)
    proc = subprocess.Popen(
        [serve, "run", opts.config], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        took = wait_ready(base, proc, opts.timeout)
        print(f"serving at {base} ({took:.0f} s to ready)", flush=True)
        ask(base, opts.question, opts.max_tokens, embedders)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
