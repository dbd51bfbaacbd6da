# `make test` and `make demo` create .venv when it is missing and install what they need.
# On a machine without an NVIDIA GPU the CPU build of PyTorch is installed (never a multi-GB CUDA build).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= dev,docs,viz,hf,train,gpu,explain
TORCH_CPU ?= torch==2.13.0

.PHONY: test demo bench lint clean bench-gpu gpu-session dist docs native native-asan

$(STAMP): pyproject.toml setup.py Makefile src/selfattn/csrc/attention.cpp
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the default (CUDA) torch"; $(PY) -m pip install -q "torch>=2.5"; \
	else \
		echo "no NVIDIA GPU: installing the CPU build $(TORCH_CPU)"; $(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q "setuptools>=68" wheel ninja
	@# --no-build-isolation: setup.py compiles the native C++ kernel against the torch installed above
	$(PY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
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
	rm -rf $(VENV) build dist site src/*.egg-info src/selfattn/_native_*.so

# rebuild the native kernel in place after editing src/selfattn/csrc/attention.cpp
native: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# the native kernel built with AddressSanitizer, and its oracle matrix run under it (not part of CI: slow)
native-asan: $(STAMP)
	SELFATTN_NATIVE_ISAS=$$($(PY) -c "import torch; c = torch.backends.cpu.get_cpu_capability().lower(); print(c if c in ('avx2', 'avx512') else 'default')") \
	  CFLAGS="-fsanitize=address -fno-omit-frame-pointer" LDFLAGS="-fsanitize=address" $(PY) setup.py -q build_ext --inplace --force
	LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
	  $(PY) -m pytest -q -x tests/test_native.py tests/test_backends.py -k native
	$(PY) setup.py -q build_ext --inplace --force

bench-gpu: $(STAMP)
	$(PY) benchmarks/bench_gpu.py

# On a machine with an NVIDIA GPU and its own PyTorch + Triton (installs nothing): GPU tests, then the quick benchmark
gpu-session:
	bash benchmarks/gpu_session.sh
