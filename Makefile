# make test  - set up .venv (if missing), build the extension, run the test suite
# make demo  - train a VAE on scikit-learn's bundled digits with the fused ops
# make bench - CPU benchmarks into bench/results/
# TORCH=...  - the torch requirement to install when none is importable (default torch==2.13.0)

SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

DEPS_STAMP  := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.vae-fast-built
# The editable install maps each Python file it saw: a file or package added or removed
# under vae_fast/ (a directory's time changes) re-installs it too (seconds).
SOURCES := $(shell find csrc vae_fast -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \)) \
	$(shell find vae_fast -type d -not -name __pycache__) CMakeLists.txt pyproject.toml

.PHONY: test demo bench build lint clean gpu-check

test: $(BUILD_STAMP)
	$(PY) -m pytest -q tests

demo: $(BUILD_STAMP)
	$(PY) -m vae_fast.train --data digits --out runs/demo --overwrite

# ops_cpu.json holds three runs: the headline sizes with the sweeps, the fixed-cost size
# 128x784, and gaussian_kl / reparameterize at 65536x512; ops_cpu.md renders all three.
bench: $(BUILD_STAMP)
	$(PY) bench/ops.py --device cpu --json bench/results/ops_cpu.json \
		--plot bench/results/ops_cpu.png
	$(PY) bench/ops.py --device cpu --sizes 128x784x32 --no-sweep \
		--json bench/results/ops_cpu.json --append
	$(PY) bench/ops.py --device cpu --ops gaussian_kl reparameterize --sizes 65536x784x512 \
		--no-sweep --json bench/results/ops_cpu.json --append
	$(PY) bench/report.py bench/results/ops_cpu.json --markdown bench/results/ops_cpu.md
	$(PY) bench/validation.py --rounds 21 | tee bench/results/validation_cpu.txt
	$(PY) bench/overhead.py | tee bench/results/overhead_cpu.txt
	$(PY) bench/iwae.py --json bench/results/iwae_cpu.json --markdown bench/results/iwae_cpu.md
	$(PY) bench/train.py --device cpu --json bench/results/train_cpu.json \
		--markdown bench/results/train_cpu.md

build: $(BUILD_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch: keep an importable one, else install $(TORCH) (a local CPU wheel here).
$(DEPS_STAMP): | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q numpy pytest hypothesis "scikit-build-core>=0.10" pybind11 ninja cmake \
		tqdm matplotlib scikit-learn
	touch $@

# Editable install: the Python sources are used in place, the compiled _C is rebuilt
# incrementally (persistent build dir) only when a C++/CUDA/CMake source changed.
# Progress: ninja's line per compiled file; the whole log is kept in .venv/build.log.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	@echo "building vae_fast._C (a first build compiles 27 files and links them: about 230 CPU-seconds, 2 minutes on 2 idle cores)"
	@set -o pipefail; \
	$(PY) -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee $(VENV)/build.log \
	  | { grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\] ' || true; } \
	  || { echo "build failed; the end of $(VENV)/build.log:"; tail -40 $(VENV)/build.log; exit 1; }
	@touch $@

lint: $(DEPS_STAMP)
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check vae_fast tests bench tools
	$(VENV)/bin/ruff format --check vae_fast tests bench tools

clean:
	rm -rf build $(BUILD_STAMP)

# On a machine with a GPU (at most ~9 minutes): build with CUDA for sm_90 into the
# environment of $(PYTHON) (the interpreter with the CUDA torch; no .venv needed), run
# the CUDA tests, compute-sanitizer and the GPU benchmark. Logs and SUMMARY.md go to
# $OUT, else ./gpu-check-out (tools/gpu_check.sh says more; DRY_RUN=1 prints the steps).
gpu-check:
	PYTHON="$(PYTHON)" bash tools/gpu_check.sh
