# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC is pinned: an unpinned torch would download several GB of CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxpasses-installed

.PHONY: demo test test-fast test-gpu test-multigpu clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(STAMP)
	$(PY) -m fxpasses demo

# Lint and the import-layering check (tests/test_layering.py) run first: they take seconds.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

# Skips the multi-rank and Inductor tests: the quick loop while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not multirank"

# On the GPU machine: no internet, so use its own torch and put the repository on the path.
test-gpu:
	PYTHONPATH=. python3 -m pytest -m gpu

# On a machine with 2+ GPUs: every TP/PP layout the GPUs allow, over NCCL (NVLink multicast kept off).
test-multigpu:
	NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=. python3 -m pytest -m multigpu

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
