"""The Triton kernels against the float64 oracle on small shapes, run on the CPU by Triton's interpreter.

Not collected by a plain ``pytest`` run (the file name does not start with ``test_``): TRITON_INTERPRET=1 must be set
before Triton is first imported, so ``test_triton_interpreter.py`` runs this file in a subprocess with it set:

    TRITON_INTERPRET=1 python -m pytest tests/triton_cases.py

``check_case`` is shared with the GPU matrix in ``test_triton_gpu.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib

import pytest
import torch

import selfattn
from selfattn import backends, masks, reference, testing

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
DEVICE = "cuda" if ON_GPU else "cpu"


def build_mask(kind: str, B: int, N_q: int, N_k: int, g: torch.Generator) -> dict:
    """Keyword arguments of ``attention`` for one mask kind (every kind the kernels take)."""
    if kind == "none":
        return {}
    if kind == "causal":
        return dict(causal=True)
    if kind == "window":
        return dict(mask=masks.sliding_window(int(torch.randint(1, 40, (), generator=g))))
    if kind == "padding":
        lengths = torch.randint(0, N_k + 1, (B,), generator=g)
        lengths[0] = 0  # a batch element whose rows see nothing
        return dict(mask=masks.key_padding(lengths))
    if kind == "causal+padding":
        lengths = torch.randint(N_k // 2, N_k + 1, (B,), generator=g)
        return dict(mask=masks.key_padding(lengths), causal=True)
    if kind == "left-padding":  # batched generation: the real keys are the last ones
        starts = torch.randint(0, N_k + 1, (B,), generator=g)
        starts[0], starts[-1] = N_k, 0  # a batch element with no key at all, and one without padding
        return dict(mask=masks.key_range(starts))
    if kind == "causal+left-padding":  # a left-padded prefill: the padded rows see nothing
        starts = torch.randint(0, N_k + 1, (B,), generator=g)
        starts[0] = N_k
        return dict(mask=masks.causal() & masks.key_range(starts))
    if kind == "window&key-range":  # a sliding-window layer with padding on both sides
        starts = torch.randint(0, N_k // 2 + 1, (B,), generator=g)
        ends = torch.randint(N_k // 2, N_k + 1, (B,), generator=g)
        ends[0] = starts[0]  # an empty range
        w = int(torch.randint(1, 40, (), generator=g))
        return dict(mask=masks.sliding_window(w) & masks.key_range(starts, ends))
    if kind in ("bias", "bias+causal"):  # an additive bias (ALiBi, T5, a float mask): -inf entries, a dead row
        bias = torch.randn(B, 1, N_q, N_k, generator=g) if kind == "bias" else torch.randn(N_q, N_k, generator=g)
        bias[..., N_q // 2, :] = -math.inf
        bias[bias > 1.5] = -math.inf
        return dict(bias=bias, causal=kind == "bias+causal")
    if kind == "document":  # packed sequences: sorted ids, so every document is one run (blocks are skipped)
        ids = torch.sort(torch.randint(0, 5, (B, N_k), generator=g), dim=1).values
        return dict(mask=masks.document(ids), causal=True)
    if kind == "document-scattered":  # a document in several runs: no block skipping, exact per-position compare
        return dict(mask=masks.document(torch.randint(0, 3, (N_k,), generator=g)))
    if kind == "window&document&padding":
        ids = torch.sort(torch.randint(0, 3, (N_k,), generator=g)).values
        lengths = torch.randint(1, N_k + 1, (B,), generator=g)
        return dict(mask=masks.sliding_window(17) & masks.document(ids) & masks.key_padding(lengths))
    raise ValueError(kind)


def check_case(shape, kind: str, dtype: torch.dtype, seed: int, *, grads: bool = True, transpose: bool = False):
    """Forward (out, lse) and backward of backend "triton" against the float64 oracle (FlashAttention's rule)."""
    B, H_q, H_kv, N_q, N_k, D, D_v = shape
    g = torch.Generator().manual_seed(seed)
    q64 = torch.randn(B, H_q, N_q, D, generator=g, dtype=torch.float64)
    k64 = torch.randn(B, H_kv, N_k, D, generator=g, dtype=torch.float64)
    v64 = torch.randn(B, H_kv, N_k, D_v, generator=g, dtype=torch.float64)
    kw = build_mask(kind, B, N_q, N_k, g)
    q, k, v = (t.to(DEVICE, dtype) for t in (q64, k64, v64))
    kw = {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    if transpose:  # strided inputs, as they come out of a (B, N, H, D) projection
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.requires_grad_(grads) for t in (q, k, v))

    if ON_GPU:  # the caching allocator hands this NaN-filled memory to the outputs next
        torch.full((64 << 20,), float("nan"), device="cuda")
    else:
        testing.poison_allocator()
    out, lse = selfattn.attention(q, k, v, backend="triton", return_lse=True, **kw)
    q_r, k_r, v_r = (t.detach().double().requires_grad_(grads) for t in (q, k, v))  # on the device: fp64
    out_ref, lse_ref = reference.attention(q_r, k_r, v_r, return_lse=True, **kw)  # masks move to the tensors' device
    q_n, k_n, v_n = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    out_naive = testing.naive(q_n, k_n, v_n, **kw)

    ident = f"{shape} {kind} {dtype}"
    assert out.dtype == dtype and out.shape == (B, H_q, N_q, D_v), ident
    testing.check_against_oracle(out, out_naive, out_ref, what=f"triton out {ident}")
    dead = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), dead), f"{ident}: lse must be -inf exactly for fully masked rows"
    assert (out[dead] == 0).all(), f"{ident}: fully masked rows must be zeros"
    torch.testing.assert_close(lse[~dead].double(), lse_ref[~dead], rtol=0,
                               atol=1e-2 if dtype != torch.float32 else 1e-5, msg=lambda m: f"{ident} lse: {m}")
    if grads:
        d_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
        got = torch.autograd.grad(out, (q, k, v), d_out.to(DEVICE, dtype))
        ref = torch.autograd.grad(out_ref, (q_r, k_r, v_r), d_out)
        naive = torch.autograd.grad(out_naive, (q_n, k_n, v_n), d_out.to(DEVICE, dtype))
        # dS = P·(dP − delta) cancels: its rounding is relative to the terms dP and delta sum, not to |dS| (which is
        # exactly 0 for a row with one key, where the naive autograd happens to be exact): testing.grad_floors
        with torch.no_grad():
            weights = reference.steps(q_r, k_r, v_r, **kw).weights
            floors = testing.grad_floors(q_r, k_r, v_r, d_out, weights, dtype=dtype)
        for name, a, r, n, floor in zip("qkv", got, ref, naive, floors, strict=True):
            assert a.shape == r.shape and a.dtype == dtype, f"{ident} d{name}"
            testing.check_against_oracle(a, n, r, factor=3.0, what=f"triton d{name} {ident}",
                                         floor=max(floor, testing.floor_for(dtype, r.abs().max().item())))


# ------------------------------------------------------------------------------------ interpreter cases (small)

interpreted = pytest.mark.skipif(
    ON_GPU or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="the interpreter cases run with TRITON_INTERPRET=1 (tests/test_triton_interpreter.py starts them)")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [  # (B, H_q, H_kv, N_q, N_k, D, D_v), mask kind, dtype
    ((1, 1, 1, 1, 1, 16, 16), "none", F32),
    ((2, 4, 2, 37, 53, 24, 24), "none", BF16),  # GQA, N_q != N_k, odd head dim
    ((2, 4, 2, 37, 53, 24, 24), "causal", F16),
    ((1, 2, 1, 53, 37, 64, 32), "causal", BF16),  # N_q > N_k: the first rows see nothing; D != D_v
    ((1, 3, 3, 70, 70, 32, 32), "window", F16),
    ((3, 2, 1, 45, 61, 40, 40), "padding", BF16),
    ((2, 2, 2, 50, 50, 16, 16), "causal+padding", F32),
    ((2, 2, 1, 64, 64, 32, 32), "document", F16),
    ((1, 2, 2, 33, 47, 16, 16), "document-scattered", F32),
    ((2, 2, 1, 60, 60, 32, 32), "window&document&padding", BF16),
    ((3, 2, 1, 29, 75, 16, 16), "left-padding", F32),
    ((3, 2, 2, 41, 70, 32, 32), "causal+left-padding", BF16),
    ((2, 2, 1, 66, 50, 16, 16), "window&key-range", F16),  # N_q > N_k
    ((1, 1, 1, 40, 40, 128, 128), "causal", BF16),
    ((1, 1, 1, 19, 35, 256, 256), "none", F16),
    ((1, 2, 1, 17, 33, 59, 59), "causal", F32),
    ((2, 4, 2, 37, 53, 32, 32), "bias", BF16),  # broadcast over heads, GQA
    ((1, 2, 1, 53, 37, 24, 24), "bias+causal", F16),  # broadcast over batch and heads, N_q > N_k
    ((2, 2, 2, 30, 30, 16, 16), "bias", F32),
]


@interpreted
@pytest.mark.parametrize("shape, kind, dtype", CASES, ids=[f"{s}-{k}-{d}".replace(" ", "") for s, k, d in CASES])
def test_matches_the_oracle(shape, kind, dtype):
    check_case(shape, kind, dtype, seed=zlib.crc32(f"{shape}{kind}".encode()))


TMA_CASES = [  # head dims that are powers of two, fp16/bf16: the layouts the TMA variant takes
    ((2, 4, 2, 37, 53, 32, 32), "causal", F16),  # GQA, N_q != N_k
    ((1, 2, 1, 53, 37, 64, 32), "causal", BF16),  # N_q > N_k: rows that see nothing; D != D_v
    ((2, 2, 1, 60, 60, 32, 32), "window&document&padding", BF16),
    ((3, 2, 1, 45, 61, 16, 16), "padding", F16),
    ((3, 2, 2, 40, 57, 32, 32), "causal+left-padding", BF16),  # the key span starts past the first tiles
]


@interpreted
@pytest.mark.parametrize("shape, kind, dtype", TMA_CASES,
                         ids=[f"{s}-{k}-{d}".replace(" ", "") for s, k, d in TMA_CASES])
def test_tma_forward_matches_the_oracle(shape, kind, dtype, monkeypatch):
    """The forward that reads K and V through tensor descriptors (Hopper's TMA), which the GPU autotuner may pick:
    tiles past N_k must read as zeros and the masks must hold as in the pointer-load forward."""
    from selfattn.backends import triton_flash

    monkeypatch.setattr(triton_flash, "INTERPRETER_TMA", True)
    verdicts = []
    tma_ok = triton_flash.tma_ok
    monkeypatch.setattr(triton_flash, "tma_ok", lambda call: verdicts.append(tma_ok(call)) or verdicts[-1])
    check_case(shape, kind, dtype, seed=zlib.crc32(f"tma{shape}{kind}".encode()))
    assert verdicts and all(verdicts), f"the TMA forward was not taken: {verdicts}"


@interpreted
def test_tma_is_refused_for_layouts_descriptors_cannot_read():
    from selfattn.backends import triton_flash

    def call(D=32, dtype=BF16, transpose_k=False, offset=0):
        q = torch.randn(1, 2, 9, D, dtype=dtype)
        k = torch.randn(1, 2, 9 * D + offset, dtype=dtype)[..., offset:].reshape(1, 2, 9, D)
        if transpose_k:
            k = k.transpose(-2, -1).contiguous().transpose(-2, -1)
        return selfattn.api.make_call(q, k, k.clone())

    assert triton_flash.tma_ok(call())
    assert not triton_flash.tma_ok(call(D=24)), "D not a power of two: tiles would need padding"
    assert not triton_flash.tma_ok(call(dtype=F32))
    assert not triton_flash.tma_ok(call(transpose_k=True)), "the last stride must be 1"
    assert not triton_flash.tma_ok(call(offset=1)), "rows must start on 16 bytes"


@interpreted
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("bias_shape", [(1, 4, 37, 53), (2, 1, 37, 53), (37, 53)])
def test_bias_gradient(dtype, bias_shape):
    """d(loss)/d(bias) = dS, summed over the dimensions the bias broadcasts (FlashAttention's rule, 3x)."""
    g = torch.Generator().manual_seed(11)
    q64, k64, v64 = (torch.randn(2, h, n, 32, generator=g, dtype=torch.float64) for h, n in ((4, 37), (2, 53), (2, 53)))
    b64 = torch.randn(bias_shape, generator=g, dtype=torch.float64)
    b64[..., 3, :] = -math.inf  # a row that sees nothing: its gradient is 0
    b64[..., 20, 7] = -math.inf
    d_out = torch.randn(2, 4, 37, 32, generator=g, dtype=torch.float64)
    testing.poison_allocator()
    grads = {}
    for name, tensors in (("fast", [t.to(dtype) for t in (q64, k64, v64, b64)]),
                          ("naive", [t.to(dtype) for t in (q64, k64, v64, b64)]),
                          ("oracle", [q64, k64, v64, b64])):
        q, k, v, bias = (t.clone().requires_grad_() for t in tensors)
        if name == "fast":
            out = selfattn.attention(q, k, v, bias=bias, causal=True, backend="triton")
        elif name == "naive":
            out = testing.naive(q, k, v, bias=bias, causal=True)
        else:
            out = reference.attention(q, k, v, bias=bias, causal=True)
        grads[name] = torch.autograd.grad(out, bias, d_out.to(out.dtype))[0]
    assert grads["fast"].shape == bias_shape and grads["fast"].dtype == dtype
    assert (grads["fast"][..., 3, :] == 0).all() and (grads["fast"][..., 20, 7] == 0).all()
    testing.check_against_oracle(grads["fast"], grads["naive"], grads["oracle"], factor=3.0,
                                 what=f"triton dbias {bias_shape} {dtype}")


@interpreted
def test_strided_inputs():
    check_case((2, 2, 1, 30, 41, 32, 32), "causal", F16, seed=3, transpose=True)


@interpreted
def test_forward_only_without_grad():
    check_case((1, 2, 2, 23, 23, 16, 16), "window", BF16, seed=4, grads=False)


@interpreted
def test_gradient_through_lse():
    """A loss that uses the log-sum-exp too (as z-loss or merging does): dlse flows into dS = P·(dP − delta + dlse)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g, dtype=torch.float32) for n in (21, 29, 29))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = selfattn.attention(q, k, v, causal=True, backend="triton", return_lse=True)
    w = torch.randn(lse.shape, generator=g)
    got = torch.autograd.grad((out.sum(-1) + w * lse).sum(), (q, k, v))
    q_r, k_r, v_r = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_r, lse_r = reference.attention(q_r, k_r, v_r, causal=True, return_lse=True)
    ref = torch.autograd.grad((out_r.sum(-1) + w.double() * lse_r).sum(), (q_r, k_r, v_r))
    for name, a, r in zip("qkv", got, ref, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


@interpreted
def test_block_positions():
    """q_pos0 / k_pos0 (one block of a larger problem, as ring attention calls it) move the causal diagonal."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (20, 30, 30))
    whole = selfattn.api.make_call(q, k, v, causal=True)
    for q_pos0, k_pos0 in ((40, 25), (0, 5), (10, 10)):
        call = dataclasses.replace(whole, q_pos0=q_pos0, k_pos0=k_pos0)
        out, lse = backends.get("triton").forward(call)
        out_r, lse_r = reference.attention(q.double(), k.double(), v.double(), causal=True, return_lse=True,
                                           q_pos0=q_pos0, k_pos0=k_pos0)
        torch.testing.assert_close(out.double(), out_r, rtol=1e-5, atol=1e-5)
        dead = torch.isneginf(lse_r)
        assert torch.equal(torch.isneginf(lse), dead)
        torch.testing.assert_close(lse[~dead].double(), lse_r[~dead], rtol=1e-5, atol=1e-5)


@interpreted
def test_two_runs_are_bitwise_equal():
    """No atomics: forward and every gradient repeat bit for bit."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 4, 45, 32, generator=g, dtype=torch.bfloat16) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA: dK/dV sum over two query heads

    def run():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = selfattn.attention(qq, kk, vv, causal=True, backend="triton")
        return (out, *torch.autograd.grad(out, (qq, kk, vv), torch.ones_like(out)))

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


@interpreted
def test_never_chosen_automatically_for_cpu_tensors():
    q = torch.randn(1, 1, 8, 16)
    call = selfattn.api.make_call(q, q, q)
    assert backends.choose(call).name != "triton"
    assert backends.choose(call, "triton").name == "triton"  # named, it runs under the interpreter


@interpreted
@pytest.mark.parametrize("kw, words", [
    (dict(mask=masks.Mask(lambda b, h, q, k: (q - k) % 3 != 1)), "custom mask_mod"),
    (dict(mask=masks.causal() | masks.key_padding(torch.tensor([3]))), "| of masks"),
    (dict(mask=torch.ones(8, 8, dtype=torch.bool)), "dense bool mask tensor"),
    (dict(mask=masks.key_padding(torch.tensor([3, 4]))), "key_padding(lengths) has 2 entries, the call has B = 1"),
], ids=["custom", "or", "tensor", "bad-lengths"])
def test_refusals_say_why(kw, words):
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        selfattn.attention(q, q, q, backend="triton", **kw)


@interpreted
@pytest.mark.parametrize("kind", ["none", "causal", "window", "document", "causal+left-padding"])
def test_blocks_merged_by_lse_equal_the_whole(kind):
    """forward_block / backward_block (what ring attention and split-KV decoding call): split the keys in three,
    merge the blocks by lse; the block backward with the final out and lse adds up to the full gradient."""
    g = torch.Generator().manual_seed(9)
    B, H_q, H_kv, N_q, N_k, D = 2, 4, 2, 37, 101, 16
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H_q, N_q), (H_kv, N_k), (H_kv, N_k)))
    kw = build_mask(kind, B, N_q, N_k, g)
    whole = selfattn.api.make_call(q, k, v, **kw)
    parts = [dataclasses.replace(whole, k=k[:, :, a:b], v=v[:, :, a:b], q_pos0=whole.q_start, k_pos0=a)
             for a, b in ((0, 30), (30, 31), (31, N_k))]
    impl = backends.get("triton")
    outs, lses = zip(*(impl.forward_block(p) for p in parts), strict=True)
    assert all(o.dtype == torch.float32 for o in outs)
    out, lse = backends.merge_by_lse(list(outs), list(lses))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = reference.attention(q64, k64, v64, return_lse=True, **kw)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)
    dead = torch.isneginf(lse_ref)
    torch.testing.assert_close(lse[~dead].double(), lse_ref[~dead], rtol=1e-5, atol=1e-5)
    d_out = torch.randn(out.shape, generator=g)
    blocks = [impl.backward_block(p, out, lse, d_out) for p in parts]
    dq = sum(b[0] for b in blocks)
    dk = torch.cat([b[1] for b in blocks], dim=2)
    dv = torch.cat([b[2] for b in blocks], dim=2)
    grads_ref = torch.autograd.grad(out_ref, (q64, k64, v64), d_out.double())
    for name, a, r in zip("qkv", (dq, dk, dv), grads_ref, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


KINDS = ["none", "causal", "window", "padding", "causal+padding", "document", "document-scattered",
         "window&document&padding", "left-padding", "causal+left-padding", "window&key-range", "bias", "bias+causal"]


@interpreted
@pytest.mark.parametrize("seed", range(int(os.environ.get("SELFATTN_RANDOM_CASES", "8"))))
def test_random_shapes_and_tiles(seed, monkeypatch):
    """Random sizes, masks and tile shapes: the block ranges (skipped / boundary / fully visible) at every alignment."""
    from selfattn.backends import triton_flash

    g = torch.Generator().manual_seed(1000 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=g))]

    tiles = pick([(16, 16), (16, 32), (32, 16), (32, 64), (64, 16)])
    monkeypatch.setattr(triton_flash, "INTERPRETER_BLOCKS", {"fwd": tiles, "dkdv": tiles[::-1], "dq": tiles})
    H_kv, group = pick([1, 2]), pick([1, 2, 3])
    N_q, N_k = (int(torch.randint(1, 90, (), generator=g)) for _ in range(2))
    shape = (pick([1, 2]), H_kv * group, H_kv, N_q, N_k, pick([16, 24, 40]), pick([16, 32]))
    check_case(shape, pick(KINDS), pick([F32, F16]), seed=seed)


VARLEN_CASES = [  # lengths, H_q, H_kv, D, window (None: causal only, 0: not causal), dtype
    ([1, 20, 0, 37], 4, 2, 24, None, F16),  # an empty and a one-token sequence; GQA
    ([30, 17, 5], 2, 2, 16, 9, F32),
]


@interpreted
@pytest.mark.parametrize("lengths, H_q, H_kv, D, window, dtype", VARLEN_CASES, ids=["causal-gqa", "window"])
def test_varlen_attention(lengths, H_q, H_kv, D, window, dtype):
    """Packed sequences (selfattn.varlen_attention, (T, H, D) views) against each sequence attended alone."""
    g = torch.Generator().manual_seed(sum(lengths))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    T = int(cu[-1])
    q, k, v = (torch.randn(T, h, D, generator=g).to(DEVICE, dtype).requires_grad_() for h in (H_q, H_kv, H_kv))
    kw = dict(causal=True) if window is None else dict(causal=True, window=window)
    kw_one = dict(causal=True) if window is None else dict(mask=masks.sliding_window(window))
    out = selfattn.varlen_attention(q, k, v, cu.to(DEVICE), backend="triton", **kw)
    bounds = [(a, b) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True) if b > a]

    def per_sequence(fn, *tensors):  # (T, H, D) pieces -> (1, H, n, D) -> fn -> back to (T, H, D_v)
        return torch.cat([fn(*(t[a:b].transpose(0, 1)[None] for t in tensors), **kw_one)[0].transpose(0, 1)
                          for a, b in bounds])

    q_r, k_r, v_r = (t.detach().double().requires_grad_() for t in (q, k, v))
    q_n, k_n, v_n = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_ref = per_sequence(reference.attention, q_r, k_r, v_r)
    out_naive = per_sequence(testing.naive, q_n, k_n, v_n)
    testing.check_against_oracle(out, out_naive, out_ref, what="triton varlen out")
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad(out, (q, k, v), d_out.to(dtype))
    ref = torch.autograd.grad(out_ref, (q_r, k_r, v_r), d_out)
    naive = torch.autograd.grad(out_naive, (q_n, k_n, v_n), d_out.to(dtype))
    v_q = v_r.detach().repeat_interleave(H_q // H_kv, 1)  # (T, H_q, D)
    dp = max(torch.einsum("ihd,jhd->hij", d_out[a:b], v_q[a:b]).abs().max().item() for a, b in bounds)
    big = max(t.abs().max().item() for t in (q_r, k_r)) * D**-0.5 * dp
    for name, a, r, n in zip("qkv", got, ref, naive, strict=True):  # floor relative to |dP| (see check_case)
        testing.check_against_oracle(a, n, r, factor=3.0, what=f"triton varlen d{name}",
                                     floor=testing.floor_for(dtype, max(big, r.abs().max().item())))


# ------------------------------------------------------------------- score modifiers, sinks and dropout (issue 13)


def build_mod(kind: str, B: int, H_q: int, g: torch.Generator):
    """(make(captures) -> ScoreMod or None, the captured float64 tensors that get gradients)."""
    from selfattn import score_mods as sm

    slopes = sm.alibi_slopes(H_q).double() * 4  # steep: distances matter at these lengths
    if kind == "none":
        return lambda caps: None, []
    if kind == "softcap":
        return lambda caps: sm.softcap(1.5), []
    if kind == "alibi":
        return lambda caps: sm.alibi(caps[0]), [slopes]
    if kind == "alibi-batch":
        return lambda caps: sm.alibi(caps[0]), [torch.rand(B, H_q, generator=g, dtype=torch.float64)]
    if kind == "relative":  # the table has no gradient here (the kernels decline one that needs it)
        table = torch.randn(H_q, 21, generator=g, dtype=torch.float64)
        return lambda caps: sm.relative_bias(table), []
    if kind == "t5":
        table = torch.randn(H_q, 12, generator=g, dtype=torch.float64)
        return lambda caps: sm.relative_bias(table, buckets=12, bidirectional=True, max_distance=30), []
    if kind == "t5-decoder":
        table = torch.randn(H_q, 8, generator=g, dtype=torch.float64)
        return lambda caps: sm.relative_bias(table, buckets=8, bidirectional=False, max_distance=20), []
    if kind == "softcap>>alibi":
        return lambda caps: sm.softcap(2.0) >> sm.alibi(caps[0]), [slopes]
    if kind == "alibi>>softcap":
        return lambda caps: sm.alibi(caps[0]) >> sm.softcap(2.0), [slopes]
    if kind == "relative>>softcap>>alibi":
        table = torch.randn(H_q, 9, generator=g, dtype=torch.float64)
        return lambda caps: sm.relative_bias(table) >> sm.softcap(3.0) >> sm.alibi(caps[0]), [slopes]
    raise ValueError(kind)


def check_mod_case(shape, mod_kind: str, mask_kind: str, dtype: torch.dtype, sinks: bool, dropout: bool, seed: int):
    """Forward (out, lse) and the gradients of q, k, v, the ALiBi slopes and the sinks of backend "triton" with a
    ready-made score modifier, sinks and dropout, against the float64 oracle (2x / 3x the naive error + a floor)."""
    B, H_q, H_kv, N_q, N_k, D = shape
    g = torch.Generator().manual_seed(seed)
    q64, k64, v64 = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64)
                     for h, n in ((H_q, N_q), (H_kv, N_k), (H_kv, N_k)))
    make_mod, caps64 = build_mod(mod_kind, B, H_q, g)
    sinks64 = torch.randn(H_q, generator=g, dtype=torch.float64) if sinks else None
    kw = build_mask(mask_kind, B, N_q, N_k, g)
    kw |= dict(dropout_p=0.3, dropout_seed=seed) if dropout else {}
    d_out = torch.randn(B, H_q, N_q, D, generator=g, dtype=torch.float64)

    def leaves(dt):
        ts = [t.to(DEVICE, dt).requires_grad_() for t in (q64, k64, v64, *caps64)]
        snk = sinks64.to(DEVICE, dt).requires_grad_() if sinks else None
        return ts, snk, ts + ([snk] if sinks else [])

    testing.poison_allocator()
    (q, k, v, *caps), snk, wrt = leaves(dtype)
    out, lse = selfattn.attention(q, k, v, score_mod=make_mod(caps), sinks=snk, backend="triton", return_lse=True,
                                  **kw)
    fast = [out, *torch.autograd.grad(out, wrt, d_out.to(dtype))]
    (qr, kr, vr, *capr), sr, wrt_r = leaves(torch.float64)
    out_r, lse_r = reference.attention(qr, kr, vr, score_mod=make_mod(capr), sinks=sr, return_lse=True, **kw)
    ref = [out_r, *torch.autograd.grad(out_r, wrt_r, d_out)]
    (qn, kn, vn, *capn), sn, wrt_n = leaves(dtype)
    out_n = testing.naive_modded(qn, kn, vn, score_mod=make_mod(capn), sinks=sn, **kw)
    naive = [out_n, *torch.autograd.grad(out_n, wrt_n, d_out.to(dtype))]

    ident = f"{shape} {mod_kind} {mask_kind} {dtype} sinks={sinks} dropout={dropout}"
    dead = torch.isneginf(lse_r)
    assert torch.equal(torch.isneginf(lse), dead), f"{ident}: lse −inf exactly where no key (and no sink) is seen"
    torch.testing.assert_close(lse[~dead].double(), lse_r[~dead], rtol=0, atol=1e-2 if dtype != F32 else 1e-5,
                               msg=lambda m: f"{ident} lse: {m}")
    unseen = (out_r == 0).all(-1)  # rows that see no key: zeros, with or without a sink
    assert (out[unseen] == 0).all(), f"{ident}: rows that see no key must be zeros"
    names = ["out", "dq", "dk", "dv"] + ["dslopes"] * len(caps) + (["dsinks"] if sinks else [])
    # dS = P·(dP − δ) cancels; a slope's gradient sums dS·distance over N_q·N_k scores and a sink's P_sink·δ over
    # N_q rows: the floor is eps at those magnitudes (as in test_score_mods), and P = exp(S − L) carries eps·|L|
    dp = (d_out.abs().sum(-1).max() * v64.abs().max()).item()
    lse_mag = max(1.0, lse_r.detach().nan_to_num(0.0, 0.0, 0.0).abs().max().item())
    for name, a, r, n in zip(names, fast, ref, naive, strict=True):
        assert a.dtype == dtype and a.shape == r.shape, f"{ident} {name}"
        big = r.abs().max().item() * lse_mag
        if name == "dslopes":
            big = max(big, dp * (N_q * N_k) ** 0.5 * (N_q + N_k))
        elif name == "dsinks":
            big = max(big, dp * N_q ** 0.5)
        elif name != "out":
            big = max(big, dp)
        testing.check_against_oracle(a, n, r, factor=2.0 if name == "out" else 3.0, what=f"triton {name} {ident}",
                                     floor=testing.floor_for(dtype, big))


MOD_CASES = [  # (B, H_q, H_kv, N_q, N_k, D), modifier, mask kind, dtype, sinks, dropout
    ((1, 2, 1, 37, 53, 16), "softcap", "causal", F32, False, False),
    ((2, 2, 2, 29, 29, 32), "softcap", "none", BF16, True, False),
    ((2, 2, 1, 45, 37, 16), "softcap", "padding", F16, False, True),  # N_q > N_k; batch 0 sees no key
    ((1, 2, 1, 37, 53, 16), "alibi", "causal", F32, False, False),
    ((2, 2, 2, 23, 41, 32), "alibi", "none", F16, True, True),
    ((2, 4, 2, 30, 30, 16), "alibi", "window", BF16, False, False),
    ((2, 2, 1, 37, 53, 16), "alibi-batch", "causal", F32, True, False),
    ((2, 2, 2, 41, 23, 16), "alibi-batch", "left-padding", F32, False, True),
    ((1, 2, 1, 37, 53, 16), "relative", "causal", F16, False, False),
    ((2, 2, 2, 40, 40, 32), "relative", "none", F32, True, False),
    ((2, 2, 1, 33, 47, 16), "relative", "window&key-range", BF16, False, True),
    ((1, 2, 2, 37, 53, 16), "t5", "none", F32, False, False),
    ((2, 2, 1, 37, 37, 16), "t5-decoder", "causal", F16, True, False),
    ((1, 2, 1, 37, 53, 16), "softcap>>alibi", "causal", F32, True, True),
    ((2, 2, 1, 31, 31, 32), "softcap>>alibi", "document", BF16, False, False),
    ((1, 2, 1, 37, 53, 16), "alibi>>softcap", "none", F32, False, False),
    ((2, 2, 2, 45, 40, 16), "alibi>>softcap", "causal+padding", F16, True, True),
    ((1, 2, 1, 35, 35, 16), "relative>>softcap>>alibi", "causal", F32, True, False),
    ((1, 1, 1, 1, 1, 16), "alibi>>softcap", "causal", F32, True, True),  # N = 1
    ((1, 1, 1, 1, 67, 16), "alibi", "none", F32, True, True),  # a decoding step
    ((2, 2, 1, 37, 53, 16), "none", "causal", F32, True, False),  # sinks alone
    ((2, 2, 1, 37, 53, 16), "none", "padding", BF16, True, True),  # sinks and dropout, a batch element with no key
    ((1, 2, 1, 37, 53, 16), "none", "window", F32, False, True),  # dropout alone
]


@interpreted
@pytest.mark.parametrize("shape, mod_kind, mask_kind, dtype, sinks, dropout", MOD_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{m}-{k}-{str(d)[6:]}" + ("-sinks" if si else "")
                              + ("-dropout" if dr else "") for s, m, k, d, si, dr in MOD_CASES])
def test_score_mods_sinks_dropout_match_the_oracle(shape, mod_kind, mask_kind, dtype, sinks, dropout):
    check_mod_case(shape, mod_kind, mask_kind, dtype, sinks, dropout,
                   seed=zlib.crc32(f"{shape}{mod_kind}{mask_kind}".encode()))


@interpreted
def test_dropout_drops_exactly_the_oracles_weights():
    """V = I makes out = P·keep/(1 − p): its zeros are the dropped weights, which must be score_mods.dropout_keep's
    for the same seed bit for bit (a seed above 2³², negative query positions, GQA); the backward regenerates them."""
    from selfattn import score_mods as sm

    g = torch.Generator().manual_seed(13)
    B, H_q, H_kv, N_q, N_k = 2, 2, 1, 40, 32
    q = (torch.randn(B, H_q, N_q, 16, generator=g) * 0.1).requires_grad_()
    k = (torch.randn(B, H_kv, N_k, 16, generator=g) * 0.1).requires_grad_()
    v = torch.eye(N_k).expand(B, H_kv, N_k, N_k).contiguous().requires_grad_()
    seed, p = 2**40 + 12345, 0.37
    out = selfattn.attention(q, k, v, dropout_p=p, dropout_seed=seed, backend="triton")
    keep = sm.dropout_keep(seed, p, *masks.grid(B, H_q, N_q, N_k, torch.device("cpu"), q_pos0=N_k - N_q))
    assert torch.equal(out != 0, keep), f"{int(((out != 0) != keep).sum())} weights dropped differently"
    out_r = reference.attention(q.double(), k.double(), v.double(), dropout_p=p, dropout_seed=seed)
    torch.testing.assert_close(out.double(), out_r, rtol=1e-5, atol=1e-6)
    d_out = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), d_out)
    q_r, k_r, v_r = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(reference.attention(q_r, k_r, v_r, dropout_p=p, dropout_seed=seed), (q_r, k_r, v_r),
                              d_out.double())
    for name, a, r in zip("qkv", got, ref, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


@interpreted
def test_slope_and_sink_gradients_repeat_bitwise():
    """The slopes' gradient is summed per row in its own slot and then in a fixed order: no atomics."""
    from selfattn import score_mods as sm

    g = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(1, 2, 21, 16, generator=g) for _ in range(3))
    slopes, sinks = torch.rand(2, generator=g), torch.randn(2, generator=g)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, slopes, sinks)]
        out = selfattn.attention(*leaves[:3], causal=True, score_mod=sm.softcap(2.0) >> sm.alibi(leaves[3]),
                                 sinks=leaves[4], dropout_p=0.2, dropout_seed=5, backend="triton")
        return (out, *torch.autograd.grad(out, leaves, torch.ones_like(out)))

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


@interpreted
def test_gradient_through_lse_reaches_the_sinks():
    """L' = logaddexp(L, sink): a loss on the returned lse gives the sinks P_sink·d_lse as well."""
    g = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g).requires_grad_() for n in (21, 29, 29))
    sinks = torch.randn(2, generator=g).requires_grad_()
    out, lse = selfattn.attention(q, k, v, causal=True, sinks=sinks, backend="triton", return_lse=True)
    w = torch.randn(lse.shape, generator=g)
    got = torch.autograd.grad((out.sum(-1) + w * lse).sum(), (q, k, v, sinks))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    out_r, lse_r = reference.attention(*leaves[:3], causal=True, sinks=leaves[3], return_lse=True)
    ref = torch.autograd.grad((out_r.sum(-1) + w.double() * lse_r).sum(), leaves)
    for name, a, r in zip(["q", "k", "v", "sinks"], got, ref, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


@interpreted
def test_custom_score_mod_is_declined_and_auto_picks_tiled():
    from selfattn import score_mods as sm

    q = torch.randn(1, 2, 8, 16)
    gate = sm.ScoreMod(lambda s, b, h, qi, ki: s * 0.5, "half")
    call = selfattn.api.make_call(q, q, q, score_mod=gate)
    with pytest.raises(ValueError, match="score_mod 'half' is a custom function"):
        selfattn.attention(q, q, q, score_mod=gate, backend="triton")
    assert backends.choose(call).name == "tiled"
    out = selfattn.attention(q, q, q, score_mod=gate)
    torch.testing.assert_close(out.double(), reference.attention(q.double(), q.double(), q.double(), score_mod=gate),
                               rtol=1e-5, atol=1e-6)
