# Two entry points: `make train` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Keep the 8 fake CPU devices for the sharding tests; JAX on CPU everywhere here.
export JAX_PLATFORMS ?= cpu

.PHONY: setup train test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, exactly this CPU build (a looser spec would pull a multi-GB CUDA wheel).
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	# The reference implementation for tests; --no-deps keeps bitsandbytes out.
	$(PY) -m pip install --quiet --no-deps "galore-torch==1.0"
	# Fira's and APOLLO's authors' optimizers, the references of tests/test_fira.py, test_apollo.py.
	$(PY) -m pip install --quiet --no-deps "fira==1.0.2" "apollo-torch==1.0.3"
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m train.pretrain

test: $(STAMP)
	# --dist loadfile: a file's tests share one worker, so module fixtures (a loaded SmolLM2, the
	# reference training runs) are built once.
	$(PY) -m pytest -q -n 2 --dist loadfile --doctest-modules ngalore_jax models train tests

bench: $(STAMP)
	$(PY) -m benchmarks.memory

clean:
	rm -rf $(VENV) .pytest_cache
