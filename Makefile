# `make test` and every other target create .venv from this repo's own files on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test bench-head clean

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The suite runs on 8 simulated CPU devices (tests/conftest.py sets XLA_FLAGS before jax loads).
test: $(STAMP)
	$(PY) -m pytest -n 2 tests

# Per-device memory and step time of the sharded head (default: K = 1,000,000, D = 512, 1 vs 8 devices).
bench-head: $(STAMP)
	$(PY) bench/head.py

clean:
	rm -rf $(VENV) .pytest_cache
