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
