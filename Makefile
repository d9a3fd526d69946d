# The README's two commands: `make demo` and `make test`. Each sets up .venv first when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## the main job: simulated pods publish, views follow, convergence and latency summary
demo: $(STAMP)
	$(BIN)/snapbus demo

## the whole test suite (unit tests, and integration tests against an embedded broker)
test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check snapbus tests benchmarks
	$(BIN)/mypy --strict snapbus

## every benchmark; writes benchmarks/RESULTS.md
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
