# make train: set up and run the digits training through a batchwire server.
# make test:  set up, lint, and run the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup train test lint format protos bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: a bare `torch` requirement would pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) examples/train_digits.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

protos: setup
	$(PY) scripts/gen_protos.py

# make bench: every benchmark in benchmarks/ with its baselines (about 15 minutes);
# results in benchmarks/results/*.json, figures in benchmarks/RESULTS.md.
BENCHMARKS := grpc_cost wire_throughput mnist_rate chunking fairness memory compression_pays pipeline_vs_dataloader webdataset_rate shared_builds
bench: setup
	@for b in $(BENCHMARKS); do echo "== $$b"; $(PY) benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
