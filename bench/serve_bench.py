"""Serving benchmark: our Ray Serve app (serve_configs/llm-cpu.yaml) against bare vLLM's OpenAI
server on the same model and engine settings, in one run, with vLLM's own benchmark client.
Writes bench/serve_results.json and the `serve` section of bench/RESULTS.md.

    .venv/bin/python bench/serve_bench.py                       # every target, ~25 min on 2 cores
    .venv/bin/python bench/serve_bench.py --only vllm,serve     # a subset

Model: a random-weight Llama of hidden 512, 8 layers (8 heads of 64, 4 KV heads), ~30M
parameters, with the tiny BPE tokenizer, so engine time dominates a request. Engine settings, the
same on every target: max_model_len 1024, max_num_seqs 16, enforce_eager, prefix caching on,
VLLM_CPU_KVCACHE_SPACE=1 GiB, vLLM's default CPU thread binding. Load: `vllm.benchmarks.serve`
(the code behind `vllm bench serve`) on /v1/completions with streaming, random prompts of 256
tokens and 128 output tokens (ignore_eos), at concurrency 1, 4 and 16, after warm-up requests.

Targets, each a fresh server process tree, one after another:
  vllm               python -m vllm.entrypoints.openai.api_server (the reference), with --api-key
  serve              `serve run` of llm-cpu.yaml as shipped, minus the embedding model and
                     adapters (LoRA off on both sides): our ingress (auth, prompt budget, /ready,
                     backpressure) and our LLMServer (first chunk at once, then Ray's 50 ms batches)
  serve-ray-ingress  Ray's own `ray.serve.llm:build_openai_app`: stock ingress and LLMServer
  serve-no-budget    ours without the ingress's prompt-budget tokenization
  serve-stream-0ms   ours with stream batching off (stream_batching_interval_ms: 0: a Ray
                     message per token)
  serve-stream-200ms ours with 200 ms stream batches (fewer, larger Ray messages)
  serve-2-ingress    ours with two ingress replicas
Run it alone on the machine: between targets it stops every Ray there (`ray stop --force`), so
that no `serve run` attaches to a cluster a previous target left behind.

Not in the default run (`--only` runs them):
  vllm-pinned,       the pair again with the engine's worker alone on core 1
  serve-pinned,      (VLLM_CPU_OMP_THREADS_BIND=1) and everything else (the API server or Ray and
  serve-200ms-pinned Serve's processes, and this client) confined to core 0 with taskset. Bare vLLM
                     ran as unpinned, but under Serve every stream arrived whole at the end and
                     requests ran one at a time (205 output tok/s at any concurrency); not
                     understood, so not reported as a measurement.
  serve-direct       Ray's direct streaming (RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1 over
                     HAProxy; the LLMServer is the ingress, so none of our ingress): only when
                     `haproxy` is installed
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from bench.results_md import write_section  # noqa: E402
from bench.sft_bench import build_sample_and_tiny, machine, save_llama  # noqa: E402
from workloads.common.manifest import package_versions  # noqa: E402
from workloads.common.ray_runtime import free_port  # noqa: E402

RESULTS_JSON = HERE / "serve_results.json"
COMMAND = ".venv/bin/python bench/serve_bench.py"
SERVE_CONFIG = REPO / "serve_configs" / "llm-cpu.yaml"
BIN = Path(sys.executable).parent
MODEL_ID = "bench-llm"
API_KEY = "bench-key"
SERVE_MODEL = dict(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
)
ENGINE = dict(
    max_model_len=1024,
    max_num_seqs=16,
    enforce_eager=True,
    gpu_memory_utilization=0.1,
    enable_prefix_caching=True,
)
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
INPUT_LEN, OUTPUT_LEN = 256, 128
# (concurrency, prompts): enough requests per level for stable medians, small enough for 2 cores.
LEVELS = ((1, 12), (4, 32), (16, 96))
TARGETS = (
    "vllm",
    "serve",
    "serve-ray-ingress",
    "serve-no-budget",
    "serve-stream-0ms",
    "serve-stream-200ms",
    "serve-2-ingress",
    "serve-direct",
)
EXTRA_TARGETS = ("vllm-pinned", "serve-pinned", "serve-200ms-pinned")
PINNED_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "1"}
TARGET_THROUGHPUT_RATIO = 0.9
TARGET_TTFT_OVERHEAD_MS = 15.0
METRICS = (
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "output_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "mean_itl_ms",
    "median_itl_ms",
    "p99_itl_ms",
)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> float:
    start = time.time()
    while True:
        try:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {API_KEY}"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                if resp.status == 200:
                    return time.time() - start
        except (OSError, urllib.error.HTTPError):
            pass
        if proc.poll() is not None or time.time() - start > timeout:
            raise RuntimeError(f"{url} never became ready:\n{log.read_text()[-4000:]}")
        time.sleep(2)


def pinned(target: str) -> bool:
    return target.endswith("-pinned")


def confine(target: str, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", "0", *cmd] if pinned(target) else cmd


@contextlib.contextmanager
def bare_vllm(target: str, model: Path, work: Path):
    port = free_port()
    log = work / f"{target}.log"
    cmd = [
        str(BIN / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        MODEL_ID,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--max-model-len",
        str(ENGINE["max_model_len"]),
        "--max-num-seqs",
        str(ENGINE["max_num_seqs"]),
        "--gpu-memory-utilization",
        str(ENGINE["gpu_memory_utilization"]),
        "--enforce-eager",
        "--enable-prefix-caching",
        "--no-enable-log-requests",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            confine(target, cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ENGINE_ENV, **(PINNED_ENV if pinned(target) else {})},
            start_new_session=True,
        )
        try:
            startup = wait_ready(f"http://127.0.0.1:{port}/v1/models", proc, log)
            yield f"http://127.0.0.1:{port}", startup
        finally:
            stop(proc)


def serve_yaml(target: str, model: Path, port: int) -> dict:
    """llm-cpu.yaml as shipped, pointed at the bench model, minus embeddings and adapters."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    args = app["args"]
    (llm,) = [c for c in args["llm_configs"] if c["model_loading_config"]["model_id"] == "demo-llm"]
    llm = copy.deepcopy(llm)
    llm["model_loading_config"] = {"model_id": MODEL_ID, "model_source": str(model)}
    llm.pop("lora_config", None)
    for key in ("max_lora_rank", "max_loras"):
        llm["engine_kwargs"].pop(key, None)
    llm["engine_kwargs"].update(ENGINE)
    llm["runtime_env"] = {"env_vars": {**ENGINE_ENV, **(PINNED_ENV if pinned(target) else {})}}
    args["llm_configs"] = [llm]
    args.pop("adapters")
    args.pop("model_source_candidates")
    if target == "serve-no-budget":
        args["check_prompt_budget"] = False
    elif target == "serve-stream-0ms":
        llm["experimental_configs"] = {"stream_batching_interval_ms": 0}
    elif "200ms" in target:
        llm["experimental_configs"] = {"stream_batching_interval_ms": 200}
    elif target == "serve-2-ingress":
        args["ingress_deployment_config"]["num_replicas"] = 2
        args["ingress_deployment_config"]["ray_actor_options"] = {"num_cpus": 0.25}
    elif target in ("serve-ray-ingress", "serve-direct"):
        app["import_path"] = "ray.serve.llm:build_openai_app"
        ingress = args["ingress_deployment_config"] if target == "serve-ray-ingress" else {}
        app["args"] = {"llm_configs": [llm], "ingress_deployment_config": ingress}
    return config


@contextlib.contextmanager
def serve_app(target: str, model: Path, work: Path):
    port = free_port()
    path = work / f"{target}.yaml"
    path.write_text(yaml.safe_dump(serve_yaml(target, model, port)))
    log = work / f"{target}.log"
    env = {**os.environ, "LLM_API_KEY": API_KEY, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    if target == "serve-direct":
        env.update(RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING="1", RAY_SERVE_ENABLE_HA_PROXY="1")
    with open(log, "wb") as out:
        # `serve run` starts a local Ray (2 logical CPUs here) and stops it on exit.
        proc = subprocess.Popen(
            confine(target, [str(BIN / "serve"), "run", str(path)]),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            ours = not target.startswith(("serve-ray", "serve-direct"))
            ready = "/ready" if ours else ""
            url = f"http://127.0.0.1:{port}"
            startup = wait_ready(f"{url}{ready or '/v1/models'}", proc, log)
            yield url, startup
        finally:
            stop(proc)
            subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(3)


def run_load(base_url: str, model: Path, concurrency: int, prompts: int, work: Path) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    os.environ["OPENAI_API_KEY"] = API_KEY
    args = parser.parse_args(
        [
            "--backend",
            "openai",
            "--base-url",
            base_url,
            "--endpoint",
            "/v1/completions",
            "--model",
            MODEL_ID,
            "--tokenizer",
            str(model),
            "--dataset-name",
            "random",
            "--random-input-len",
            str(INPUT_LEN),
            "--random-output-len",
            str(OUTPUT_LEN),
            "--ignore-eos",
            "--num-prompts",
            str(prompts),
            "--max-concurrency",
            str(concurrency),
            "--num-warmups",
            str(min(concurrency, 4)),
            "--percentile-metrics",
            "ttft,tpot,itl",
            "--metric-percentiles",
            "50,99",
            "--seed",
            "0",
            "--disable-tqdm",
        ]
    )
    result = main(args)
    return {k: result.get(k) for k in METRICS}


def measure(target: str, model: Path, work: Path) -> dict:
    if target == "serve-direct" and shutil.which("haproxy") is None:
        return {"skipped": "needs the haproxy binary (apt-get install haproxy)"}
    if target.startswith("vllm"):
        server = bare_vllm(target, model, work)
    else:
        server = serve_app(target, model, work)
    everywhere = os.sched_getaffinity(0)
    try:
        with server as (url, startup):
            if pinned(target):  # the load generator stays off the engine's core too
                os.sched_setaffinity(0, {0})
            levels = {}
            for concurrency, prompts in LEVELS:
                levels[str(concurrency)] = run_load(url, model, concurrency, prompts, work)
                print(target, concurrency, json.dumps(levels[str(concurrency)]), flush=True)
            return {"startup_s": round(startup, 1), "levels": levels}
    except Exception as exc:  # noqa: BLE001 - one target failing must not lose the others
        return {"failed": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
    finally:
        os.sched_setaffinity(0, everywhere)


def compare(results: dict) -> dict:
    """Each Serve target against bare vLLM: throughput ratio and TTFT overhead per concurrency."""
    out = {}
    for name, r in results["targets"].items():
        reference = "vllm-pinned" if pinned(name) else "vllm"
        ref = results["targets"].get(reference, {}).get("levels")
        if name.startswith("vllm") or not ref or "levels" not in r:
            continue
        out[name] = {
            c: {
                "output_throughput_ratio": round(
                    lv["output_throughput"] / ref[c]["output_throughput"], 3
                ),
                "request_throughput_ratio": round(
                    lv["request_throughput"] / ref[c]["request_throughput"], 3
                ),
                "median_ttft_overhead_ms": round(
                    lv["median_ttft_ms"] - ref[c]["median_ttft_ms"], 1
                ),
                "median_tpot_overhead_ms": round(
                    lv["median_tpot_ms"] - ref[c]["median_tpot_ms"], 2
                ),
            }
            for c, lv in r["levels"].items()
        }
    return out


MITIGATIONS = {
    "serve-ray-ingress": "Ray's stock app instead of ours (what our ingress and LLMServer cost or buy)",
    "serve-no-budget": "no prompt-budget tokenization in the ingress",
    "serve-stream-0ms": "no stream batching (a Ray message per token)",
    "serve-stream-200ms": "200 ms stream batches instead of 50",
    "serve-2-ingress": "two ingress replicas",
    "serve-direct": "direct streaming over HAProxy (Ray's app, no ingress hop; none of our ingress)",
}


def interpret(results: dict) -> str:
    """What each variant bought against our default app, and where the time goes, in words."""
    cmp, targets = results["comparison"], results["targets"]
    if "serve" not in cmp:
        return ""
    base = cmp["serve"]
    lines = ["What each variant bought, against our app as shipped (`serve`):", ""]
    for name, what in MITIGATIONS.items():
        if name not in cmp:
            continue
        c1, c16 = cmp[name]["1"], cmp[name]["16"]
        lines.append(
            f"- `{name}`, {what}: output throughput at 16 "
            f"{c16['output_throughput_ratio']:.3f}x of vLLM ({c16['output_throughput_ratio'] - base['16']['output_throughput_ratio']:+.3f}), "
            f"p50 TTFT overhead at 1 {c1['median_ttft_overhead_ms']:+.1f} ms "
            f"({c1['median_ttft_overhead_ms'] - base['1']['median_ttft_overhead_ms']:+.1f})."
        )
    ref, ours = targets["vllm"]["levels"]["16"], targets["serve"]["levels"]["16"]
    lines += [
        "",
        f"Where the time goes: at concurrency 16 the engine's own step time (TPOT p50) is "
        f"{ref['median_tpot_ms']:.1f} ms under bare vLLM and {ours['median_tpot_ms']:.1f} ms under Serve. "
        "On 2 cores the engine shares the CPU with Serve's proxy, ingress, replica actor and Ray's "
        "own processes, which do work for every streamed chunk; fewer, larger chunks (a longer "
        "batching interval, direct streaming) give the engine back most of it. On a GPU node the "
        "engine's steps run on the GPU and these processes have cores of their own, so this "
        "machine overstates the cost (not measured here: no GPU). An ITL p50 of 0 is the "
        "batching seen from the client: most tokens arrive in the same chunk as the one before.",
    ]
    return "\n".join(lines)


def section(results: dict) -> str:
    lines = [
        "<!-- serve:start -->",
        "## Serving: Ray Serve LLM app against bare vLLM (`bench/serve_bench.py`)",
        "",
        f"Command: `{results['command']}`. Machine: {results['machine']}. "
        f"Model: random-weight Llama {results['model']['shape']} "
        f"({results['model']['parameters'] / 1e6:.1f}M parameters), tiny BPE tokenizer. "
        f"Load: vLLM's benchmark client (`vllm.benchmarks.serve`), /v1/completions streamed, "
        f"random {INPUT_LEN}-token prompts, {OUTPUT_LEN} output tokens (ignore_eos); "
        f"engine settings identical on every target ({json.dumps(ENGINE)})."
        + (
            " `-pinned` targets are compared with `vllm-pinned`, the others with `vllm`."
            if any(pinned(t) for t in results["targets"])
            else ""
        ),
        "",
        "| target | concurrency | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
        "ITL p50 / p99 ms | output tok/s vs vLLM | TTFT p50 overhead ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = results["comparison"]
    for name, r in results["targets"].items():
        if "levels" not in r:
            lines.append(f"| {name} | - | {r.get('skipped') or r.get('failed', '')[:200]} |||||||")
            continue
        for c, lv in r["levels"].items():
            cmp = ratios.get(name, {}).get(c, {})
            lines.append(
                f"| {name} | {c} | {lv['request_throughput']:.2f} | {lv['output_throughput']:.1f} | "
                f"{lv['median_ttft_ms']:.1f} / {lv['p99_ttft_ms']:.1f} | "
                f"{lv['median_tpot_ms']:.1f} / {lv['p99_tpot_ms']:.1f} | "
                f"{lv['median_itl_ms']:.1f} / {lv['p99_itl_ms']:.1f} | "
                f"{cmp.get('output_throughput_ratio', 1.0):.3f} | "
                f"{cmp.get('median_ttft_overhead_ms', 0.0):+.1f} |"
            )
    serve16 = ratios.get("serve", {}).get("16")
    serve1 = ratios.get("serve", {}).get("1")
    if serve16 and serve1:
        lines += [
            "",
            f"Target (our app, `serve`): output throughput at concurrency 16 >= "
            f"{TARGET_THROUGHPUT_RATIO}x bare vLLM: **{serve16['output_throughput_ratio']:.3f}x** "
            f"({'met' if serve16['output_throughput_ratio'] >= TARGET_THROUGHPUT_RATIO else 'missed'}); "
            f"p50 TTFT overhead <= {TARGET_TTFT_OVERHEAD_MS:.0f} ms: "
            f"**{serve1['median_ttft_overhead_ms']:+.1f} ms** at concurrency 1, "
            f"{serve16['median_ttft_overhead_ms']:+.1f} ms at 16.",
        ]
    lines += ["", interpret(results), "<!-- serve:end -->"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    opts = parser.parse_args()
    targets = [t for t in opts.only.split(",") if t]
    unknown = set(targets) - set(TARGETS) - set(EXTRA_TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {TARGETS + EXTRA_TARGETS}")
    with tempfile.TemporaryDirectory(prefix="serve_bench-") as tmp:
        work = Path(tmp)
        build_sample_and_tiny(work)
        model = work / "llama-serve"
        parameters = save_llama(model, work / "tiny", SERVE_MODEL)
        results = {
            "command": COMMAND + ("" if tuple(targets) == TARGETS else f" --only {opts.only}"),
            "machine": machine(),
            "versions": package_versions(),
            "model": {"shape": SERVE_MODEL, "parameters": parameters},
            "engine": ENGINE,
            "load": {"input_len": INPUT_LEN, "output_len": OUTPUT_LEN, "levels": LEVELS},
            "targets": {},
        }
        for target in targets:
            results["targets"][target] = measure(target, model, work)
        results["comparison"] = compare(results) if "vllm" in targets else {}
    RESULTS_JSON.write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_section("serve", section(results))
    print(json.dumps(results["comparison"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
