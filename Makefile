# Every target creates .venv from this repo's own files on first use: `make demo` installs the
# package, `make test` adds the test extra (torch CPU + transformers, for parity tests only).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
TEST_INSTALLED := $(VENV)/.installed-test
PLAN_INSTALLED := $(VENV)/.installed-plan

.PHONY: demo test coverage ablate plan-env bench-head clean

$(INSTALLED): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(INSTALLED)

$(TEST_INSTALLED): $(INSTALLED)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(TEST_INSTALLED)

# The main job on bundled data: cluster → multi-label → pretrain on 8 simulated devices → evaluate.
# Writes runs/demo/results.json, loss.png, cosine.png (~7 min on 2 CPU cores).
demo: $(INSTALLED)
	$(PY) -m mlcd_jax.demo --workdir runs/demo

# The paper's ablations (l, r, K) at the demo's scale, 3 seeds each: runs/ablate/ablation.md and a
# PNG per swept field (README "The paper's ablations, at our scale").
ablate: $(INSTALLED)
	$(PY) -m mlcd_jax.ablate --config=configs/demo.py:mlcd --workdir=runs/ablate --seeds=3 \
	  --grid=data.num_labels=1,2,4,8 --grid=head.sample_ratio=0.1,0.3,1.0 \
	  --grid=head.num_classes=16,64,256

# The suite runs on 8 simulated CPU devices (tests/conftest.py sets XLA_FLAGS before jax loads);
# its planning tests compile for TPUs and GPUs, so it installs the plan environment too. It ends
# with its 10 slowest tests and its wall time (budget: 15 min on 2 cores; docs/testing.md).
test: $(TEST_INSTALLED) $(PLAN_INSTALLED)
	@start=$$(date +%s); $(PY) -m pytest -n 2 --maxschedchunk 2 --durations=10 tests; status=$$?; \
	  echo "make test: $$(( $$(date +%s) - start )) s (budget 900 s on 2 cores)"; exit $$status

# Line coverage of mlcd_jax/ by the suite (commands it starts included): coverage.json and a
# summary (docs/testing.md keeps the figure).
coverage: $(TEST_INSTALLED) $(PLAN_INSTALLED)
	rm -f .coverage .coverage.*
	$(PY) -m pytest -n 2 --maxschedchunk 2 --cov=mlcd_jax --cov-config=pyproject.toml --cov-report=term:skip-covered \
	  --cov-report=json:coverage.json tests

# The compilers of `python -m mlcd_jax.plan` (TPU and GPU programs built on this CPU), matching
# the installed jax: libtpu, and jax's CUDA plugin with cuDNN (its fused attention needs the
# library's version): cuDNN alone, without the CUDA wheels it names, which compiling does not
# use (≈ 0.9 GB downloaded, 1.6 GB installed, 20–25 s; with them 2.6 GB).
plan-env: $(PLAN_INSTALLED)

$(PLAN_INSTALLED): $(INSTALLED)
	v=$$($(PY) -c 'import importlib.metadata as m; print(m.version("jax"))') && \
	  $(PY) -m pip install --quiet "jax[tpu]==$$v" "jax-cuda12-plugin==$$v"
	$(PY) -m pip install --quiet --no-deps "nvidia-cudnn-cu12>=9.8,<10"
	touch $(PLAN_INSTALLED)

# Per-device memory and step time of the sharded head (default: K = 1,000,000, D = 512, 1 vs 8 devices).
bench-head: $(INSTALLED)
	$(PY) bench/head.py

clean:
	rm -rf $(VENV) .pytest_cache
