"""Every registered backend against the float64 oracle (FlashAttention's rule), generated from the registry.

A backend added to the registry is tested here without new test code: each case runs on every backend that says
it can serve the case; a refusal is a skip whose reason `pytest -ra` prints. A backend that declines a case only
because the inputs require grad (flex on the CPU) is checked on the forward.

Backends that compile per call signature (``extra["compiles"]``: flex, tens of seconds a signature on a small CPU)
run the cases of ``COMPILED_CASES`` only: GQA, odd sizes, N_q != N_k both ways, fully masked rows, every mask kind.
"""

import dataclasses
import math
import itertools
import zlib

import pytest
import torch

import selfattn
from selfattn import backends, masks, reference, testing

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
COMPILED_CASES = {
    "B1-H1x1-1x1-D16v16-none-torch.float32", "B2-H4x2-97x97-D40v40-padding-torch.float32",
    "B1-H2x1-64x200-D59v59-causal-torch.float32", "B1-H2x2-130x60-D64v32-causal-torch.float32",
    "B2-H4x2-97x97-D40v40-document-torch.bfloat16", "B1-H2x1-64x200-D59v59-custom-torch.float32",
    "B2-H4x2-97x97-D40v40-bias-torch.float32", "B2-H8x1-1x4503-D32v32-causal-torch.float32",
}


def _compiled_case_or_skip(backend, case_id):
    if backends.get(backend).extra.get("compiles") and case_id not in COMPILED_CASES:
        pytest.skip(f"{backend} compiles per signature: only the cases of COMPILED_CASES run")


def _reasons_forward_only(backend, q, k, v, kw):
    """(reasons, forward_only): a backend that declines only because the inputs require grad is checked on the
    forward."""
    impl = backends.get(backend)
    reasons = impl.not_supported_reasons(selfattn.api.make_call(q, k, v, **kw))
    if reasons:
        detached = [t.detach() for t in (q, k, v)]
        if not impl.not_supported_reasons(selfattn.api.make_call(*detached, **kw)):
            return [], True
    return reasons, False


def make_cases():
    g = torch.Generator().manual_seed(1234)
    shapes = [  # (B, H_q, H_kv, N_q, N_k, D, D_v)
        (1, 1, 1, 1, 1, 16, 16), (2, 4, 2, 97, 97, 40, 40), (1, 2, 1, 64, 200, 59, 59), (1, 2, 2, 130, 60, 64, 32),
        (1, 1, 1, 1025, 1025, 64, 64), (1, 3, 3, 1023, 517, 16, 16),
        # grouped-query prefill by heads (g = 3, B > 1); a decoding step and a few speculative queries against a
        # long cache (folded rows, keys split over the cores, with a tail of keys left over). Not with a bias: a
        # dense random bias over 300 keys is beyond the fused kernel's float32 dQ rule (3.8e-6 against 3.3e-6 allowed
        # on the old and the new code alike; smaller bias cases above pass)
        (2, 6, 2, 300, 300, 32, 32), (2, 8, 1, 1, 4503, 32, 32), (1, 9, 3, 3, 5000, 64, 48),
    ]
    no_bias = shapes[-3:]
    mask_kinds = ["none", "causal", "window", "padding", "document", "custom", "bias"]
    cases = []
    for shape, kind in itertools.product(shapes, mask_kinds):
        B, H_q, H_kv, N_q, N_k, D, D_v = shape
        if N_q * N_k > 300_000 and kind not in ("causal", "window") or (shape in no_bias and kind == "bias"):
            continue
        cases.append(pytest.param(shape, kind, int(torch.randint(0, 2**31, (), generator=g)),
                                  id=f"B{B}-H{H_q}x{H_kv}-{N_q}x{N_k}-D{D}v{D_v}-{kind}"))
    for shape in shapes[:4]:  # kinds added later draw their own seeds: the cases above keep theirs
        B, H_q, H_kv, N_q, N_k, D, D_v = shape
        ident = f"B{B}-H{H_q}x{H_kv}-{N_q}x{N_k}-D{D}v{D_v}-left-padding"
        cases.append(pytest.param(shape, "left-padding", zlib.crc32(ident.encode()), id=ident))
    return cases


def build_mask(kind, B, H_q, N_q, N_k, g):
    if kind == "causal":
        return dict(causal=True)
    if kind == "window":
        return dict(mask=masks.sliding_window(int(torch.randint(1, 64, (), generator=g))))
    if kind == "padding":
        lengths = torch.randint(0, N_k + 1, (B,), generator=g)
        lengths[0] = 0  # a fully masked batch element
        return dict(mask=masks.key_padding(lengths))
    if kind == "left-padding":  # a left-padded prefill (batched generation)
        starts = torch.randint(0, N_k + 1, (B,), generator=g)
        starts[0] = N_k  # a fully masked batch element
        return dict(mask=masks.key_range(starts), causal=True)
    if kind == "document":
        ids = torch.sort(torch.randint(0, 5, (N_k,), generator=g)).values
        return dict(mask=masks.document(ids), causal=True)
    if kind == "custom":
        return dict(mask=masks.Mask(lambda b, h, q, k: (q - k) % 3 != 1))
    if kind == "bias":
        return dict(bias=torch.randn(1, H_q, N_q, N_k, generator=g))
    return {}


@pytest.mark.parametrize("backend", backends.names())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, kind, seed", make_cases())
def test_forward_and_backward_match_the_oracle(backend, dtype, shape, kind, seed):
    B, H_q, H_kv, N_q, N_k, D, D_v = shape
    g = torch.Generator().manual_seed(seed)
    q64 = torch.randn(B, H_q, N_q, D, generator=g, dtype=torch.float64)
    k64 = torch.randn(B, H_kv, N_k, D, generator=g, dtype=torch.float64)
    v64 = torch.randn(B, H_kv, N_k, D_v, generator=g, dtype=torch.float64)
    kw = build_mask(kind, B, H_q, N_q, N_k, g)
    _compiled_case_or_skip(backend, f"B{B}-H{H_q}x{H_kv}-{N_q}x{N_k}-D{D}v{D_v}-{kind}-{dtype}")
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    reasons, forward_only = _reasons_forward_only(backend, q, k, v, kw)
    if reasons:
        pytest.skip(f"{backend} does not serve this case: {'; '.join(reasons)}")
    if forward_only:
        q, k, v = (t.detach() for t in (q, k, v))

    testing.poison_allocator()
    out, lse = selfattn.attention(q, k, v, backend=backend, return_lse=True, **kw)
    q_ref, k_ref, v_ref = (t.detach().double().requires_grad_() for t in (q, k, v))  # the oracle sees the same values
    kw64 = {**kw, "bias": kw["bias"].double()} if "bias" in kw else kw
    out_ref, lse_ref = reference.attention(q_ref, k_ref, v_ref, return_lse=True, **kw64)
    q_n, k_n, v_n = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_naive = testing.naive(q_n, k_n, v_n, **kw)

    assert out.dtype == dtype and out.shape == (B, H_q, N_q, D_v)
    testing.check_against_oracle(out, out_naive, out_ref, what=f"{backend} out")
    dead = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), dead), "lse must be -inf exactly for fully masked rows"
    assert (out[dead] == 0).all(), "fully masked rows must be zeros"
    # lse is float32 at magnitude ~10 (~10 ulps: 1e-5); from half-precision inputs the scores carry their rounding
    # (1e-2)
    torch.testing.assert_close(lse[~dead].double(), lse_ref[~dead], rtol=0, atol=1e-2 if dtype in (
        torch.bfloat16, torch.float16) else 1e-5)

    if backends.get(backend).supports_grad and not forward_only:
        d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad(out, (q, k, v), d_out.to(dtype))
        grads_ref = torch.autograd.grad(out_ref, (q_ref, k_ref, v_ref), d_out)
        grads_naive = torch.autograd.grad(out_naive, (q_n, k_n, v_n), d_out.to(dtype))
        with torch.no_grad():  # the naive gradient's other textbook form (δ from O); the yardstick is the worse
            grads_naive_o = testing.naive_grads_from_out(q.detach(), k.detach(), v.detach(), d_out, **kw)
        with torch.no_grad():  # dS = P·(dP − δ) cancels: floors at the magnitude of the terms summed, not of dS
            weights = reference.steps(q_ref, k_ref, v_ref, **kw64).weights
            floors = testing.grad_floors(q64, k64, v64, d_out, weights, dtype=dtype)
        for name, a, r, n, n_o, floor in zip("qkv", grads, grads_ref, grads_naive, grads_naive_o, floors,
                                             strict=True):
            worse = n if testing.max_error(n, r) >= testing.max_error(n_o, r) else n_o
            floor = max(floor, testing.floor_for(dtype, r.abs().max().item()))
            if dtype == torch.float64:  # the oracle is float64 too: dK, dV sum N_q·group terms in some order, and
                # two orders differ by ~√terms ulps (a grouped fast path sums the group inside one product)
                terms = N_q * (H_q // H_kv)
                floor = max(floor, testing.floor_for(dtype, r.abs().max().item()) * math.sqrt(terms))
            testing.check_against_oracle(a, worse, r, factor=3.0, what=f"{backend} d{name}", floor=floor)


@pytest.mark.parametrize("backend", backends.names())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias_shape", [(2, 1, 130, 270), (1, 4, 130, 270), (130, 270)], ids=str)
def test_bias_gradient(backend, dtype, bias_shape):
    """d(loss)/d(bias) = dS summed over the dimensions the bias broadcasts, with −inf entries and a dead row, on
    every backend that serves a bias that requires grad (3x the naive error)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{bias_shape}{dtype}".encode()))
    q64, k64, v64 = (torch.randn(2, h, n, 32, generator=g, dtype=torch.float64) for h, n in ((4, 130), (2, 270),
                                                                                             (2, 270)))
    b64 = torch.randn(bias_shape, generator=g, dtype=torch.float64)
    b64[..., 5, :] = -math.inf
    b64[b64 > 2.0] = -math.inf
    d_out = torch.randn(2, 4, 130, 32, generator=g, dtype=torch.float64)
    low = [t.to(dtype).requires_grad_() for t in (q64, k64, v64, b64)]
    call = selfattn.api.make_call(*low[:3], bias=low[3], causal=True)
    reasons = backends.get(backend).not_supported_reasons(call)
    if reasons:
        pytest.skip(f"{backend} does not serve this case: {'; '.join(reasons)}")
    testing.poison_allocator()
    fast = torch.autograd.grad(selfattn.attention(*low[:3], bias=low[3], causal=True, backend=backend), low,
                               d_out.to(dtype))
    naive_in = [t.detach().clone().requires_grad_() for t in low]
    naive = torch.autograd.grad(testing.naive(*naive_in[:3], bias=naive_in[3], causal=True), naive_in,
                                d_out.to(dtype))
    ref_in = [t.clone().requires_grad_() for t in (q64, k64, v64, b64)]
    ref = torch.autograd.grad(reference.attention(*ref_in[:3], bias=ref_in[3], causal=True), ref_in, d_out)
    with torch.no_grad():  # the naive gradient's other textbook form (δ from O); the yardstick is the worse
        naive_o = testing.naive_grads_from_out(*low[:3], d_out.to(dtype), bias=low[3], causal=True)
    assert fast[3].shape == bias_shape and fast[3].dtype == dtype
    # dS = P·(dP − δ) cancels: its rounding is relative to |dP| (tests/triton_cases.py), so the floor is eps there
    dp = (d_out @ v64.repeat_interleave(2, 1).transpose(-2, -1)).abs().max().item()
    big = q64.abs().max().item() * k64.abs().max().item() / 32**0.5 * dp
    for name, a, n, n_o, r in zip(["dq", "dk", "dv", "dbias"], fast, naive, (*naive_o, None), ref, strict=True):
        worse = n if n_o is None or testing.max_error(n, r) >= testing.max_error(n_o, r) else n_o
        testing.check_against_oracle(a, worse, r, factor=3.0, what=f"{backend} {name} {bias_shape} {dtype}",
                                     floor=testing.floor_for(dtype, max(big, r.abs().max().item())))


@pytest.mark.parametrize("backend", backends.names())
def test_two_runs_are_bitwise_equal(backend):
    q, k, v = (torch.randn(1, 2, 300, 32) for _ in range(3))
    reasons = backends.get(backend).not_supported_reasons(selfattn.api.make_call(q, k, v, causal=True))
    if reasons:
        pytest.skip(f"{backend} does not serve this case: {'; '.join(reasons)}")
    a = selfattn.attention(q, k, v, causal=True, backend=backend)
    b = selfattn.attention(q, k, v, causal=True, backend=backend)
    assert torch.equal(a, b)


BLOCK_BACKENDS = [n for n in backends.names() if backends.get(n).supports_blocks]


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("kind", ["none", "causal", "window", "left-padding", "document"])
def test_blocks_merged_by_lse_equal_the_whole(backend, kind):
    """Split the keys in three, run each block with its positions, merge by lse; then the block backward with the
    final statistics must add up to the full gradient (what ring attention and split-KV decoding rely on)."""
    g = torch.Generator().manual_seed(7)
    B, H_q, H_kv, N_q, N_k, D = 2, 4, 2, 37, 101, 16
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64)
               for h, n in ((H_q, N_q), (H_kv, N_k), (H_kv, N_k)))
    kw = build_mask(kind, B, H_q, N_q, N_k, g)
    kw.pop("bias", None)
    whole = selfattn.api.make_call(q, k, v, **kw)
    reasons = backends.get(backend).not_supported_reasons(whole)
    if reasons:
        pytest.skip(f"{backend} does not serve this case: {'; '.join(reasons)}")
    bounds = [(0, 30), (30, 31), (31, N_k)]
    parts = [dataclasses.replace(whole, k=k[:, :, a:b], v=v[:, :, a:b], q_pos0=whole.q_start, k_pos0=a)
             for a, b in bounds]
    impl = backends.get(backend)
    outs, lses = zip(*(impl.forward_block(p) for p in parts), strict=True)
    out, lse = backends.merge_by_lse(list(outs), list(lses))
    out_ref, lse_ref = reference.attention(q, k, v, return_lse=True, **kw)
    # float64 on both sides: merging three blocks by lse costs a few float64 ulps on any CPU
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-10, atol=1e-12)

    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    q_r, k_r, v_r = (t.clone().requires_grad_() for t in (q, k, v))
    grads_ref = torch.autograd.grad(reference.attention(q_r, k_r, v_r, **kw), (q_r, k_r, v_r), d_out)
    blocks = [impl.backward_block(p, out, lse, d_out) for p in parts]
    dq = sum(b[0] for b in blocks)
    dk = torch.cat([b[1] for b in blocks], dim=2)
    dv = torch.cat([b[2] for b in blocks], dim=2)
    for name, a, r in zip("qkv", (dq, dk, dv), grads_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11, msg=f"d{name}")


def test_attention_call_init_takes_every_field_and_stays_read_only():
    """AttentionCall has a hand-written __init__ (one dict update: it runs on every call); it must take exactly the
    dataclass's fields, in order, with their defaults, and the call must stay frozen."""
    import dataclasses
    import inspect

    from selfattn.backends import AttentionCall

    fields = dataclasses.fields(AttentionCall)
    params = list(inspect.signature(AttentionCall.__init__).parameters.values())[1:]
    assert [p.name for p in params] == [f.name for f in fields]
    assert all(p.default == (inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
               for p, f in zip(params, fields, strict=True))
    q = torch.zeros(1, 1, 2, 4)
    call = AttentionCall(q, q, q, 0.5)
    assert dataclasses.replace(call, k_pos0=3).k_pos0 == 3 and call.k_pos0 == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        call.scale = 1.0


def test_flex_past_its_compile_limit_raises_rather_than_running_uncompiled(monkeypatch):
    """Past torch.compile's recompile limit FlexAttention ran uncompiled, holding every score (the fuzzer's warnings
    showed it). The flex backend lifts the limit to RECOMPILE_LIMIT and raises BackendError past it; here the limit
    is 1, so of two new signatures the second must raise, whatever this process compiled before."""
    from selfattn.backends import BackendError, flex

    mask = masks.sliding_window(3)  # an object of this test's own: its signatures are new
    shapes = [(1, 1, 5, 8), (1, 1, 7, 8)]
    reasons = backends.get("flex").unavailable_reasons() or backends.get("flex").not_supported_reasons(
        selfattn.api.make_call(*(torch.randn(shapes[0]) for _ in range(3)), mask=mask))
    if reasons:
        pytest.skip(f"flex does not serve this call here: {'; '.join(reasons)}")
    monkeypatch.setattr(flex, "RECOMPILE_LIMIT", 1)
    try:
        selfattn.attention(*(torch.randn(shapes[0]) for _ in range(3)), mask=mask, backend="flex")
    except BackendError:
        pass
    with pytest.raises(BackendError, match="compiled for 1 call signatures"):
        selfattn.attention(*(torch.randn(shapes[1]) for _ in range(3)), mask=mask, backend="flex")
