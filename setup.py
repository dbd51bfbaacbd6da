"""Builds selfattn's native CPU kernel (src/selfattn/csrc/attention.cpp) when the package is installed.

The kernel is compiled once per x86 instruction set that PyTorch itself dispatches on (AVX-512, AVX2, and the
baseline), as three small extension modules; at run time selfattn loads the one matching
``torch.backends.cpu.get_cpu_capability()`` (so ``ATEN_CPU_CAPABILITY=avx2`` exercises the AVX2 build).

It needs torch importable while building, hence ``pip install --no-build-isolation -e .`` (what ``make`` runs)
after torch is installed, and a C++ compiler. Without either the package installs all the same, without the kernel:
``selfattn info`` then says ``native: not built`` and why, and the ``tiled`` backend serves the CPU.
SELFATTN_NATIVE=0 skips the build; SELFATTN_NATIVE_ISAS=avx512,avx2,default chooses the variants.
"""

import os
import platform
import sys

from setuptools import setup

ISA_FLAGS = {  # the flags and macros PyTorch compiles its own CPU kernels with, per capability
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY=AVX512",
               "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _say(msg: str) -> None:
    print(f"selfattn setup: {msg}", file=sys.stderr)


def _variant_source(isa: str) -> str:
    """A one-line source per variant that includes the kernel, so each variant has an object file of its own."""
    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join("build", "native-variants")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"attention_{isa}.cpp")
    text = f'#include "{os.path.join(here, "src", "selfattn", "csrc", "attention.cpp")}"\n'
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    return path


def native_extensions():
    if os.environ.get("SELFATTN_NATIVE", "1") == "0":
        _say("SELFATTN_NATIVE=0: the native kernel is not built")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:
        _say(f"torch is not importable while building ({e}): the native kernel is not built. Install torch first, "
             "then `pip install --no-build-isolation -e .`")
        return [], {}
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    isas = os.environ.get("SELFATTN_NATIVE_ISAS", "avx512,avx2,default" if x86 else "default").split(",")
    mkl = torch.backends.mkl.is_available()
    common = ["-O3", "-fopenmp", "-std=c++17"] + (["-DSELFATTN_MKL"] if mkl else [])
    exts = [
        CppExtension(
            f"selfattn._native_{isa}",
            [_variant_source(isa)],
            extra_compile_args=common + ISA_FLAGS[isa] + [f'-DSELFATTN_ISA="{isa}"'],
            extra_link_args=["-fopenmp"],
        )
        for isa in isas
    ]

    class Build(BuildExtension):
        """Builds the variants one after another, and installs the package even when a compiler is missing.

        Not in parallel: torch's BuildExtension swaps the compiler's compile function per extension, so setuptools'
        parallel build_ext raced on it (an AVX-512 variant was compiled with the AVX2 flags, or linked from an
        object that was never written: a fresh clone ended without the kernel)."""

        def finalize_options(self):
            super().finalize_options()
            self.parallel = False

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 — any build failure leaves a working pure-Python package
                _say(f"the native kernel failed to build ({type(e).__name__}: {e}); selfattn works without it "
                     "(the tiled backend). Needs g++ and torch: `pip install --no-build-isolation -e .`")

    return exts, {"build_ext": Build.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
