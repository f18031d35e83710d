# Two entry points for a fresh machine (python3.11, no venv, package registries only):
#   make demo   set up .venv and run the main job on the embedded default (the synthetic world)
#   make test   set up .venv and run the test suite (what CI runs)
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= out/demo

.PHONY: setup demo test lint clean

setup: $(STAMP)

# torchrec declares a hard dependency on the CUDA-only fbgemm-gpu: install the CPU build of fbgemm and torchrec
# with --no-deps (their real runtime deps are listed in pyproject.toml). torch is pinned so pip takes the CPU wheel.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-cache-dir torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0
	$(BIN)/pip install --quiet --disable-pip-version-check --no-cache-dir -e '.[dev]'
	$(BIN)/python -m ctr.native  # build the native CPU operators now, not in the first run (ctr/native)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ctr demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .hypothesis
