# Developer entry points. `make demo` and `make test` work from a fresh clone on a CPU machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CMAKE_BUILD := build/cmake
NVCC := $(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
CMAKE_CUDA_FLAG := $(if $(NVCC),-DCMAKE_CUDA_COMPILER=$(NVCC),)
PYTEST_ARGS ?=

.PHONY: help venv build ctest pytest test demo cuda-build gpu-suite lmms-eval-test clean

help:
	@echo "make demo        set up .venv, build, run the offline demo"
	@echo "make test        set up .venv, build, run ctest and pytest"
	@echo "make cuda-build  compile the CUDA extension on a CPU machine (separate venv)"
	@echo "make gpu-suite   on a GPU machine: build, CUDA tests, GPU benchmarks"
	@echo "make lmms-eval-test  --model sdrpn in lmms-eval, and the scorers, against sdrpn eval (separate venv)"

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	$(PIP) install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

build: venv
	$(PIP) install --quiet --no-build-isolation --no-deps -e .

ctest:
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_CUDA_FLAG)
	cmake --build $(CMAKE_BUILD) -j2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

pytest: build
	SDRPN_REQUIRE_EXTENSION=1 $(VENV)/bin/pytest -q $(PYTEST_ARGS) tests

test: build ctest pytest

demo: build
	$(VENV)/bin/sdrpn demo

cuda-build:
	bash tools/cuda_build.sh

gpu-suite:
	bash benchmarks/gpu_suite.sh

# lmms-eval needs torchvision, so it gets a venv of its own: these torch and torchvision releases lie
# on local disk (any other pulls a multi-GB CUDA build from the registry), lmms-eval and filelock
# come pinned with the package's extra. The package is installed from a copy of the checkout, so
# that its extension, built against this venv's torch, leaves the working tree's alone.
LMMS_VENV := .venv-lmms
LMMS_SRC := build/lmms-src
LMMS_TESTS := tests/test_lmms_eval_plugin.py tests/test_scorer_parity.py tests/test_lmms_eval_harness.py

$(LMMS_VENV)/.installed:
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(LMMS_VENV)/bin/pip install --quiet pybind11 ninja setuptools wheel pytest
	touch $@

lmms-eval-test: $(LMMS_VENV)/.installed
	rm -rf $(LMMS_SRC) && mkdir -p $(LMMS_SRC)
	git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C $(LMMS_SRC)
	cd $(LMMS_SRC) && SDRPN_CPU_ONLY=1 MAX_JOBS=2 $(CURDIR)/$(LMMS_VENV)/bin/pip install --quiet --no-build-isolation ".[lmms-eval]"
	$(LMMS_VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS) $(LMMS_TESTS)

clean:
	rm -rf build $(VENV) .venv-cuda $(LMMS_VENV) *.egg-info sdrpn/*.so
