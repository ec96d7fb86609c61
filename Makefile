# Two entry points: `make demo` (the main job) and `make test`. Both set up from
# nothing: a virtual environment, torch first (the CPU build unless one is present),
# then the project built against that very torch (--no-build-isolation).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
NPROC ?= 2
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

.PHONY: demo test bench setup triton-resources

setup: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" setuptools wheel ninja pybind11 numpy pytest triton matplotlib tqdm
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

demo: setup
	$(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m margin_ext.train --output runs/demo --resume auto

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) -m bench

# registers, spills and shared memory of every Triton config for sm_80 / sm_90 (no GPU needed)
triton-resources: setup
	env -u TRITON_INTERPRET $(PY) -m margin_ext.backends.triton_resources --jobs $(NPROC)
