# make test       set up .venv (pinned deps), build the extension, run the whole suite (CI runs this)
# make demo       train a small Seq2SeqTransformer and decode with it (DEMO_ARGS="--compare --task sort" ...)
# make info       what was built and which backends are usable here
# make bench      the CPU benchmarks, results under benchmarks/results/<date>-cpu/
# make gpu-check  on a GPU machine: build with its own python3, tests on CUDA, benchmark sweep
# make gpu-stack-test  the suite here, on the CPU, under the GPU machine's stack (Python 3.12,
#                 torch 2.11 CUDA build, triton 3.6; ~5 GB in .venv-gpu-stack): what would break there
# make aot-record  the AOT check's record (tests/data/aot-record.json): every job compiled under CI's
#                 Triton with the hash of what the reports depend on (13 min on 2 cores): after a change
#                 to fasttransformer/kernels, or the AOT check compiles everything and a test fails
# make aot-tritons  the ahead-of-time check (pytest -m aot) under the Tritons that torch's CUDA wheels
#                 pin (3.7.1: torch 2.13, 3.8.0: torch 2.14, 3.9.0: torch 2.15), each in .venv-triton-V
#                 beside torch 2.13.0's CPU build (~2 GB each, about 5 min each with Triton's cache cold):
#                 not in CI, for time (CI compiles each kernel's variants of one config under 3.9.0)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
INSTALL_STAMP := $(VENV)/.fasttransformer-installed
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cpp csrc/cuda/*.cu csrc/cuda/*.h)

.PHONY: test build demo info bench gpu-check gpu-stack-test aot-record aot-tritons clean

$(DEPS_STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -r requirements-dev.txt
	touch $@

# The editable install registers the package and its console script (and builds _C once).
$(INSTALL_STAMP): $(DEPS_STAMP) setup.py pyproject.toml
	$(PY) -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

# Incremental rebuilds (ninja) of the extension when csrc/ changes.
build: $(INSTALL_STAMP) $(SOURCES)
	$(PY) setup.py -q build_ext --inplace

# The Triton that the newest torch's CUDA wheel pins (torch 2.15.0: triton 3.9.0), beside CI's 3.6:
# the suite compiles every kernel under it too (pip --target: Triton alone, about 1 GB).
NEWEST_TRITON ?= 3.9.0
NEWEST_TRITON_STAMP := $(VENV)/triton-newest/.installed-$(NEWEST_TRITON)
$(NEWEST_TRITON_STAMP): $(DEPS_STAMP)
	rm -rf $(VENV)/triton-newest
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --target $(VENV)/triton-newest triton==$(NEWEST_TRITON)
	touch $@

# One pytest process per core (pytest-xdist; TEST_WORKERS=0 runs them in this process), each with
# one torch thread (tests/conftest.py); the 15 slowest tests are listed at the end.
TEST_WORKERS ?= auto
test: build $(NEWEST_TRITON_STAMP)
	$(PY) -m pytest tests -n $(TEST_WORKERS) --durations=15

demo: build
	$(PY) -m fasttransformer demo $(DEMO_ARGS)

info: build
	$(PY) -m fasttransformer info

bench: build
	$(PY) -m fasttransformer bench all --device cpu --out benchmarks/results/$$(date +%Y-%m-%d)-cpu

# Uses the machine's own python3 and installs nothing (the GPU machine has no network).
gpu-check:
	bash benchmarks/gpu_check.sh

# Not in CI (a 5 GB download). The extension builds with its CUDA kernels there (_C for Python 3.12).
GPU_STACK := .venv-gpu-stack
GPU_STACK_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3) python3.12)
gpu-stack-test:
	test -x $(GPU_STACK)/bin/python || $(GPU_STACK_PYTHON) -m venv $(GPU_STACK)
	grep -v '^torch==' requirements-dev.txt > $(GPU_STACK)/requirements.txt
	$(GPU_STACK)/bin/pip install --disable-pip-version-check -q torch==2.11.0 -r $(GPU_STACK)/requirements.txt
	$(GPU_STACK)/bin/python setup.py -q build_ext --inplace
	$(GPU_STACK)/bin/python -m pytest tests

aot-record: $(DEPS_STAMP)
	mkdir -p tests/data
	env -u TRITON_INTERPRET $(PY) -m fasttransformer.kernels.aot --record tests/data/aot-record.json > /dev/null

# Only triton's pin differs from requirements-dev.txt; the checkout's code is compiled (PYTHONPATH).
AOT_TRITONS ?= 3.7.1 3.8.0 3.9.0
aot-tritons:
	for version in $(AOT_TRITONS); do \
	  venv=.venv-triton-$$version; \
	  test -x $$venv/bin/python || $(PYTHON) -m venv $$venv || exit 1; \
	  sed "s/^triton==.*/triton==$$version/" requirements-dev.txt > $$venv/requirements.txt; \
	  $$venv/bin/pip install --disable-pip-version-check -q -r $$venv/requirements.txt || exit 1; \
	  PYTHONPATH=$(CURDIR) $$venv/bin/python -m pytest tests -m aot -n $(TEST_WORKERS) || exit 1; \
	done

clean:
	rm -rf build fasttransformer/*.so *.egg-info
