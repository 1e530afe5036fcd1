# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.signtrap-installed

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev,runtimes]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/signtrap run configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/data_bench.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf runs data/cache labs/lab_runs .pytest_cache
