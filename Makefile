# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.signtrap-installed
LAB_STAMP := $(VENV)/.signtrap-labs-installed

.PHONY: install demo test test-fast bench lab lab-check clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev,runtimes]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/signtrap run configs/quickstart.yaml

# One test process per CPU (pytest-xdist), each test file kept on one worker (module fixtures, the labs' order)
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks labs/make_labs.py export/edge_bench.py
	$(BIN)/python -m pytest -n auto --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/data_bench.py
	$(BIN)/python benchmarks/train_throughput.py

# The teaching labs: `make lab` installs the `labs` extra (JupyterLab) and opens labs/ in it; `make lab-check` runs
# every lab headless, student and solutions copies, exactly as CI does (tests/test_labs.py, fast sizes).
$(LAB_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e '.[dev,runtimes,labs]'
	@touch $(LAB_STAMP)

lab: $(LAB_STAMP)
	$(BIN)/jupyter lab --notebook-dir=labs $(if $(filter 0,$(shell id -u)),--allow-root)

lab-check: $(STAMP)
	$(BIN)/python -m pytest -q -s tests/test_labs.py

clean:
	rm -rf runs data/cache labs/lab_runs .pytest_cache
