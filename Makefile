# Quick start: `make demo` runs the demo, `make test` runs every test. Each creates .venv, installs torch and
# the build tools into it, compiles fused_train (CUDA kernels too where a toolkit is found) and runs.
# `make test` = test-cpp + test-python (the whole suite on the newest torch) + test-dist (sdist and wheel
# into fresh venvs, and the sdist built and smoke-tested on the oldest torch we support and on the GPU
# machines' torch with its CUDA kernels); `make test-python` alone is the quick loop.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
EXT_STAMP := $(VENV)/.fused-train-built
SOURCES := setup.py pyproject.toml $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.inl' \))

# In CI a CUDA compile error must fail the run, not fall back to a CPU-only build.
ifeq ($(CI),true)
export FUSED_TRAIN_FORCE_CUDA ?= 1
endif

.PHONY: demo test test-python test-cpp test-dist bench build clean sanitize gpu-check

# The torch range we claim (pyproject: torch>=TORCH_FLOOR) and test: the floor with the CPU kernels, and the
# torch of the project's GPU machines with the CUDA kernels compiled too.
TORCH_FLOOR := 2.5.1
TORCH_GPU_MACHINES := 2.11.0

demo: $(EXT_STAMP)
	$(VENV)/bin/fused-train demo

test: test-cpp test-python test-dist

test-python: $(EXT_STAMP)
	$(PY) -m pytest -q

test-cpp: $(DEPS)
	$(PY) tests/cpp/run_ctest.py

# The distributions, CPU kernels only for the newest torch (the CUDA build is already checked above), and the
# torch range; FUSED_TRAIN_FORCE_CUDA from CI is set per build by the script.
test-dist: $(DEPS)
	env -u FUSED_TRAIN_FORCE_CUDA FUSED_TRAIN_FORCE_CPU=1 $(PY) tools/check_dist.py \
		--torch $(TORCH_FLOOR) --torch $(TORCH_GPU_MACHINES):cuda

# The C++ CPU kernels and the ctest suite under AddressSanitizer + UBSan, in build/cmake-sanitize.
sanitize: $(DEPS)
	$(PY) tests/cpp/run_ctest.py --sanitize

# On a machine with an NVIDIA GPU and torch already installed (no venv, no network): build for the visible GPU,
# every CUDA test, compute-sanitizer's four tools over tools/cuda_smoke.py, the CUDA benchmarks; logs and
# summary.txt in $(GPU_CHECK_DIR). Without a GPU it builds and says which stages it skipped.
GPU_CHECK_DIR ?= build/gpu-check
gpu-check:
	$(PYTHON) tools/gpu_check.py --out $(GPU_CHECK_DIR) $(GPU_CHECK_ARGS)

bench: $(EXT_STAMP)
	$(VENV)/bin/fused-train bench

build: $(EXT_STAMP)

$(DEPS):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch>=2.5" ninja pybind11 setuptools wheel build cmake \
		pytest pytest-benchmark hypothesis numpy tqdm scikit-learn matplotlib transformers
	touch $@

$(EXT_STAMP): $(DEPS) $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation -e .
	touch $@

clean:
	rm -rf build fused_train/_C*.so $(EXT_STAMP)
