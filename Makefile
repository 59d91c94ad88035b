# Two entry points for a fresh machine (see README.md):
#   make demo   -- create .venv with everything, then fold the embedded default model
#   make test   -- create .venv if needed, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.modelfold-installed

.PHONY: setup demo test lint assets-large

$(STAMP): pyproject.toml scripts/install.sh
	PY=$(PY) bash scripts/install.sh
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m modelfold.demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check modelfold tests benchmarks scripts

# Optional, for benchmarks/qwen.py only (CI never runs it): Qwen2.5-Coder-1.5B-Instruct, 22 part packages, ~1.1 GB.
assets-large: setup
	MODELFOLD_LARGE_ASSETS=1 bash scripts/install.sh
