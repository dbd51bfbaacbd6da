"""The native C++ kernel beyond the registry's oracle matrix (tests/test_backends.py and tests/test_score_mods.py run
it there with every mask, modifier, sinks, dropout and dtype): its own paths (flash-decoding, the serial path of small
calls, shared mask bits, folded GQA heads), dropout bits against the oracle's, gradients of slopes, tables and sinks,
determinism, threads, and an entry point that rejects bad tensors instead of reading out of bounds."""

from __future__ import annotations

import math
import os
import threading

import pytest
import torch

import selfattn
from selfattn import masks, reference, score_mods, testing
from selfattn.backends import native

pytestmark = pytest.mark.skipif(native.extension() is None, reason=f"native kernel: {native.load_error()}")


def _qkv(B, H_q, H_kv, N_q, N_k, D, D_v=None, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H_q, N_q, D, generator=g).requires_grad_(grad)
    k = torch.randn(B, H_kv, N_k, D, generator=g).requires_grad_(grad)
    v = torch.randn(B, H_kv, N_k, D_v or D, generator=g).requires_grad_(grad)
    return q, k, v


def _check(q, k, v, grads=True, **kw):
    """native against the float64 oracle with the 2x / 3x rule (``selfattn.testing.check_backend``)."""
    return testing.check_backend("native", q, k, v, grads=grads, **kw)


@pytest.mark.parametrize("heads", [(9, 3), (32, 8), (8, 1)])
@pytest.mark.parametrize("N_k", [1, 16, 3000, 9000])
def test_decoding_one_query_against_the_oracle(heads, N_k):
    """1..4 queries on long caches take the flash-decoding split (parts merged by lse) or the serial path."""
    for N_q in (1, 4):
        if N_q > N_k:
            continue
        q, k, v = _qkv(1, heads[0], heads[1], N_q, N_k, 64, seed=N_k)
        _check(q, k, v, grads=False, causal=True)


@pytest.mark.parametrize("heads,N_q", [((1, 1), 1), ((2, 1), 1), ((9, 3), 1), ((8, 2), 2), ((7, 1), 1),
                                        ((16, 2), 1), ((9, 1), 1), ((4, 4), 3)])
@pytest.mark.parametrize("D,D_v", [(64, 64), (17, 40), (5, 3), (128, 96)])
def test_few_rows_path_reads_a_cache_view(heads, N_q, D, D_v):
    """1..9 rows per tile (the query heads of a group times N_q): up to 8 take the loops that stream K and V once
    (no BLAS), 9 the GEMMs; odd head dims take the vector tails. K and V are views of a longer cache (rows apart by
    the cache's stride), with soft-capping, ALiBi and dropout on the decode path too."""
    H_q, H_kv = heads
    cache_k, cache_v = (torch.randn(1, H_kv, 700, d, generator=torch.Generator().manual_seed(d)) for d in (D, D_v))
    N_k = 517
    q = torch.randn(1, H_q, N_q, D, generator=torch.Generator().manual_seed(3))
    k, v = cache_k[:, :, :N_k], cache_v[:, :, :N_k]
    _check(q, k, v, grads=False, causal=True)
    _check(q, k, v, grads=False, causal=True, score_mod=score_mods.softcap(5.0) >> score_mods.alibi(
        score_mods.alibi_slopes(H_q)), dropout_p=0.2, dropout_seed=11)


def test_split_and_serial_paths_agree_with_one_pass(monkeypatch):
    q, k, v = _qkv(1, 8, 1, 1, 6000, 64)
    split = selfattn.attention(q, k, v, backend="native")
    monkeypatch.setattr(native, "SPLIT_MIN_KEYS", 10**9)  # no split
    whole = selfattn.attention(q, k, v, backend="native")
    oracle = reference.attention(q.double(), k.double(), v.double())
    naive = testing.naive(q, k, v)
    for got in (split, whole):
        testing.check_against_oracle(got, naive, oracle, what="native decode")


def test_fully_masked_rows_are_zero_with_lse_minus_inf():
    q, k, v = _qkv(2, 4, 2, 37, 300, 24, D_v=20)
    lengths = torch.tensor([0, 200])  # batch 0 sees no key at all
    mask = masks.key_padding(lengths)
    out, lse = selfattn.attention(q, k, v, mask=mask, backend="native", return_lse=True)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()
    # causal with N_q > N_k: the first rows have negative positions and see nothing
    q2, k2, v2 = _qkv(1, 2, 2, 50, 20, 16)
    out2, lse2 = selfattn.attention(q2, k2, v2, causal=True, backend="native", return_lse=True)
    assert (out2[:, :, :30] == 0).all() and torch.isneginf(lse2[:, :, :30]).all()
    _check(q2.requires_grad_(), k2.requires_grad_(), v2.requires_grad_(), causal=True)


@pytest.mark.parametrize("mask", ["window", "documents", "custom", "padding&causal"])
def test_masks_through_block_tables(mask):
    g = torch.Generator().manual_seed(3)
    N = 700
    m = {"window": masks.sliding_window(100),
         "documents": masks.document(torch.sort(torch.randint(0, 5, (N,), generator=g)).values) & masks.causal(),
         "custom": masks.Mask(lambda b, h, q, k: (q - k) % 3 != 1),
         "padding&causal": masks.key_padding(torch.tensor([650, 333])) & masks.causal()}[mask]
    q, k, v = _qkv(2, 4, 2, N, N, 32, grad=True)
    _check(q, k, v, mask=m)


def test_shift_invariant_mask_tiles_share_their_bits():
    call = selfattn.api.make_call(*_qkv(1, 2, 2, 4096, 4096, 16), mask=masks.sliding_window(300))
    plan = native._mask_plan(call, 128, 512)
    partial = int((plan.states == masks.PARTIAL).sum())
    assert partial > 20 and plan.bits.shape[0] <= 8, (partial, tuple(plan.bits.shape))


def test_dropout_drops_the_oracles_weights_bit_for_bit():
    """With V = identity the output is the dropped weights themselves: zeros exactly where dropout_keep is False."""
    B, H, N_q, N_k, p, seed = 1, 3, 40, 64, 0.3, 1234
    q, k, _ = _qkv(B, H, H, N_q, N_k, 16)
    eye = torch.eye(N_k).expand(B, H, N_k, N_k).contiguous()
    w = selfattn.attention(q, k, eye, causal=True, dropout_p=p, dropout_seed=seed, backend="native")
    b, h, qi, ki = masks.grid(B, H, N_q, N_k, q_pos0=N_k - N_q)
    keep = score_mods.dropout_keep(seed, p, b, h, qi, ki) & (ki <= qi)
    assert torch.equal(w != 0, keep.expand_as(w)), int((( w != 0) != keep).sum())
    oracle = torch.where(keep, selfattn.attention_weights(q.double(), k.double(), causal=True) / (1 - p), 0.0)
    naive = testing.naive_modded(q, k, eye, causal=True, dropout_p=p, dropout_seed=seed)
    testing.check_against_oracle(w, naive, oracle, what="native dropped weights")


@pytest.mark.parametrize("seed", [0, 1234, 2**31 - 2, 2**32 - 1, 2**40 + 7, -5])
def test_dropout_halves_are_score_mods_hash_bit_for_bit(seed):
    """The extension makes the per-row and per-key halves itself; they must be score_mods' bits, at any seed and at
    negative and shifted positions (rows before the first key, a block of keys further on)."""
    B, H, q_start, N_q, k_pos0, N_k = 2, 3, -7, 29, 1000, 41
    rows, cols = native.extension().dropout_halves(seed & 0xFFFFFFFF, B, H, q_start, N_q, k_pos0, N_k)
    b, h = torch.arange(B).view(-1, 1, 1), torch.arange(H).view(1, -1, 1)
    qi = torch.arange(q_start, q_start + N_q).view(1, 1, -1)
    assert rows.dtype == cols.dtype == torch.int32 and rows.shape == (B, H, N_q) and cols.shape == (N_k,)
    assert torch.equal(rows, score_mods.dropout_rows(seed, b, h, qi))
    assert torch.equal(cols, score_mods.dropout_cols(seed, torch.arange(k_pos0, k_pos0 + N_k)))


@pytest.mark.parametrize("N_k", [300, 6000])  # 6000 keys for one query: flash-decoding's parts meet the sinks
def test_sinks_join_in_the_kernel_as_add_sinks_does(N_k):
    """The kernel's last step adds each head's sink to the softmax. Against the oracle it is no worse than the
    kernel without sinks followed by score_mods.add_sinks (what it replaces); a row that sees no key gets zeros and
    lse = sink; a sink of -inf changes nothing, bit for bit."""
    N_q = 1 if N_k > 1000 else 37
    q, k, v = _qkv(2, 4, 2, N_q, N_k, 24, D_v=20)
    mask = masks.key_padding(torch.tensor([0, N_k - 9]))  # batch 0 sees no key at all
    sinks = torch.tensor([0.5, -2.0, 3.0, -math.inf])
    out, lse = selfattn.attention(q, k, v, mask=mask, sinks=sinks, backend="native", return_lse=True)
    out0, lse0 = selfattn.attention(q, k, v, mask=mask, backend="native", return_lse=True)
    after, after_lse = score_mods.add_sinks(out0, lse0, sinks)
    oracle, oracle_lse = selfattn.attention(q.double(), k.double(), v.double(), mask=mask, sinks=sinks.double(),
                                            backend="reference", return_lse=True)
    testing.check_against_oracle(out, after, oracle, what="sinks in the kernel (out)")
    testing.check_against_oracle(lse[1], after_lse[1], oracle_lse[1], what="sinks in the kernel (lse)")
    assert (out[0] == 0).all() and torch.equal(lse[0], sinks.view(-1, 1).expand(4, N_q))
    assert torch.equal(out[1, 3], out0[1, 3]) and torch.equal(lse[1, 3], lse0[1, 3])  # the -inf sink
    _check(*(t.requires_grad_() for t in (q, k, v)), mask=mask, sinks=sinks.clamp(min=-30).requires_grad_())


@pytest.mark.parametrize("mod", ["alibi", "alibi-per-batch", "relative", "t5", "softcap>>alibi", "alibi>>softcap",
                                 "softcap30>>alibi"])
def test_modifier_parameters_get_their_gradients(mod):
    """Gradients of q, k, v, the modifier's slopes or table and the sinks, against the float64 oracle with the 3x
    rule (the naive computation in float32 through autograd is the yardstick)."""
    H = 4
    g = torch.Generator().manual_seed(7)
    param = {"alibi": score_mods.alibi_slopes(H), "alibi-per-batch": torch.rand(2, H, generator=g),
             "relative": torch.randn(H, 11, generator=g), "t5": torch.randn(H, 16, generator=g)}.get(
        mod, score_mods.alibi_slopes(H))
    build = {
        "alibi": score_mods.alibi, "alibi-per-batch": score_mods.alibi, "relative": score_mods.relative_bias,
        "t5": lambda t: score_mods.relative_bias(t, buckets=16, bidirectional=False),
        "softcap>>alibi": lambda s: score_mods.softcap(2.0) >> score_mods.alibi(s),
        "alibi>>softcap": lambda s: score_mods.alibi(s) >> score_mods.softcap(2.0),
        # scores well inside the cap: every tile's tanh takes the kernel's polynomial, not SLEEF's
        "softcap30>>alibi": lambda s: score_mods.softcap(30.0) >> score_mods.alibi(s),
    }[mod]
    q, k, v = _qkv(2, H, 2, 45, 130, 16)
    sinks = torch.randn(H, generator=g)
    d_out = torch.randn(2, H, 45, 16, generator=g)

    def grads(dtype, backend):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, param, sinks)]
        a, b, c, prm, snk = leaves
        if backend == "naive":
            out = testing.naive_modded(a, b, c, causal=True, score_mod=build(prm), sinks=snk)
        else:
            out = selfattn.attention(a, b, c, causal=True, score_mod=build(prm), sinks=snk, backend=backend)
        return torch.autograd.grad(out, leaves, d_out.to(dtype))

    got, want, naive = grads(torch.float32, "native"), grads(torch.float64, "reference"), grads(torch.float32, "naive")
    for name, a, r, n in zip(["q", "k", "v", "param", "sinks"], got, want, naive, strict=True):
        # a parameter's gradient sums B·N_q·N_k terms: its floor grows with √terms, as the rounding of such a sum does
        terms = 2 * 45 * 130 if name in ("param", "sinks") else 130
        floor = testing.floor_for(torch.float32, r.abs().max().item()) * math.sqrt(terms)
        testing.check_against_oracle(a, n, r, factor=3.0, what=f"native d{name} ({mod})", floor=floor)


@pytest.mark.parametrize("mod", ["alibi", "alibi-per-batch", "t5>>softcap"])
def test_modifier_table_is_kept_across_decoding_steps_and_follows_edits(mod):
    """Without gradients for its tensors, a modifier's table by distance is made once and reused as a view while a
    cache grows (and made again, larger, when a step leaves its range); editing the slopes or table in place makes
    it again. Every step is checked against the float64 oracle."""
    H, B = 4, 2
    g = torch.Generator().manual_seed(11)
    param = torch.rand(B, H, generator=g) if mod == "alibi-per-batch" else \
        torch.randn(H, 16, generator=g) if mod.startswith("t5") else score_mods.alibi_slopes(H)
    score_mod = score_mods.relative_bias(param, buckets=16, bidirectional=False) >> score_mods.softcap(5.0) \
        if mod.startswith("t5") else score_mods.alibi(param)
    cache_k, cache_v = (torch.randn(B, 2, 400, 32, generator=g) for _ in range(2))
    tables = []
    for N_k in [37, 38, 39, 150, 151, 390]:
        q = torch.randn(B, H, 1, 32, generator=g)
        _check(q, cache_k[:, :, :N_k], cache_v[:, :, :N_k], grads=False, causal=True, score_mod=score_mod)
        tables.append(native._DIST_TABLES[score_mod][2])
    assert tables[0] is tables[1] is tables[2], "consecutive steps inside the table's range made it again"
    assert tables[3] is not tables[2] and tables[3].shape[-1] > tables[2].shape[-1]
    with torch.no_grad():
        param.mul_(1.5)  # an in-place edit: the kept table must not be used
    q = torch.randn(B, H, 1, 32, generator=g)
    _check(q, cache_k[:, :, :390], cache_v[:, :, :390], grads=False, causal=True, score_mod=score_mod)
    assert native._DIST_TABLES[score_mod][2] is not tables[-1]


def test_the_entry_point_reads_dist_through_its_strides():
    """dist may be a view (unit stride along the distances, any head and batch strides), or a wider table that
    starts at its own d_min (what a decoding step passes): the kept table's slices, an expanded batch and the whole
    table give what a contiguous copy of the call's distances gives, forward and backward."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=g) for _ in range(3))
    L = 33 + 33 - 1
    wide = torch.randn(1, 4, L + 50, generator=g)
    exact = wide[..., 20:20 + L].contiguous()  # distances -32 .. 32
    views = {"slice": (wide[..., 20:20 + L], -32), "expanded-batch": (wide[..., 20:20 + L].expand(2, 4, L), -32),
             "whole-table": (wide, -52)}
    ext = native.extension()
    for name, (dist, d_min) in views.items():
        (q_, k_, v_), args = _kernel_args(q, k, v, dist=dist, d_min=d_min, mask_kind=1)
        (_, _, _), args_c = _kernel_args(q, k, v, dist=exact.expand(dist.shape[0], 4, L).contiguous(), d_min=-32,
                                         mask_kind=1)
        out, lse = ext.forward(q_, k_, v_, **args)
        out_c, lse_c = ext.forward(q_, k_, v_, **args_c)
        assert torch.equal(out, out_c) and torch.equal(lse, lse_c), name
        if name == "whole-table":
            continue  # the backward's d dist has the table's length: the autograd path passes the call's own
        d_out = torch.randn(out.shape, generator=g)
        back = {n: a for n, a in args.items() if n not in ("fold", "splits", "sinks")}
        back_c = {n: a for n, a in args_c.items() if n not in ("fold", "splits", "sinks")}
        got = ext.backward(q_, k_, v_, out, d_out, lse, **back)
        want = ext.backward(q_, k_, v_, out, d_out, lse, **back_c)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("mod", ["alibi", "softcap>>alibi"])
def test_a_fixed_table_skips_its_gradient_and_changes_no_other_bits(mod):
    """A modifier whose slopes or table do not require grad (a model's fixed ALiBi) has the kernel skip the table's
    gradient: dq, dk and dv are the same bits as when it is made, and autograd gets no table gradient it would
    throw away; with slopes that require grad it is made (``test_modifier_parameters_get_their_gradients`` checks
    its values)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 4, 40, 16, generator=g) for _ in range(3))
    d_out = torch.randn(2, 4, 40, 16, generator=g)
    slopes = score_mods.alibi_slopes(4)
    score_mod = score_mods.softcap(3.0) >> score_mods.alibi(slopes) if mod != "alibi" else score_mods.alibi(slopes)
    call = selfattn.api.make_call(q, k, v, causal=True, score_mod=score_mod)
    dist = native._dist(call, native.call_modifier(call)[1])
    out, lse = native.forward_f32(call, q, k, v, dist)
    with_grad = native.backward_f32(call, q, k, v, dist, out, lse, d_out, dist_grad=True)
    without = native.backward_f32(call, q, k, v, dist, out, lse, d_out, dist_grad=False)
    assert with_grad[3] is not None and with_grad[3].abs().sum() > 0 and without[3] is None
    for name, a, b in zip("qkv", with_grad[:3], without[:3], strict=True):
        assert torch.equal(a, b), f"d{name} changed when the table's gradient was skipped"
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(selfattn.attention(*leaves, causal=True, score_mod=score_mod, backend="native"),
                              leaves, d_out)
    for name, a, b in zip("qkv", got, with_grad[:3], strict=True):
        assert torch.equal(a, b), f"d{name} through autograd"


def test_soft_cap_tanh_against_float64():
    """The kernel's tanh, vector by vector: its polynomial (every lane |x| <= 0.75) within 1 ulp of float64's tanh
    (the fit's bound is 0.84 ulp: IEEE arithmetic, the same on every CPU), SLEEF's fallback within its documented 3.5
    ulp; a vector with one lane beyond the range falls back whole; NaN stays NaN, ±inf gives ±1."""
    g = torch.Generator().manual_seed(3)
    inside = torch.cat([torch.linspace(-0.75, 0.75, 200_001), torch.rand(100_000, generator=g) * 1.5 - 0.75,
                        torch.logspace(-38, 0, 4_000) * 0.75])
    beyond = torch.cat([torch.randn(100_000, generator=g) * 4, torch.linspace(-12, 12, 50_001)])
    mixed = inside[: 64 * 1000].clone().view(-1, 64)
    mixed[:, 5] = torch.linspace(0.76, 40, mixed.shape[0])  # one lane beyond in every vector
    for x, ulps in [(inside, 1.0), (beyond, 3.5), (mixed.flatten(), 3.5)]:
        got = native.extension()._tanh(x).double()
        want = torch.tanh(x.double())
        ulp = torch.nextafter(want.abs().float(), torch.tensor(math.inf)).double() - want.abs().float().double()
        worst = ((got - want).abs() / ulp).max().item()
        assert worst <= ulps, f"tanh {worst:.2f} ulp > {ulps} over {x.numel()} values in [{x.min()}, {x.max()}]"
    special = native.extension()._tanh(torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0] + [0.1] * 11))
    assert special[0].isnan() and special[1] == 1 and special[2] == -1 and special[3] == 0 and special[4] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: oneDNN's per-thread kernels, if any
def test_same_result_run_to_run_and_from_several_threads(dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in _qkv(1, 8, 2, 600, 900, 32))
    kw = dict(causal=True, dropout_p=0.1, dropout_seed=5, score_mod=score_mods.softcap(20.0))

    def run():
        out = selfattn.attention(q, k, v, backend="native", **kw)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    first = run()
    assert all(torch.equal(a, b) for a, b in zip(first, run(), strict=True)), "a rerun differs"
    results = [None] * 4

    def worker(i):
        results[i] = run()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert all(torch.equal(a, b) for a, b in zip(first, r, strict=True)), "a call from another thread differs"


def test_half_precision_in_and_out():
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = (t.to(dtype).requires_grad_() for t in _qkv(1, 4, 2, 100, 150, 32))
        out = selfattn.attention(q, k, v, causal=True, backend="native")
        assert out.dtype == dtype
        dq, = torch.autograd.grad(out.float().sum(), (q,))
        assert dq.dtype == dtype and torch.isfinite(dq).all()
        oracle = reference.attention(q.double(), k.double(), v.double(), causal=True)
        naive = testing.naive(q.detach(), k.detach(), v.detach(), causal=True)
        testing.check_against_oracle(out, naive, oracle, what=f"native {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(9, 3, 1, 517, 64, 64), (8, 2, 70, 300, 17, 40), (4, 4, 3, 1100, 128, 33)])
def test_half_forward_converts_tile_by_tile(dtype, shape):
    """Without gradients the forward reads bf16 / fp16 K and V itself, one tile at a time (decoding, the GEMM path,
    odd head dims that leave a conversion tail), here from views of a longer cache; against the oracle with the
    rule, the naive computation done in the same half dtype."""
    H_q, H_kv, N_q, N_k, D, D_v = shape
    g = torch.Generator().manual_seed(N_k)
    cache_k = torch.randn(1, H_kv, N_k + 50, D, generator=g).to(dtype)
    cache_v = torch.randn(1, H_kv, N_k + 50, D_v, generator=g).to(dtype)
    q = torch.randn(1, H_q, N_q, D, generator=g).to(dtype)
    k, v = cache_k[:, :, 25:25 + N_k], cache_v[:, :, 25:25 + N_k]
    with torch.no_grad():
        out = selfattn.attention(q, k, v, causal=True, backend="native")
    assert out.dtype == dtype
    oracle = reference.attention(q.double(), k.double(), v.double(), causal=True)
    testing.check_against_oracle(out, testing.naive(q, k, v, causal=True), oracle, what=f"native {dtype} forward")


def _kernel_args(q, k, v, **over):
    args = dict(scale=0.125, q_start=0, k_pos0=0, mask_kind=0, BQ=16, BK=64, states=None, bits_at=None, bits=None,
                cap=0.0, dist=None, d_min=0, dist_after_cap=True, bias=None, drop_rows=None, drop_cols=None, drop_T=0,
                drop_scale=1.0, fold=1, splits=1, sinks=None)
    args.update(over)
    return (q, k, v), args


@pytest.mark.parametrize("bad", ["float64", "mixed-half", "transposed-last", "overlapping-rows", "wrong-heads",
                                 "wrong-batch", "bits-shape", "partial-without-bits", "dist-shape", "dist-stride",
                                 "dist-range", "bias-shape",
                                 "drop-rows", "fold", "splits", "state-value", "sinks-shape", "sinks-dtype"])
def test_the_entry_point_rejects_what_it_cannot_read(bad):
    """The extension checks every tensor it is handed; bad ones raise instead of reading out of bounds."""
    q, k, v = (torch.randn(1, 4, 32, 16) for _ in range(3))
    states = torch.full((2, 1), masks.PARTIAL, dtype=torch.int8)
    bits_at = torch.zeros(2, 1, dtype=torch.int32)
    bits = torch.ones(1, 1, 1, 16, 64, dtype=torch.uint8)
    over, tensors = {}, (q, k, v)
    if bad == "float64":
        tensors = (q.double(), k, v)
    elif bad == "mixed-half":
        tensors = (q.bfloat16(), k.half(), v.bfloat16())
    elif bad == "transposed-last":
        tensors = (q, k.transpose(2, 3), v)
    elif bad == "overlapping-rows":
        tensors = (q, torch.randn(600).as_strided((1, 4, 32, 16), (0, 40, 3, 1)), v)
    elif bad == "wrong-heads":
        tensors = (q, torch.randn(1, 3, 32, 16), torch.randn(1, 3, 32, 16))
    elif bad == "wrong-batch":
        tensors = (q, torch.randn(2, 4, 32, 16), v)
    elif bad == "bits-shape":
        over = dict(mask_kind=2, states=states, bits_at=bits_at, bits=bits[..., :32])
    elif bad == "partial-without-bits":
        over = dict(mask_kind=2, states=states, bits_at=torch.full((2, 1), -1, dtype=torch.int32), bits=bits)
    elif bad == "state-value":
        over = dict(mask_kind=2, states=torch.full((2, 1), 7, dtype=torch.int8), bits_at=bits_at, bits=bits)
    elif bad == "dist-shape":
        over = dict(dist=torch.zeros(1, 4, 10), d_min=-31)
    elif bad == "dist-range":  # the call needs distances -31 .. 31: a table of 63 from -30 misses the first
        over = dict(dist=torch.zeros(1, 4, 63), d_min=-30)
    elif bad == "dist-stride":
        over = dict(dist=torch.zeros(1, 4, 63 * 2)[..., ::2], d_min=-31)
    elif bad == "bias-shape":
        over = dict(bias=torch.zeros(1, 4, 32, 31))
    elif bad == "drop-rows":
        over = dict(drop_rows=torch.zeros(3, dtype=torch.int32), drop_cols=torch.zeros(32, dtype=torch.int32),
                    drop_T=5)
    elif bad == "fold":
        over = dict(fold=3)
    elif bad == "splits":
        over = dict(splits=5)
    elif bad == "sinks-shape":
        over = dict(sinks=torch.zeros(3))
    elif bad == "sinks-dtype":
        over = dict(sinks=torch.zeros(4, dtype=torch.float64))
    (q_, k_, v_), args = _kernel_args(*tensors, **over)
    with pytest.raises((ValueError, TypeError)):
        native.extension().forward(q_, k_, v_, **args)


def test_info_says_what_was_built():
    from selfattn import cli

    line = next(x for x in cli.info().splitlines() if x.strip().startswith("native"))
    assert f"built for {native.extension().isa} (CPU capability {torch.backends.cpu.get_cpu_capability()})" in line


def test_bf16_products_where_the_cpu_has_avx512_bf16_isa():
    """The bf16 forward multiplies in bf16 exactly where the CPU has AVX512-BF16 without AMX and the AVX-512 module
    runs (ATEN_CPU_CAPABILITY=avx2 emulates a CPU without it); `selfattn info` says which, with the reason."""
    import pathlib

    from selfattn import cli

    flags = set()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()}
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to say what the CPU has")
    ok, why = native.extension().bf16_dot()
    mkldnn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    onednn_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    onednn_avx512 = onednn_isa == "ALL" or onednn_isa.startswith("AVX512_CORE")  # brgemm's bf16 needs avx512_core
    expected = native.extension().isa == "avx512" and "avx512_bf16" in flags and "amx_bf16" not in flags and \
        onednn_avx512
    if expected and not mkldnn:
        pytest.skip("torch without oneDNN: no brgemm to call")
    assert ok == expected, why
    assert ok or why
    line = next(x for x in cli.info().splitlines() if x.strip().startswith("native"))
    assert ("bf16 products: oneDNN brgemm" in line) == ok and (ok or why in line)


def test_each_built_variant_is_its_own_instruction_set():
    """setup.py compiles one module per instruction set, in parallel; each must be its own build (two variants once
    shared an object file, and the AVX-512 module was the AVX2 code: it did not import and AVX2 ran instead)."""
    import importlib
    import pathlib

    folder = pathlib.Path(native.__file__).parents[1]
    usable = native._ISAS.get(torch.backends.cpu.get_cpu_capability(), ("default",))
    built = [isa for isa in usable if list(folder.glob(f"_native_{isa}.*"))]
    assert built, f"no native module in {folder}"
    for isa in built:
        assert importlib.import_module(f"selfattn._native_{isa}").isa == isa


def test_a_custom_score_mod_goes_to_tiled():
    q, k, v = _qkv(1, 2, 2, 64, 64, 16)
    call = selfattn.api.make_call(q, k, v, score_mod=lambda s, b, h, qi, ki: s * 0.5)
    reasons = native.BACKEND.not_supported_reasons(call)
    assert reasons and "custom score_mod" in reasons[0]
    assert selfattn.backends.choose(call).name == "tiled"
