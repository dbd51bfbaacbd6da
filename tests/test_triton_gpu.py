"""The Triton kernels on a CUDA GPU against the float64 oracle (FlashAttention's rule), on FlashAttention's shapes.

Skipped, with the reason, on a machine without a CUDA GPU; the same kernels are tested there under the interpreter
(test_triton_interpreter.py). The matrix runs with the default tiles (SELFATTN_TRITON_AUTOTUNE=0, so that it does
not tune every shape bucket) unless the variable is set; test_autotuned_path_matches runs the tuned path.
"""

import itertools
import os

import pytest
import torch
from triton_cases import check_case

import selfattn

@pytest.fixture(autouse=True)
def _default_tiles(monkeypatch):
    monkeypatch.setenv("SELFATTN_TRITON_AUTOTUNE", os.environ.get("SELFATTN_TRITON_AUTOTUNE", "0"))


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter tests run "
                                "the same kernels on the CPU)")

# (N_q, N_k) from FlashAttention's test_flash_attn_output: odd sizes, N_q != N_k both ways, and long ones.
SEQLENS = [(113, 203), (128, 217), (113, 211), (108, 256), (256, 512), (512, 256), (1023, 1024), (1024, 1023),
           (2048, 2048), (1, 239), (239, 1), (3, 799), (799, 3)]
DTYPES = [torch.float16, torch.bfloat16]


def _id(*parts):
    return "-".join(str(p).replace("torch.", "").replace(" ", "") for p in parts)


MAIN = [pytest.param(n, d, dt, kind, id=_id(n, f"D{d}", dt, kind))
        for n, d, dt, kind in itertools.product(SEQLENS, (64, 128), DTYPES, ("none", "causal"))]


@pytest.mark.parametrize("seqlens, D, dtype, kind", MAIN)
def test_flash_shapes(seqlens, D, dtype, kind):
    N_q, N_k = seqlens
    check_case((2, 4, 2, N_q, N_k, D, D), kind, dtype, seed=N_q * 7919 + N_k + D)


OTHER_DIMS = [pytest.param(n, d, dt, id=_id(n, f"D{d}", dt))
              for n, d, dt in itertools.product([(113, 203), (1024, 1023)], (32, 40, 59, 96, 111, 160, 192, 256),
                                                DTYPES)]


@pytest.mark.parametrize("seqlens, D, dtype", OTHER_DIMS)
def test_head_dims(seqlens, D, dtype):
    check_case((2, 2, 1, *seqlens, D, D), "causal", dtype, seed=D)


MASKS = [pytest.param(n, kind, dt, id=_id(n, kind, dt))
         for n, kind, dt in itertools.product([(113, 203), (1023, 1024), (2048, 2048)],
                                              ("window", "padding", "causal+padding", "document",
                                               "document-scattered", "window&document&padding", "left-padding",
                                               "causal+left-padding", "window&key-range", "bias", "bias+causal"),
                                              DTYPES)]


@pytest.mark.parametrize("seqlens, kind, dtype", MASKS)
def test_masks(seqlens, kind, dtype):
    check_case((3, 4, 1, *seqlens, 64, 64), kind, dtype, seed=sum(seqlens))


def test_fp32_and_dv_differs_and_strided():
    check_case((2, 4, 4, 300, 517, 64, 32), "causal", torch.float32, seed=1)
    check_case((2, 8, 2, 1000, 1000, 128, 128), "causal", torch.bfloat16, seed=2, transpose=True)


def test_autotuned_path_matches(monkeypatch):
    monkeypatch.setenv("SELFATTN_TRITON_AUTOTUNE", "1")
    check_case((2, 16, 16, 2048, 2048, 128, 128), "causal", torch.bfloat16, seed=3)


def test_large_gqa_backward_is_bitwise_repeatable():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 16, 4096, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 2, 4096, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))

    def run():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = selfattn.attention(qq, kk, vv, causal=True)
        return (out, *torch.autograd.grad(out, (qq, kk, vv), torch.ones_like(out)))

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_chosen_by_default_for_cuda_tensors():
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    assert selfattn.backends.choose(selfattn.api.make_call(q, q, q, causal=True)).name == "triton"


TMA = [pytest.param(n, kind, id=_id(n, kind)) for n, kind in
       [((113, 203), "causal"), ((1024, 1023), "none"), ((1023, 1024), "causal+padding"),
        ((2048, 2048), "window&document&padding"), ((1023, 1024), "causal+left-padding")]]


@pytest.mark.parametrize("seqlens, kind", TMA)
def test_tma_forward(seqlens, kind, monkeypatch):
    """The forward variant that loads K/V through tensor descriptors (the autotuner may pick it on Hopper), forced."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor-descriptor (TMA) loads need a Hopper GPU or newer")
    from selfattn.backends import triton_tuning

    default = triton_tuning.default_config
    monkeypatch.setattr(triton_tuning, "default_config",
                        lambda name, d: dict(default(name, d), TMA=True) if name == "attn_fwd" else default(name, d))
    check_case((2, 4, 2, *seqlens, 128, 128), kind, torch.bfloat16, seed=sum(seqlens) + 7)
