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
# The rest of the dependencies go through uv (pinned; the same versions pip resolves, about 6 s instead of 80 s on a
# 2-core machine, pip used where uv cannot be had or fails). No install byte-compiles every module (--no-compile,
# uv's default; 40 s saved): cli/precompile.py caches the ones this project imports, while the native CPU operators
# (ctr/native) compile, both once every package is in place (an import must not see a half-installed one).
PIP := $(BIN)/pip install --quiet --disable-pip-version-check --no-cache-dir --no-compile
UV_VERSION := 0.13.9
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0
	$(PIP) uv==$(UV_VERSION) || echo "setup: uv unavailable, pip installs the rest"
	if [ -x $(BIN)/uv ] && $(BIN)/uv pip install --quiet --no-cache --python $(BIN)/python -e '.[dev]'; then :; \
	  else $(PIP) -e '.[dev]'; fi
	$(BIN)/python -m ctr.native > $(VENV)/native-build.log 2>&1 & native=$$!; \
	  $(BIN)/python -m cli.precompile > $(VENV)/precompile.log 2>&1; compiled=$$?; \
	  wait $$native; built=$$?; grep -h -E '^(native|precompiled)' $(VENV)/native-build.log $(VENV)/precompile.log; \
	  [ $$compiled -eq 0 ] && [ $$built -eq 0 ]
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
