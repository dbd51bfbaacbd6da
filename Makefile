# `make test` and `make demo` create .venv when it is missing and install what they need.
# On a machine without an NVIDIA GPU the CPU build of PyTorch is installed (never a multi-GB CUDA build).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= dev,docs,viz,hf,train,gpu,explain
TORCH_CPU ?= torch==2.13.0

.PHONY: test demo bench lint clean bench-gpu gpu-session dist docs native native-asan test-portable fuzz

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

# The numerical core of the suite under each instruction set torch's CPU kernels can use here (ATEN_CPU_CAPABILITY:
# default = scalar, avx2, avx512; one the CPU lacks is skipped) and with 1 and 2 threads: the oracle matrix and every
# backend against it, masks, score modifiers, varlen, decoding, explain's and the drop-ins' equality with eager, and
# the fuzzer's CI profile. ISAS / THREADS narrow it, e.g. `make test-portable ISAS=avx2 THREADS=2` (what CI runs).
PORTABLE_TESTS ?= tests/test_backends.py tests/test_reference.py tests/test_masks.py tests/test_score_mods.py \
	tests/test_varlen.py tests/test_decode.py tests/test_explain_pretrained.py tests/test_hf.py tests/test_mha_dropin.py \
	tests/test_fuzz.py tests/test_native.py tests/test_environment.py
PORTABLE_SKIP ?= compiles or fifty_greedy or cli_
# CI's extra AVX2 pass: the parts of that core whose bounds depend on summation order (every backend against the
# oracle, explain's and the drop-ins' equality with eager, varlen, decoding, the fuzzer), not the slow score-modifier
# grids, which the full suite runs once
PORTABLE_CI_TESTS ?= tests/test_backends.py tests/test_explain_pretrained.py tests/test_hf.py tests/test_mha_dropin.py \
	tests/test_varlen.py tests/test_decode.py tests/test_fuzz.py tests/test_native.py tests/test_environment.py
ISAS ?= default avx2 avx512
THREADS ?= 1 2
test-portable: $(STAMP)
	@for isa in $(ISAS); do \
		if [ $$isa != default ] && ! grep -qw "$$(echo $$isa | sed 's/avx512/avx512f/')" /proc/cpuinfo; then \
			echo "== $$isa: this CPU lacks it, skipped"; continue; fi; \
		for t in $(THREADS); do \
			echo "== ATEN_CPU_CAPABILITY=$$isa, $$t thread(s)"; \
			ATEN_CPU_CAPABILITY=$$isa OMP_NUM_THREADS=$$t SELFATTN_EXPECT_CPU_CAPABILITY=$$isa \
				$(PY) -m pytest -q -p no:cacheprovider $(PORTABLE_TESTS) -k "not ($(PORTABLE_SKIP))" || exit 1; \
		done; \
	done

# The fuzzer's long profile, with fresh seeds, for FUZZ_SECONDS (an hour by default); counts the cases in FUZZ_LOG
FUZZ_SECONDS ?= 3600
FUZZ_LOG ?= fuzz.log
fuzz: $(STAMP)
	@rm -f $(FUZZ_LOG); end=$$(( $$(date +%s) + $(FUZZ_SECONDS) )); runs=0; failed=0; \
	while [ $$(date +%s) -lt $$end ]; do \
		runs=$$((runs + 1)); \
		SELFATTN_FUZZ=long SELFATTN_FUZZ_LOG=$(FUZZ_LOG) $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py \
			-k "fuzz_" --hypothesis-seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ') || failed=$$((failed + 1)); \
	done; \
	echo "fuzz: $$runs runs ($$failed failed); cases: $$(grep -c '^ok' $(FUZZ_LOG)) checked against the oracle," \
		"$$(grep -c '^declined' $(FUZZ_LOG)) declined by their backend (BackendError)"; \
	[ $$failed -eq 0 ]

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
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0 \
	  $(PY) -m pytest -q -x tests/test_native.py tests/test_backends.py tests/test_score_mods.py -k native
	$(PY) setup.py -q build_ext --inplace --force

bench-gpu: $(STAMP)
	$(PY) benchmarks/bench_gpu.py

# On a machine with an NVIDIA GPU and its own PyTorch + Triton (installs nothing): GPU tests, then the quick benchmark
gpu-session:
	bash benchmarks/gpu_session.sh
