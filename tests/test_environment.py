"""Under CI (CI=true, as `.ci/run` is run) the optional extras must be installed, so that no test of an optional
part (Triton interpreter, transformers, plots, checkpoints, the browser) is skipped for a missing package."""

import importlib.util
import os
import shutil

import pytest


@pytest.mark.skipif(os.environ.get("CI", "").lower() not in ("1", "true"), reason="only enforced under CI")
@pytest.mark.parametrize("module", ["triton", "transformers", "matplotlib", "safetensors", "tqdm", "hypothesis"])
def test_optional_extras_are_installed_in_ci(module):
    assert importlib.util.find_spec(module) is not None, f"{module} missing: make test installs .[dev,viz,hf,train,gpu]"


@pytest.mark.skipif(os.environ.get("CI", "").lower() not in ("1", "true"), reason="only enforced under CI")
def test_chromium_is_installed_in_ci():
    assert shutil.which("chromium"), ".ci/run installs Debian's chromium for the HTML page test"


@pytest.mark.skipif(os.environ.get("CI", "").lower() not in ("1", "true"), reason="only enforced under CI")
def test_native_kernel_is_built_in_ci():
    """CI has g++: `make test` must have compiled the native kernel for this CPU (setup.py), or CI fails."""
    from selfattn.backends import native

    assert native.extension() is not None, native.load_error()
    import torch

    want = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "default")
    assert native.extension().isa == want, f"loaded the {native.extension().isa} build on a {want} CPU"


@pytest.mark.skipif(not os.environ.get("SELFATTN_EXPECT_CPU_CAPABILITY"), reason="set by make test-portable")
def test_isa_pass_runs_the_requested_kernels_and_threads():
    """make test-portable runs the core under ATEN_CPU_CAPABILITY and OMP_NUM_THREADS: torch must really use them,
    or the pass tests this CPU's default kernels again under another name."""
    import torch

    want = os.environ["SELFATTN_EXPECT_CPU_CAPABILITY"].upper()
    assert torch.backends.cpu.get_cpu_capability() == want
    if os.environ.get("OMP_NUM_THREADS"):
        assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
