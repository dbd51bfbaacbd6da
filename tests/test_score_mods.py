"""Score modifiers, sinks and dropout on every backend that serves them, against the float64 oracle (2x / 3x the
naive same-dtype error), with the gradients of q, k, v, the captured tensors (slopes, tables) and the sinks."""

import itertools
import math
import zlib

import pytest
import torch

import selfattn
from selfattn import backends, reference, score_mods, testing
from selfattn import masks as M

SHAPES = [  # (B, H_q, H_kv, N_q, N_k, D)
    (2, 4, 2, 97, 97, 24), (1, 2, 1, 64, 300, 59), (2, 2, 2, 130, 60, 16), (1, 3, 3, 1, 1, 8),
]
MODS = ["softcap", "alibi", "alibi-batch", "relative", "t5", "custom", "softcap>>alibi"]
MASKS = ["none", "causal", "padding", "window"]


def build_mod(kind, B, H_q, g, dtype):
    """(ScoreMod, [captured tensors that require grad]) in float64, to be cast per test."""
    if kind == "softcap":
        return lambda caps: score_mods.softcap(1.5), []
    if kind == "alibi":
        return lambda caps: score_mods.alibi(caps[0]), [score_mods.alibi_slopes(H_q).double()]
    if kind == "alibi-batch":
        return lambda caps: score_mods.alibi(caps[0]), [torch.rand(B, H_q, generator=g, dtype=torch.float64)]
    if kind == "relative":
        return lambda caps: score_mods.relative_bias(caps[0]), [torch.randn(H_q, 17, generator=g, dtype=torch.float64)]
    if kind == "t5":
        return (lambda caps: score_mods.relative_bias(caps[0], buckets=8, max_distance=40),
                [torch.randn(H_q, 8, generator=g, dtype=torch.float64)])
    if kind == "custom":  # a tanh gate read from a captured per-head tensor
        def make(caps):
            w = caps[0]
            return score_mods.ScoreMod(lambda s, b, h, q, k: s + torch.tanh(s) * w[h].to(s.dtype), "gate",
                                       captures=(w,))
        return make, [torch.randn(H_q, generator=g, dtype=torch.float64)]
    if kind == "softcap>>alibi":
        return (lambda caps: score_mods.softcap(2.0) >> score_mods.alibi(caps[0]),
                [score_mods.alibi_slopes(H_q).double()])
    raise ValueError(kind)


def build_mask(kind, B, N_k, g):
    if kind == "causal":
        return dict(causal=True)
    if kind == "padding":
        lengths = torch.randint(0, N_k + 1, (B,), generator=g)
        lengths[0] = 0  # a fully masked batch element: zeros (plus the sink's share)
        return dict(mask=M.key_padding(lengths))
    if kind == "window":
        return dict(mask=M.sliding_window(int(torch.randint(1, 40, (), generator=g))), causal=True)
    return {}


def cases():
    out = []
    for shape, mod, mask in itertools.product(SHAPES, MODS, MASKS):
        ident = f"{'x'.join(map(str, shape))}-{mod}-{mask}"
        seed = zlib.crc32(ident.encode())
        sinks, dropout = seed % 2 == 0, (seed // 2) % 3 == 0  # a seeded half with sinks, a third with dropout
        out.append(pytest.param(shape, mod, mask, sinks, dropout, seed,
                                id=ident + ("-sinks" if sinks else "") + ("-dropout" if dropout else "")))
    return out


@pytest.mark.parametrize("backend", backends.names())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, mod_kind, mask_kind, with_sinks, with_dropout, seed", cases())
def test_matches_the_oracle(backend, dtype, shape, mod_kind, mask_kind, with_sinks, with_dropout, seed):
    B, H_q, H_kv, N_q, N_k, D = shape
    g = torch.Generator().manual_seed(seed)
    q64, k64, v64 = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64)
                     for h, n in ((H_q, N_q), (H_kv, N_k), (H_kv, N_k)))
    make_mod, caps64 = build_mod(mod_kind, B, H_q, g, dtype)
    sinks64 = torch.randn(H_q, generator=g, dtype=torch.float64) if with_sinks else None
    kw = build_mask(mask_kind, B, N_k, g)
    extra = dict(dropout_p=0.25, dropout_seed=int(seed)) if with_dropout else {}
    d_out = torch.randn(B, H_q, N_q, D, generator=g, dtype=torch.float64)

    def leaves(dt):
        ts = [t.to(dt).requires_grad_() for t in (q64, k64, v64, *caps64)]
        snk = sinks64.to(dt).requires_grad_() if with_sinks else None
        return ts, snk

    (q, k, v, *caps), sinks = leaves(dtype)
    call = selfattn.api.make_call(q, k, v, score_mod=make_mod(caps), sinks=sinks, **kw, **extra)
    reasons = backends.get(backend).not_supported_reasons(call)
    if reasons:
        pytest.skip(f"{backend} does not serve this case: {'; '.join(reasons)}")
    testing.poison_allocator()
    out = selfattn.attention(q, k, v, score_mod=make_mod(caps), sinks=sinks, backend=backend, **kw, **extra)
    wrt = [q, k, v, *caps] + ([sinks] if with_sinks else [])
    fast = [out, *torch.autograd.grad(out, wrt, d_out.to(dtype))]

    (qr, kr, vr, *capr), sr = leaves(torch.float64)
    ref_out = reference.attention(qr, kr, vr, score_mod=make_mod(capr), sinks=sr, **kw, **extra)
    ref = [ref_out, *torch.autograd.grad(ref_out, [qr, kr, vr, *capr] + ([sr] if with_sinks else []), d_out)]

    (qn, kn, vn, *capn), sn = leaves(dtype)
    naive_out = testing.naive_modded(qn, kn, vn, score_mod=make_mod(capn), sinks=sn, **kw, **extra)
    naive = [naive_out, *torch.autograd.grad(naive_out, [qn, kn, vn, *capn] + ([sn] if with_sinks else []),
                                             d_out.to(dtype))]

    names = ["out", "dq", "dk", "dv"] + [f"d{mod_kind}"] * len(caps) + (["dsinks"] if with_sinks else [])
    # dS = P·(dP − δ) cancels, and a capture's gradient sums dS times up to N (ALiBi's distance): the floor is eps
    # relative to those magnitudes (as for the bias gradient in test_backends.py)
    dp = (d_out.abs().sum(-1).max() * v64.abs().max()).item()
    # P = exp(S − L): the rounding of L and S (eps·|L|, large with ALiBi at long distances) enters every result
    lse_mag = max(1.0, reference.attention(q64, k64, v64, score_mod=make_mod(caps64), **kw, return_lse=True)[1]
                  .nan_to_num(0.0, 0.0, 0.0).abs().max().item())
    for name, a, r, n in zip(names, fast, ref, naive, strict=True):
        assert a.dtype == r.to(dtype).dtype and a.shape == r.shape, name
        big = r.abs().max().item() * lse_mag
        if name != "out":
            big = max(big, dp * (N_q * N_k if name.startswith("d") and name not in ("dq", "dk", "dv") else 1)
                      * (N_k if "alibi" in name else 1) ** 0.5)
        testing.check_against_oracle(a, n, r, factor=2.0 if name == "out" else 3.0,
                                     what=f"{backend} {name} {dtype}", floor=testing.floor_for(dtype, big))


def test_dropout_is_the_same_everywhere_and_regenerated():
    """Same seed: tiled and the oracle drop the same weights (exact in float64), a rerun is bitwise equal, and the
    drop rate is p."""
    q, k, v = (torch.randn(2, 2, 300, 16, dtype=torch.float64) for _ in range(3))
    a = selfattn.attention(q, k, v, causal=True, dropout_p=0.3, dropout_seed=11, backend="tiled")
    b = selfattn.attention(q, k, v, causal=True, dropout_p=0.3, dropout_seed=11, backend="tiled")
    r = selfattn.attention(q, k, v, causal=True, dropout_p=0.3, dropout_seed=11, backend="reference")
    assert torch.equal(a, b)
    torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    c = selfattn.attention(q, k, v, causal=True, dropout_p=0.3, dropout_seed=12, backend="tiled")
    assert not torch.allclose(a, c)
    keep = score_mods.dropout_keep(11, 0.3, *M.grid(2, 2, 300, 300))
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    torch.manual_seed(3)
    x = selfattn.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    assert torch.equal(x, selfattn.attention(q, k, v, dropout_p=0.3)), "the default seed follows torch.manual_seed"


@pytest.mark.parametrize("backend", backends.names())
def test_sinks_rows_all_masked_give_zeros_and_the_sink_lse(backend):
    """A row that sees no key gives zeros and lse = its head's sink, on every backend, a sink of -inf included
    (add_sinks once made that row NaN: -inf - -inf)."""
    q, k, v = (torch.randn(1, 3, 5, 8) for _ in range(3))
    sinks = torch.tensor([0.5, -1.0, -math.inf])
    kw = dict(mask=M.key_padding(torch.tensor([0])), sinks=sinks, return_lse=True)
    try:
        out, lse = selfattn.attention(q, k, v, backend=backend, **kw)
    except backends.BackendError as e:
        pytest.skip(f"{backend} does not serve this call: {e}")
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, sinks.view(1, 3, 1).expand(1, 3, 5))


def test_the_weights_and_steps_show_the_new_steps():
    q, k = torch.randn(1, 2, 4, 8, dtype=torch.float64), torch.randn(1, 2, 6, 8, dtype=torch.float64)
    sinks = torch.tensor([0.0, 2.0], dtype=torch.float64)
    w = selfattn.attention_weights(q, k, causal=True, score_mod=score_mods.softcap(1.0), sinks=sinks)
    s = reference.steps(q, k, k, causal=True, score_mod=score_mods.softcap(1.0), sinks=sinks, dropout_p=0.5,
                        dropout_seed=1)
    torch.testing.assert_close(w, s.weights)
    torch.testing.assert_close(w.sum(-1) + s.sink_weight, torch.ones(1, 2, 4, dtype=torch.float64))
    assert s.modified.abs().max() < 1.0
    assert set(torch.unique(s.dropped / s.weights.clamp_min(1e-300)).tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("bad, kw, match", [
    ("shape", dict(score_mod=lambda s, b, h, q, k: s[..., :1, :1].sum()), None),
    ("dtype", dict(score_mod=lambda s, b, h, q, k: s.double()), "cast"),
    ("raises", dict(score_mod=lambda s, b, h, q, k: s + undefined_name), "raised NameError"),  # noqa: F821
    ("returns", dict(score_mod=lambda s, b, h, q, k: 1.0), "not a tensor"),
    ("sink-shape", dict(sinks=torch.zeros(3)), r"shape \(H_q,\) = \(2,\)"),
    ("sink-dtype", dict(sinks=torch.zeros(2, dtype=torch.long)), "floating-point"),
    ("dropout-1", dict(dropout_p=1.0), r"in \[0, 1\)"),
    ("dropout-neg", dict(dropout_p=-0.1), r"in \[0, 1\)"),
])
def test_bad_input_says_what_to_change(bad, kw, match):
    q = k = v = torch.randn(1, 2, 5, 8)
    if bad == "shape":  # a scalar broadcasts: it is a valid (if odd) score; a wrong shape does not
        kw = dict(score_mod=lambda s, b, h, q, k: s[..., :2, :])
        match = "returned shape"
    with pytest.raises((ValueError, TypeError), match=match):
        selfattn.attention(q, k, v, backend="tiled", **kw)


@pytest.mark.parametrize("cap", [math.inf, math.nan, 0.0, -1.0])
def test_softcap_needs_a_finite_positive_cap(cap):
    with pytest.raises(ValueError, match="finite cap > 0"):
        score_mods.softcap(cap)


def test_triton_takes_ready_made_modifiers_sinks_and_dropout_and_declines_a_custom_one():
    """Its capabilities, without running a kernel (tests/triton_cases.py runs them under the interpreter)."""
    q = k = v = torch.randn(1, 2, 5, 8)
    triton = backends.get("triton")
    call = selfattn.api.make_call(q, k, v, score_mod=score_mods.softcap(5.0) >> score_mods.alibi(torch.ones(2)),
                                  sinks=torch.zeros(2), dropout_p=0.1)
    assert triton.call_reasons(call) == []
    custom = selfattn.api.make_call(q, k, v, score_mod=lambda s, b, h, qi, ki: s * 2)
    assert any("is a custom function" in r for r in triton.call_reasons(custom))
    assert backends.choose(custom).name == "tiled"  # on the CPU the chooser takes tiled, which evaluates it


def test_alibi_through_score_mod_equals_alibi_as_a_dense_bias():
    """Fixed slopes take the fused kernel's forward and backward with ALiBi as its additive mask, block by block:
    the same output and gradients as the dense (B, H, N, N) bias, and as the oracle."""
    B, H, N = 2, 4, 700
    q, k, v = (torch.randn(B, H, N, 16, requires_grad=True) for _ in range(3))
    slopes = score_mods.alibi_slopes(H)
    pos = torch.arange(N)
    bias = slopes.view(1, H, 1, 1) * (pos[None, :] - pos[:, None]).float()  # (1, H, N, N)
    for causal in (True, False):
        a = selfattn.attention(q, k, v, causal=causal, score_mod=score_mods.alibi(slopes))
        b = selfattn.attention(q, k, v, causal=causal, bias=bias)
        # ALiBi added per tile vs as a dense bias: two float32 paths of one computation, nothing third-party to measure:
        # rtol 1e-5 ~ 84 ulps (run on the scalar, AVX2, AVX-512 kernels by make test-portable); a wrong mask, scale or
        # position moves values by > 1e-3
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        d = torch.randn_like(a)
        for ga, gb in zip(torch.autograd.grad(a, (q, k, v), d), torch.autograd.grad(b, (q, k, v), d), strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_varlen_and_the_module_options():
    cu = torch.tensor([0, 40, 41, 130])
    q, k, v = (torch.randn(130, 4, 16, dtype=torch.float64) for _ in range(3))
    slopes = score_mods.alibi_slopes(4).double()
    sinks = torch.randn(4, dtype=torch.float64)
    out = selfattn.varlen_attention(q, k, v, cu, causal=True, score_mod=score_mods.alibi(slopes), sinks=sinks)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):  # each sequence on its own
        one = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        want = reference.attention(*one, causal=True, score_mod=score_mods.alibi(slopes), sinks=sinks)
        torch.testing.assert_close(out[a:b], want[0].transpose(0, 1), rtol=1e-10, atol=1e-12)

    mha = selfattn.MultiHeadAttention(32, 4, causal=True, alibi=True, sinks=True, softcap=30.0, dropout=0.1)
    x = torch.randn(2, 9, 32)
    mha(x).sum().backward()
    assert mha.sinks.grad is not None and mha.sinks.grad.abs().sum() > 0
    mha.eval()
    y, w = mha(x, return_weights=True)
    assert y.shape == (2, 9, 32) and w.shape == (2, 4, 9, 9)
    assert "alibi=True" in repr(mha) and "sinks=True" in repr(mha)


def test_split_kv_decoding_sees_true_positions():
    from selfattn import decode

    q = torch.randn(2, 4, 1, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 1500, 16, dtype=torch.float64) for _ in range(2))
    slopes, sinks = torch.rand(2, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    mod = score_mods.softcap(5.0) >> score_mods.alibi(slopes)
    got = decode.split_kv_attention(q, k, v, chunk=256, score_mod=mod, sinks=sinks)
    want = reference.attention(q, k, v, score_mod=mod, sinks=sinks)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_explain_trace_shows_the_new_steps():
    from selfattn.explain import trace

    X = torch.randn(5, 4, dtype=torch.float64)
    W = torch.randn(4, 4, dtype=torch.float64)
    t = trace.trace_vectors(X, W, W, W, causal=True, score_mod=score_mods.softcap(1.0), sink=0.5, dropout_p=0.5,
                            dropout_seed=3)
    names = [s.name for s in t.steps]
    assert names[-7:] == ["scores", "scaled", "modified", "masked", "weights", "sink share", "dropout", "Y"][-7:]
    assert "modified" in names and names.index("scaled") < names.index("modified") < names.index("masked")
    plain = trace.trace_vectors(X, W, W, W, causal=True)
    assert "modified" not in [s.name for s in plain.steps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mod_kind", ["alibi", "alibi-batch", "relative", "t5"])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "window"])
def test_additive_modifiers_as_band_views_over_many_blocks(monkeypatch, dtype, mod_kind, mask_kind):
    """The tiled backend hands an additive modifier under a shift-invariant mask to the fused kernel as strided views
    of one band per head, rows reversed: several query blocks, queries offset from the keys (N_q < N_k), grouped
    heads, forward and the kernel's backward, against the oracle."""
    from selfattn.backends import tiled

    views = []
    band_mask = tiled._band_mask
    monkeypatch.setattr(tiled, "_band_mask", lambda *a: views.append(a[1:5]) or band_mask(*a))
    low = tiled.BAND_BLOCK_Q[0]  # the rows per block at this N_q
    shape = (2, 4, 2, 2 * low + 37, 2 * low + 300, 16)
    test_matches_the_oracle("tiled", dtype, shape, mod_kind, mask_kind, False, False, zlib.crc32(mod_kind.encode()))
    assert len({q0 for q0, *_ in views}) >= 3, f"the band views were not used on every query block: {views}"


def test_dropout_hash_in_int32_has_the_bits_of_the_unsigned_arithmetic():
    """dropout_keep computes its per-score rounds in int32 (wrapping products, masked shifts, a sign flip for the
    comparison): the same decisions as the plain unsigned 32-bit arithmetic, written here in int64."""
    mask32 = 0xFFFFFFFF

    def unsigned(seed, p, b, h, q, k):
        mix = score_mods._mix
        s = mix(seed & mask32)
        row = mix((mix((mix(s ^ b) + h * score_mods._GOLDEN) & mask32) + q * score_mods._GOLDEN) & mask32)
        x = row ^ mix((s + k * score_mods._GOLDEN) & mask32)
        x = ((x >> 16) ^ x) * score_mods._MIX & mask32
        return ((x >> 16) ^ x) >= round(p * 2**32)

    b, h, q, k = M.grid(3, 5, 130, 700, q_pos0=7, k_pos0=2**31 - 300)  # counters past 2³¹ too
    for seed in (0, 1, 2**31 - 2):
        for p in (1e-4, 0.1, 0.5, 0.999):
            keep = score_mods.dropout_keep(seed, p, b, h, q, k)
            assert torch.equal(keep, unsigned(seed, p, b, h, q, k)), (seed, p)
            assert abs(keep.float().mean().item() - (1 - p)) < 0.01, (seed, p, keep.float().mean().item())


@pytest.mark.parametrize("T", [0, 1, 2, 3, 2**31 - 1, 2**31, 2**31 + 1, 429496730, 429496731, 2**32 - 1, 2**32])
def test_dropout_threshold_in_int32_is_the_unsigned_comparison(T):
    """The int32 comparison behind dropout (u >= T for u read as unsigned) at the values around T and the ends."""
    near = [0, 1, 2, 3, T - 2, T - 1, T, T + 1, T + 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1]
    u = torch.tensor(sorted({x for x in near if 0 <= x < 2**32}), dtype=torch.int64)
    got = score_mods._at_least(score_mods._as_int32(u), T)
    assert torch.equal(got, -(u >= T).to(torch.int32)), list(zip(u.tolist(), got.tolist(), strict=True))
