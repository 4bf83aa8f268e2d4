# Everything goes through the project's own virtual environment in .venv.
# Torch is installed first from the local CPU wheel: any other torch request pulls a multi-GB CUDA build.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv lint typecheck test test-quick demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Style, then the architecture (import contracts in pyproject.toml), then dead code
# (vulture, with vulture_whitelist.py naming what only frameworks call).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/vulture

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The whole suite, slow end-to-end parts included: this is what CI runs.
test: lint typecheck
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The quick part alone, for the edit-test loop.
test-quick: lint typecheck
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# The demo: synthetic corpus, a small CPU training, ingest, then the API and the web page
# on http://127.0.0.1:8000 (first run within 15 minutes on 2 cores; later runs reuse it all).
demo: $(STAMP)
	$(VENV)/bin/convirt demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
