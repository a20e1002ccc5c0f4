# Two commands on a fresh machine: `make demo` (install + train CSD on the embedded benchmark) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install install-dev demo test test-fast bench lint format clean lock

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install  ## train CSD on the embedded style benchmark (metrics before/after), then score two baselines
	$(PY) -m src.train experiment=csd_quickstart $(ARGS)
	$(PY) -m src.evaluate extractor=pixels
	$(PY) -m src.evaluate extractor=color_hist

TEST_WORKERS ?= 2
test: install-dev  ## the whole test suite, slow end-to-end tests included, in TEST_WORKERS processes (pytest-xdist)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-fast: install-dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(ARGS)

bench: install  ## throughput / time / memory benchmarks against in-run baselines (benchmarks/, not installed)
	$(PY) -m benchmarks.retrieval_metrics
	$(PY) -m benchmarks.replication_search
	$(PY) -m benchmarks.store_search
	$(PY) -m benchmarks.extractor_throughput
	$(PY) -m benchmarks.lightning_overhead --module csd
	$(PY) -m benchmarks.lightning_overhead --module ddpm
	$(PY) -m benchmarks.lightning_overhead --module t2i
	$(PY) -m benchmarks.mitigation_cost
	$(PY) -m benchmarks.ddpm_sampling
	$(PY) -m benchmarks.extraction_pipeline
	$(PY) -m benchmarks.membership_throughput
	$(PY) -m benchmarks.detection_cost
	$(PY) -m benchmarks.partial_copies
	$(PY) -m benchmarks.region_matching

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks experiments
	$(VENV)/bin/ruff format --check src tests benchmarks experiments

format: install-dev
	$(VENV)/bin/ruff format src tests benchmarks experiments
	$(VENV)/bin/ruff check --fix src tests benchmarks experiments

clean:
	rm -rf logs outputs multirun .pytest_cache

# Re-resolve the tested set after a change to pyproject.toml (or to move to newer releases), then run `make test`.
# uv resolves for every Python the project supports; EXTRA_CONSTRAINTS caps what a machine's index serves.
EXTRA_CONSTRAINTS ?= $(wildcard /etc/xdg/pip/constraints.txt)
lock:
	$(PYTHON) -m pip install --quiet --user uv || $(PYTHON) -m pip install --quiet uv
	$(PYTHON) -m uv pip compile pyproject.toml --all-extras --universal --python-version 3.10 --no-header \
		$(if $(EXTRA_CONSTRAINTS),-c $(EXTRA_CONSTRAINTS)) -o constraints.body.txt
	{ sed -n '1,3p' constraints.txt; cat constraints.body.txt; } > constraints.new.txt && rm constraints.body.txt
	mv constraints.new.txt constraints.txt
