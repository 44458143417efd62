# flm_rt developer entry points. Quickstart: `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-stamp
PYTEST_ARGS ?=

.PHONY: all venv build demo test bench bench-quick readme-perf cpp clean gpu-check gpu-stage

all: build

# 1. Virtual environment with every pinned dependency (torch 2.14.1 comes from the local wheel cache).
$(DEPS): requirements-dev.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" "setuptools>=77" wheel
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

venv: $(DEPS)

# 2. The package (editable) and its compiled extension flm_rt._C (CPU always, CUDA when nvcc is found).
build: $(DEPS)
	$(PY) -m pip install -v --no-deps --no-build-isolation -e .
	$(PY) -c "import flm_rt; print(flm_rt.build_info(short=True))"

# Generate text from the small default model shipped with the package, with timings.
demo: build
	$(VENV)/bin/flm-rt demo

# The whole suite: unit + golden tests, the C++ programs, benchmarks in smoke mode.
test: build
	$(PY) -m pytest -q tests bench --benchmark-disable $(PYTEST_ARGS)

bench: build
	$(VENV)/bin/flm-rt bench

bench-quick: build
	$(VENV)/bin/flm-rt bench --quick

# README.md's performance table (between its perf-table markers), from the newest bench/results/ run per machine.
readme-perf: $(DEPS)
	$(PY) -m flm_rt.benchmarks.readme

# On a GPU machine, with that machine's own python3 and torch (not the .venv): build for sm_90, CUDA tests,
# golden cases, compute-sanitizer, bandwidth and end-to-end figures, ncu, a profiler trace; under 9 minutes.
# Results: $$OUT/<gpu>/ (device tool) or bench/results/<gpu>/gpu-check/. GPU_CHECK_ARGS=--cpu: the no-GPU mode.
gpu-check:
	$(PYTHON) bench/gpu/check.py $(GPU_CHECK_ARGS)

# Here, before a device run: stage the golden vectors (../shared is not sent) into the ignored .gpu-stage/,
# which the run then carries (carry: [".gpu-stage"]). Nothing under .gpu-stage is committed.
gpu-stage:
	rm -rf .gpu-stage && mkdir -p .gpu-stage/shared/golden
	cp -r ../shared/golden/tiny .gpu-stage/shared/golden/

clean:
	rm -rf build *.egg-info flm_rt/*.so .pytest_cache .benchmarks
