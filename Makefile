# `make test` and `make demo` create .venv when it is missing and install what they need.
# On a machine without an NVIDIA GPU the CPU build of PyTorch is installed (never a multi-GB CUDA build).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= dev,docs,viz,hf,train,gpu,explain
TORCH_CPU ?= torch==2.13.0

.PHONY: test demo bench lint clean bench-gpu gpu-session dist docs

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the default (CUDA) torch"; $(PY) -m pip install -q "torch>=2.5"; \
	else \
		echo "no NVIDIA GPU: installing the CPU build $(TORCH_CPU)"; $(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

DEMO_GPT ?= .demo-gpt
demo: $(STAMP)
	$(PY) -m selfattn demo
	@echo; echo "== a tiny GPT: trained for a minute on the Python docs that ship with CPython, then sampled =="
	@echo "   (one thread: on a shared machine two threads wait on each other)"
	$(PY) -m selfattn train --steps 150 --eval-every 75 --threads 1 --out $(DEMO_GPT)
	$(PY) -m selfattn generate --checkpoint $(DEMO_GPT) --prompt "The " --tokens 300 --seed 0 --threads 1

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

# sdist and wheel into dist/ (offline: the build backend, setuptools, is already in .venv)
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist .

# the documentation site into site/ (strict: a broken link or reference is an error); `mkdocs serve` to browse it
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build dist site src/*.egg-info

bench-gpu: $(STAMP)
	$(PY) benchmarks/bench_gpu.py

# On a machine with an NVIDIA GPU and its own PyTorch + Triton (installs nothing): GPU tests, then the quick benchmark
gpu-session:
	bash benchmarks/gpu_session.sh
