# Two commands on a fresh machine: `make demo` (install + train CSD on the embedded benchmark) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install install-dev demo test test-fast bench lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install  ## train CSD on the embedded style benchmark (metrics before/after), then score two baselines
	$(PY) -m src.train experiment=csd_quickstart $(ARGS)
	$(PY) -m src.evaluate extractor=pixels
	$(PY) -m src.evaluate extractor=color_hist

test: install-dev  ## the whole test suite, slow end-to-end tests included
	$(PY) -m pytest -q $(ARGS)

test-fast: install-dev
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: install  ## throughput / time / memory benchmarks against in-run baselines
	$(PY) -m src.benchmarks.retrieval_metrics
	$(PY) -m src.benchmarks.csd_step
	$(PY) -m src.benchmarks.replication_search
	$(PY) -m src.benchmarks.extractor_throughput
	$(PY) -m src.benchmarks.ddpm_step
	$(PY) -m src.benchmarks.ddpm_sampling
	$(PY) -m src.benchmarks.t2i_step

lint: install-dev
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: install-dev
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

clean:
	rm -rf logs outputs multirun .pytest_cache
