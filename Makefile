# Developer entry points. `make demo` and `make test` work from a fresh clone on a CPU machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CMAKE_BUILD := build/cmake
NVCC := $(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
CMAKE_CUDA_FLAG := $(if $(NVCC),-DCMAKE_CUDA_COMPILER=$(NVCC),)
PYTEST_ARGS ?=

.PHONY: help venv build ctest pytest test demo cuda-build gpu-suite lmms-eval-test tf517-test clean

help:
	@echo "make demo        set up .venv, build, run the offline demo"
	@echo "make test        set up .venv, build, run ctest and pytest"
	@echo "make cuda-build  compile the CUDA extension on a CPU machine (separate venv)"
	@echo "make gpu-suite   on a GPU machine: build, CUDA tests, GPU benchmarks"
	@echo "make lmms-eval-test  --model sdrpn in lmms-eval, and the scorers, against sdrpn eval (separate venv)"
	@echo "make tf517-test  engine, distillation and CLI tests of every family under transformers 5.17 (separate venv)"

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
LMMS_TESTS := tests/test_lmms_eval_plugin.py tests/test_qwen_lmms_eval.py tests/test_scorer_parity.py \
	tests/test_lmms_eval_harness.py

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

# The oldest transformers the package supports (the GPU machine's), in a venv of its own: the same
# local torch as .venv and the rest of requirements.txt with transformers pinned. torch being the
# same release, the extension that `make build` compiled into the working tree is reused as it is
# (built first if missing): a .pth file puts the checkout on the venv's path (no second build,
# .venv's editable install is left alone). The tests exercise transformers' internals (decoder
# layers, rotary embeddings, caches, processors and chat templates, generation, attention weights,
# save/load) for both families, and distillation end to end (labels, heads, training, torchrun).
TF517_VENV := .venv-tf517
TF517_PY := $(TF517_VENV)/bin/python
TF517_TRANSFORMERS := 5.17.0
TF517_TESTS := tests/test_engine.py tests/test_cache.py tests/test_adapter.py tests/test_baselines.py \
	tests/test_qwen2_5_vl.py tests/test_qwen_two_stage.py tests/test_qwen_geometry.py tests/test_qwen3_vl.py \
	tests/test_qwen_cli.py tests/test_qwen3_cli.py tests/test_qwen_labelling.py tests/test_qwen_baselines.py \
	tests/test_qwen_distill_cli.py tests/test_qwen_compile.py tests/test_qwen_lmms_eval.py \
	tests/test_batch_invariance.py tests/test_attention_capture.py tests/test_attention_roi.py \
	tests/test_labels.py tests/test_label_job.py tests/test_sinks.py tests/test_rpn.py \
	tests/test_rpn_settings.py tests/test_train.py tests/test_distill_torchrun.py \
	tests/test_import_labels.py tests/test_convert.py tests/test_convert_qwen2_5_vl.py \
	tests/test_prompts.py tests/test_tiny_model.py tests/test_testbed_loop.py tests/test_cli.py \
	tests/test_demo.py tests/test_readme_reproduce.py

$(TF517_VENV)/.installed: requirements.txt
	rm -rf $(TF517_VENV)
	$(PYTHON) -m venv $(TF517_VENV)
	$(TF517_PY) -m pip install --upgrade --quiet pip
	$(TF517_PY) -m pip install --quiet torch==2.13.0
	sed 's/^transformers\b.*/transformers==$(TF517_TRANSFORMERS)/' requirements.txt > $(TF517_VENV)/requirements.txt
	$(TF517_PY) -m pip install --quiet -r $(TF517_VENV)/requirements.txt
	echo "$(CURDIR)" > "$$($(TF517_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/sdrpn-checkout.pth"
	touch $@

tf517-test: $(TF517_VENV)/.installed
	test -n "$(wildcard sdrpn/_C*.so)" || $(MAKE) build
	$(TF517_PY) -c 'import transformers; v = transformers.__version__; assert v == "$(TF517_TRANSFORMERS)", v'
	SDRPN_REQUIRE_EXTENSION=1 $(TF517_VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS) $(TF517_TESTS)

clean:
	rm -rf build $(VENV) .venv-cuda $(LMMS_VENV) $(TF517_VENV) *.egg-info sdrpn/*.so
