"""The Triton kernels compile for real NVIDIA targets (H100 = sm_90, A100 = sm_80) on a machine without a GPU.

The interpreter runs the kernels' logic but not Triton's compiler; this catches what only the compiler rejects
(non-constexpr globals, type mismatches across branches, tile shapes the tensor cores cannot take).
"""

import pytest

triton = pytest.importorskip("triton", reason="triton not installed (pip install 'selfattn[gpu]')")

ALL_MASKS = dict(CAUSAL=True, WINDOW=True, HAS_LEN=True, HAS_DOC=True, DOC_RUNS=True)  # HAS_LEN: key starts and lengths
MODS = dict(SOFTCAP=True, ALIBI=1, REL=2)  # ALiBi before the soft-cap, the relative bias after it


@pytest.mark.parametrize("name, arch, dtype, head_dim, flags", [
    ("attn_fwd", 90, "bf16", 128, dict(CAUSAL=True)),
    ("attn_fwd", 80, "fp16", 64, ALL_MASKS),
    ("attn_bwd_dkdv", 90, "bf16", 128, ALL_MASKS),
    ("attn_bwd_dq", 90, "fp16", 96, ALL_MASKS),
    ("attn_bwd_delta", 90, "bf16", 128, {}),
    ("attn_fwd", 90, "bf16", 128, dict(ALL_MASKS, TMA_OK=True, TMA=True)),
    ("attn_fwd", 90, "fp16", 64, dict(CAUSAL=True, HAS_BIAS=True)),
    ("attn_bwd_dkdv", 90, "bf16", 128, dict(CAUSAL=True, HAS_BIAS=True)),
    ("attn_bwd_dq", 90, "bf16", 128, dict(ALL_MASKS, HAS_BIAS=True, BIAS_GRAD=True)),
    ("attn_fwd", 90, "bf16", 128, dict(CAUSAL=True, **MODS, HAS_SINK=True, DROPOUT=True)),
    ("attn_bwd_dkdv", 90, "bf16", 128, dict(ALL_MASKS, **MODS, DROPOUT=True)),
    ("attn_bwd_dq", 80, "fp16", 64, dict(ALL_MASKS, **MODS, DROPOUT=True, SLOPE_GRAD=True, HAS_BIAS=True,
                                         BIAS_GRAD=True)),
], ids=["fwd-sm90-causal", "fwd-sm80-masks", "dkdv-sm90-masks", "dq-sm90-masks-D96", "delta-sm90", "fwd-sm90-tma",
        "fwd-sm90-bias", "dkdv-sm90-bias", "dq-sm90-bias-grad", "fwd-sm90-mods-sinks-dropout",
        "dkdv-sm90-mods-dropout", "dq-sm80-mods-dropout-grads"])
def test_kernels_compile_for_gpu_targets(name, arch, dtype, head_dim, flags):
    from selfattn.backends import triton_tuning

    kernel = triton_tuning.compile_for(name, arch=arch, dtype=dtype, head_dim=head_dim, flags=flags)
    ptx = kernel.asm["ptx"]
    assert f".target sm_{arch}" in ptx, ptx[:400]
    if name != "attn_bwd_delta":
        assert "mma" in ptx, "the matrix products must use the tensor cores"
    if flags.get("TMA"):
        assert "cp.async.bulk.tensor" in ptx, "the TMA variant must load K/V with the copy engine"
    if name != "attn_bwd_delta" and arch == 90:
        assert "wgmma.mma_async" in ptx, "on Hopper the products must use wgmma (the warpgroup tensor-core path)"
    assert kernel.asm["cubin"], "ptxas produced no binary"
