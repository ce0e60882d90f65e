# Two entry points for a fresh machine:
#   make demo   the paper's story: prompt sensitivity, CoOp vs zero-shot and linear-probe CLIP
#               over shot counts (table and curve), the learned context's nearest words
#               (embedded demo data unless DATA/BACKBONE are set)
#   make test   lint + the whole test suite
# Both create the virtual environment they need (.venv) on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install when the environment has none. Users with their own CUDA build
# can pre-install torch in $(VENV) or override this, e.g. make test TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint env clean

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

env: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m coop.demo $(if $(DATA),--root $(DATA)) $(if $(BACKBONE),--backbone $(BACKBONE)) $(ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info demo_output
