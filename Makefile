# raytune_llm: `make demo` trains the embedded default on CPU; `make test` runs the whole suite.
# Both set up .venv first (torch==2.13.0 before anything that depends on torch: a bare torch
# requirement would pull a multi-GB CUDA build).

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.raytune-llm-installed
export RAY_AUTH_MODE ?= token
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export DS_ACCELERATOR ?= cpu

.PHONY: setup setup-llama demo test test-fast lint format clean

$(STAMP): pyproject.toml requirements/ci.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if [ "$(WITH_LLAMA)" = 1 ]; then scripts/llama_cpp.sh start $(VENV); fi
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements/ci.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# llama-cpp-python, for the GGUF test only: scripts/llama_cpp.sh builds it in the background at the lowest CPU
# priority (under `make test` from the start of the set-up, beside the downloads and the other tests).
setup-llama: $(STAMP)
	scripts/llama_cpp.sh start $(VENV)
	scripts/llama_cpp.sh finish $(VENV)

demo: $(STAMP)
	$(BIN)/raytune-llm train conf/quickstart.yaml

# Kernel tests run the Triton kernels under the interpreter (it must be set before triton decorates
# anything); everything else runs without it, where the fused ops dispatch to their torch references
# (interpreted kernels inside Ray training runs would take minutes per step). The models suite runs its
# interpreted fidelity check in a subprocess of its own. scripts/run_tests.sh runs the lanes: the two
# self-contained slow tests beside the others, the GGUF test last, once the background llama-cpp-python
# build has finished (scripts/llama_cpp.sh).
test: WITH_LLAMA = 1
test: $(STAMP)
	scripts/llama_cpp.sh start $(VENV)
	scripts/run_tests.sh $(VENV)

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -x -m "not slow" tests/kernels
	$(BIN)/python -m pytest -q -x -m "not slow and not ray" --ignore=tests/kernels tests

lint: $(STAMP)
	$(BIN)/ruff check raytune_llm tests bench
	$(BIN)/ruff format --check raytune_llm tests bench

format: $(STAMP)
	$(BIN)/ruff format raytune_llm tests bench
	$(BIN)/ruff check --fix raytune_llm tests bench

clean:
	rm -rf runs .pytest_cache
