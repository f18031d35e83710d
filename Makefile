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
# with --no-deps (their real runtime deps are listed in pyproject.toml). torch is pinned; pip picks the wheel (on this
# kind of machine its configuration finds the CPU build on local disk) and uv installs it with everything else
# (pinned; about 10 s instead of pip's 90 on a 2-core machine; pip does it all where uv cannot be had or fails). No
# install byte-compiles every module (--no-compile, uv's default; 40 s saved): cli/precompile.py caches the ones this
# project imports, while the native CPU operators (ctr/native) compile, both once every package is in place (an
# import must not see a half-installed one).
PIP_FLAGS := --quiet --disable-pip-version-check --no-cache-dir --no-compile
PIP := $(BIN)/python -m pip install $(PIP_FLAGS)
UV_VERSION := 0.13.9
UV := $(BIN)/uv pip install --quiet --no-cache --python $(BIN)/python
TORCH := torch==2.13.0
PIP_PICKS := $(BIN)/python -c 'import json, sys; print(json.load(sys.stdin)["install"][0]["download_info"]["url"])'
# The virtualenv starts without pip (ensurepip took 6 s): the system's pip installs uv into it (pip --python), and uv
# installs pip with the rest; where that cannot be done, ensurepip and pip as before.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -m pip --python $(BIN)/python install $(PIP_FLAGS) uv==$(UV_VERSION) \
	  || echo "setup: uv unavailable, pip installs the packages"
	if [ -x $(BIN)/uv ] \
	  && torch=$$($(PYTHON) -m pip install --quiet --dry-run --no-deps --ignore-installed --report - $(TORCH) | $(PIP_PICKS)) \
	  && $(UV) "torch @ $$torch" -e '.[dev]' pip && $(UV) --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0; then :; \
	  else $(BIN)/python -m ensurepip --upgrade > /dev/null && $(PIP) $(TORCH) \
	    && $(PIP) --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0 && $(PIP) -e '.[dev]'; fi
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
