# One-command entry points. Every target installs what it needs into .venv itself.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Threads for CPU runs; CI machines have 2 cores.
export OMP_NUM_THREADS ?= 2

.PHONY: setup test lint demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Pin the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[megatron,examples,test]'
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check mlfop_megatron tests examples benchmarks
	$(VENV)/bin/ruff format --check mlfop_megatron tests examples benchmarks

test: setup lint
	$(VPY) -m pytest -q -p no:cacheprovider

demo: setup
	$(VPY) examples/train_digits.py --nproc 2 --out runs/demo

bench: setup
	$(PIP) install -q -e '.[bench]'
	$(VPY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) runs .pytest_cache
