# Two entry points: `make demo` (the main job) and `make test`. Both set up from
# nothing: a virtual environment, torch first (the CPU build unless one is present),
# then the project built against that very torch (--no-build-isolation), with the
# trainer's optional packages (the [train] extra: Pillow, TensorBoard, PyYAML, ONNX ...).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
NPROC ?= 2
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

.PHONY: demo demo-1m test bench setup gpu-check test-compat triton-resources cuda-emu cuda-emu-mutants

setup: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" setuptools wheel ninja pybind11 numpy pytest triton matplotlib tqdm
	$(PY) -m pip install -q --no-build-isolation -e ".[train]"
	touch $@

demo: setup
	$(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m margin_ext.train --output runs/demo --resume auto

# A benchmark of the sharded, sampled head at scale: 1,000,000 synthetic identities, PartialFC
# over 2 processes sampling 10% of each shard (only the sampled centres are updated), 300
# steps; prints the head's memory per rank and samples/s. 7m27s measured on a shared 2-core
# machine at load average 7-8 (373 CPU-seconds: about 3-4 minutes estimated on 2 idle cores).
# A fresh run each time.
DEMO_1M_ARGS ?= --synthetic-identities 1000000 --synthetic-samples 2 --sample-rate 0.1 --steps 300 \
	--checkpoint-every 0 --keep-checkpoints 1 --no-tensorboard --progress lines

demo-1m: setup
	rm -rf runs/demo-1m
	$(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m margin_ext.train --output runs/demo-1m $(DEMO_1M_ARGS)

test: setup
	$(PY) -m pytest tests

# The CUDA kernels of csrc/cuda/ compiled for the host and run under a warp-level
# emulator (tests/cuda_emu/, csrc/README.md "The kernels under emulation"): every case
# against the float64 reference, and again in permuted block and thread orders.
cuda-emu: setup
	$(PY) tests/cuda_emu/run.py --permuted

# Plausible bugs injected one at a time into a copy of csrc/: each must be caught.
cuda-emu-mutants: setup
	$(PY) tests/cuda_emu/mutants.py --jobs $(NPROC)

bench: setup
	$(PY) -m bench

# The GPU check: build, CUDA/Triton tests and a short benchmark on one CUDA GPU, with the
# python (and so the torch and triton) already there; no set-up, nothing downloaded.
# Without a CUDA device it prints its plan and runs nothing. Results go to $$OUT, else
# bench/results/<device>/ (bench/gpu_check.py says more).
PYTHON ?= python3

gpu-check:
	$(PYTHON) -m bench.gpu_check

# The CPU suite under the oldest supported torch and triton, in a venv of its own. The
# extension is built in a copy of the sources there, so .venv's build stays untouched.
# A CUDA torch also builds the CUDA kernels (nvcc needed); COMPAT_CUDA=0 leaves them out.
COMPAT_VENV ?= .venv-torch2.11
COMPAT_TORCH ?= torch==2.11.0
COMPAT_TRITON ?= triton==3.6.0
COMPAT_CUDA ?=
# triton 3.6's interpreter (the Triton tests on the CPU) turns 1-element arrays into ints,
# which numpy 2.4 refuses; SPDX license expressions need setuptools 77
COMPAT_NUMPY ?= <2.4
COMPAT_SRC := $(COMPAT_VENV)/src
COMPAT_PY := $(abspath $(COMPAT_VENV))/bin/python
# nvcc may be a wrapper script outside its toolkit: ask it where the toolkit is
NVCC_HOME = $(shell nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$$ TOP=//p' | head -n 1)

test-compat:
	test -x $(COMPAT_PY) || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q "$(COMPAT_TORCH)" "$(COMPAT_TRITON)" "setuptools>=77" wheel ninja pybind11 \
		"numpy$(COMPAT_NUMPY)" pytest matplotlib tqdm pillow pyyaml tensorboard
	rm -rf $(COMPAT_SRC)/margin_ext $(COMPAT_SRC)/csrc $(COMPAT_SRC)/tests $(COMPAT_SRC)/bench $(COMPAT_SRC)/docs
	mkdir -p $(COMPAT_SRC)
	tar -cf - --exclude=__pycache__ --exclude='*.so' --exclude=bench/results \
		setup.py pyproject.toml README.md margin_ext csrc tests bench docs | tar -xf - -C $(COMPAT_SRC)
	cd $(COMPAT_SRC) && CUDA_HOME="$${CUDA_HOME:-$(NVCC_HOME)}" MAX_JOBS=$(NPROC) MARGIN_EXT_CUDA=$(COMPAT_CUDA) \
		$(COMPAT_PY) setup.py -q build_ext --inplace
	cd $(COMPAT_SRC) && $(COMPAT_PY) -m pytest tests

# registers, spills and shared memory of the Triton launches the loss really makes, compiled for
# sm_80 / sm_90 (no GPU needed) into docs/triton_resources.md, for every margin spec (576
# launches); TRITON_MARGINS="arcface interface" records those two alone (347)
TRITON_MARGINS ?=
triton-resources: setup
	env -u TRITON_INTERPRET $(PY) -m margin_ext.backends.triton_resources --jobs $(NPROC) \
		$(if $(TRITON_MARGINS),--margins $(TRITON_MARGINS))
