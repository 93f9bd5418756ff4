# One-command entry points. Every target installs what it needs into its venv itself.
PY ?= python3
# The megatron-core releases the suite runs against (`make test` runs it once on each).
# 0.16.1 is what pip resolves on Python 3.11; 0.19.2 is the newest release. 0.17+ declare
# Requires-Python >= 3.12 but install and run on 3.11 (measured): we install them with
# --ignore-requires-python because this machine's only torch CPU wheel is for Python 3.11
# (PyPI's cp312 torch is a multi-GB CUDA build), so a 3.12 venv would cost a CUDA download.
MCORE_VERSIONS := 0.16.1 0.19.2
MCORE ?= 0.16.1
VENV ?= .venv-mcore-$(MCORE)
VPY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Threads for CPU runs; CI machines have 2 cores.
export OMP_NUM_THREADS ?= 2

.PHONY: setup setup-peers test test-mcore lint demo bench gpu-check clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Pin the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
ifeq ($(MCORE),0.16.1)
	$(PIP) install -q -e '.[megatron,examples,test,megatron-lm]' megatron-core==$(MCORE)
else
	# megatron-core >= 0.17 on Python 3.11: its own deps by hand (triton, in the megatron-lm
	# extra, is imported by its MoE code), then the wheel without its Requires-Python check.
	$(PIP) install -q -e '.[examples,test,megatron-lm]' 'psutil>=5.9' 'packaging>=24.2'
	$(PIP) install -q --ignore-requires-python --no-deps megatron-core==$(MCORE)
endif
	touch $@

setup: $(VENV)/.installed

# The peers venv: megatron-core 0.19.2 exactly as `make setup MCORE=0.19.2`, plus the optimizers
# Megatron 0.19 ships through NVIDIA's emerging-optimizers (`--optimizer megatron-soap` /
# `megatron-muon` in the digits demo). emerging-optimizers 0.3.0 declares Python >= 3.12 and
# uses typing.override (3.12+): installed without that check, with absl-py (its one import
# beyond torch), and a .pth line in this venv only that aliases typing_extensions.override on
# Python 3.11 (once it is installed, `import megatron.core` needs it: megatron imports its Lion
# unguarded). Pinned: PyPI also lists a bogus 999.9.9.
PEERS_VENV := .venv-peers
EMERGING_OPTIMIZERS := 0.3.0
PEERS_SHIM := import typing, typing_extensions; hasattr(typing, "override") or setattr(typing, "override", typing_extensions.override)

$(PEERS_VENV)/.peers-installed: pyproject.toml Makefile
	$(MAKE) --no-print-directory setup MCORE=0.19.2 VENV=$(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q absl-py
	$(PEERS_VENV)/bin/pip install -q --ignore-requires-python --no-deps \
	  emerging-optimizers==$(EMERGING_OPTIMIZERS)
	$(PEERS_VENV)/bin/python -c 'import sys, sysconfig, pathlib; \
	  pathlib.Path(sysconfig.get_paths()["purelib"], "typing_override_shim.pth").write_text(sys.argv[1] + "\n")' \
	  '$(PEERS_SHIM)'
	$(PEERS_VENV)/bin/python -c 'import megatron.core.optimizer.emerging_optimizers as e; \
	  print("emerging optimizers:", sorted(e._EMERGING_OPTIMIZERS))'
	touch $@

setup-peers: $(PEERS_VENV)/.peers-installed

# ruff (incl. docstring rules, Google convention) and mypy: configured in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check mlfop_megatron tests examples benchmarks
	$(VENV)/bin/ruff format --check mlfop_megatron tests examples benchmarks
	$(VENV)/bin/mypy

# The whole suite on every megatron-core in MCORE_VERSIONS; fails if any version fails.
test: lint
	@rc=0; for v in $(MCORE_VERSIONS); do \
	  $(MAKE) --no-print-directory test-mcore MCORE=$$v || rc=1; \
	done; exit $$rc

# The whole suite on one megatron-core (MCORE=...).
test-mcore: setup
	@echo "=== pytest on megatron-core $(MCORE) ($(VENV)) ==="
	MLFOP_EXPECT_MCORE=$(MCORE) $(VPY) -m pytest -q -p no:cacheprovider -rs

demo: setup
	$(VPY) examples/train_digits.py --nproc 2 --out runs/demo

bench: setup
	$(PIP) install -q -e '.[bench]'
	$(VPY) -m benchmarks.step_time

# The first GPU run in one command (benchmarks/gpu_check.py, < 8 min on one H100): device facts,
# the GPU suite (tests/gpu), optimizer step time against fwd+bwd and peak memory against the
# memory model on a GPT stack of up to 1.0B params; figures in runs/gpu-check/gpu_check.md.
# Without CUDA it prints one line and exits 2. No `setup` prerequisite (that venv holds the CPU
# torch build): on a GPU machine use a Python with CUDA torch + megatron-core, VPY=python3.
gpu-check:
	$(VPY) -m benchmarks.gpu_check --out runs/gpu-check

clean:
	rm -rf .venv-mcore-* $(PEERS_VENV) runs .pytest_cache
