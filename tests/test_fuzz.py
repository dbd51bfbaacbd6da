"""A property-based fuzzer of the public API: every drawn call, on every registered backend that serves it, equals
the float64 oracle by FlashAttention's rule (``selfattn.testing``), forward and backward.

It draws shapes (N = 1, N_q != N_k, odd D, D != D_v, empty sequences), grouped-query ratios, masks and their
and/or combinations (ready-made and custom), a bias, score modifiers (soft-cap, ALiBi, relative and T5 biases, ``>>``
chains, custom functions), sinks, dropout (the same seed for the oracle: every backend drops the same weights),
dtypes, ``return_lse``, requires_grad, packed varlen lengths (zero-length sequences included) and the backend, from
``selfattn.backends.names()``: a backend registered later is fuzzed without a change here; a backend that declines a
call (BackendError) skips that draw.

Two hypothesis profiles, picked by the environment variable SELFATTN_FUZZ:
    ci (default)  a fixed, derandomized set of examples that runs in the suite (about a minute on 2 cores);
    long          many random examples with no deadline: ``make fuzz`` loops it with fresh seeds for FUZZ_SECONDS.
SELFATTN_FUZZ_LOG=path appends one line per case (its outcome and description), which ``make fuzz`` counts.
Every failure the fuzzer found is kept below as a regular test (``test_found_*``).
"""

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import selfattn  # noqa: E402
from selfattn import backends, masks, reference, score_mods, testing, varlen  # noqa: E402

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=70, derandomize=True, deadline=None, suppress_health_check=_SLOW,
                          print_blob=True)
settings.register_profile("long", max_examples=400, deadline=None, suppress_health_check=_SLOW, print_blob=True)
PROFILE = os.environ.get("SELFATTN_FUZZ", "ci")
FUZZ = settings.get_profile(PROFILE)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _log(outcome: str, what: str) -> None:
    path = os.environ.get("SELFATTN_FUZZ_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{outcome}\t{what}\n")


# ------------------------------------------------------------------------------------------------------ strategies


def _ints(draw, n, lo, hi):
    return torch.tensor(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)), dtype=torch.long)


@st.composite
def mask_leaf(draw, B, N_k):
    kind = draw(st.sampled_from(["causal", "window", "padding", "range", "document", "custom"]))
    if kind == "causal":
        return masks.causal()
    if kind == "window":
        return masks.sliding_window(draw(st.integers(1, max(1, N_k + 2))))
    if kind == "padding":
        return masks.key_padding(_ints(draw, B, 0, N_k))
    if kind == "range":
        starts = _ints(draw, B, 0, N_k)
        return masks.key_range(starts, _ints(draw, B, 0, N_k + 2) if draw(st.booleans()) else None)
    if kind == "document":
        ids = _ints(draw, N_k, 0, 3)
        return masks.document(torch.sort(ids).values if draw(st.booleans()) else ids)
    period = draw(st.integers(2, 4))
    return masks.Mask(lambda b, h, q, k: (q - k + h) % period != 1, f"custom%{period}")


@st.composite
def mask_expr(draw, B, N_k):
    m = draw(mask_leaf(B, N_k))
    for _ in range(draw(st.integers(0, 2))):
        other = draw(mask_leaf(B, N_k))
        m = (m & other) if draw(st.booleans()) else (m | other)
    return m


@st.composite
def score_mod_leaf(draw, H_q):
    kind = draw(st.sampled_from(["softcap", "alibi", "relative", "t5", "custom"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if kind == "softcap":
        return score_mods.softcap(draw(st.sampled_from([0.5, 2.0, 30.0])))
    if kind == "alibi":
        return score_mods.alibi(score_mods.alibi_slopes(H_q))
    if kind == "relative":
        M = draw(st.integers(0, 6))
        return score_mods.relative_bias(torch.randn(H_q, 2 * M + 1, generator=g))
    if kind == "t5":
        buckets = draw(st.sampled_from([4, 8, 32]))
        return score_mods.relative_bias(torch.randn(H_q, buckets, generator=g), buckets=buckets,
                                        bidirectional=draw(st.booleans()),
                                        max_distance=draw(st.sampled_from([buckets, 128])))
    return score_mods.ScoreMod(lambda s, b, h, q, k: s * 0.5 + (h - (q - k) % 3).to(s.dtype) * 0.25, "custom")


@st.composite
def score_mod_expr(draw, H_q):
    mod = draw(score_mod_leaf(H_q))
    if draw(st.booleans()):
        mod = mod >> draw(score_mod_leaf(H_q))
    return mod


@st.composite
def attention_case(draw):
    B = draw(st.integers(1, 2))
    H_kv = draw(st.integers(1, 3))
    H_q = H_kv * draw(st.sampled_from([1, 1, 2, 3]))
    N_q = draw(st.one_of(st.just(1), st.integers(1, 48)))
    N_k = draw(st.one_of(st.just(N_q), st.just(1), st.integers(0, 64)))
    D = draw(st.sampled_from([1, 3, 8, 16, 17, 33, 64]))
    D_v = draw(st.one_of(st.just(D), st.sampled_from([1, 5, 16, 40])))
    kw = {}
    if draw(st.booleans()):
        kw["causal"] = True
    if N_k and draw(st.booleans()):
        kw["mask"] = draw(mask_expr(B, N_k))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.integers(0, 3)) == 0:
        shape = (draw(st.sampled_from([1, B])), draw(st.sampled_from([1, H_q])), N_q, N_k)
        kw["bias"] = torch.randn(shape, generator=g)
    if draw(st.integers(0, 2)) == 0:
        kw["score_mod"] = draw(score_mod_expr(H_q))
    if draw(st.integers(0, 3)) == 0:
        kw["sinks"] = torch.randn(H_q, generator=g)
    if draw(st.integers(0, 3)) == 0:
        kw["dropout_p"] = draw(st.sampled_from([0.1, 0.5]))
        kw["dropout_seed"] = draw(st.integers(0, 2**31 - 1))
    if draw(st.booleans()):
        kw["scale"] = draw(st.sampled_from([0.05, 0.3, 1.0]))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "contiguous", "transposed", "strided"]))
    return dict(layout=layout, shape=(B, H_q, H_kv, N_q, N_k, D, D_v), dtype=dtype, kw=kw,
                seed=int(torch.randint(0, 2**31, (), generator=g)), return_lse=draw(st.booleans()),
                grad=draw(st.booleans()), backend=draw(st.sampled_from(backends.names())))


def describe(case) -> str:
    kw = case["kw"]
    parts = [f"shape={case['shape']}", str(case["dtype"]), f"backend={case['backend']}", case.get("layout", "")]
    for name, value in kw.items():
        parts.append(f"{name}={value.shape if isinstance(value, torch.Tensor) else value}")
    return " ".join(parts + [f"grad={case['grad']}", f"lse={case['return_lse']}"])


# ------------------------------------------------------------------------------------------------------ the check


def _lse_bound(dtype, lse_ref):
    """lse is float32 at magnitude |lse|; from half-precision inputs the scores carry their rounding: fixed bounds, as
    in tests/test_backends.py (~10 float32 ulps; 1e-2 for bf16/fp16 scores)."""
    return (1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5) * max(1.0, lse_ref.abs().max().item())


def _out_floor(dtype, v, lse_ref, n_keys: int, dropout_p: float) -> float | None:
    """The output's floor. float64: ``_f64_out_floor``. Otherwise one rounding of the scores: a float32 score is
    rounded at its own magnitude, so the weights carry a relative error of eps·|S| whatever the summation order, and
    the output eps·|S|·|v| (as ``testing.grad_floors`` scales the gradients' floors by max |S|). |S| of the keys that
    carry the weight is read off the oracle's log-sum-exp. Found by make fuzz: scale 1.0, D = 64 (scores ~25), one
    query: tiled 1.81e-6 against 2x a naive error of 4.5e-7 that happened to be small + a floor of 2·eps·|out|."""
    if dtype == torch.float64:
        return _f64_out_floor(dtype, v, n_keys, dropout_p)
    finite = lse_ref[torch.isfinite(lse_ref)]
    s_max = finite.abs().max().item() if finite.numel() else 0.0
    return testing.floor_for(dtype, v.abs().max().item() / (1 - dropout_p)) * max(1.0, s_max) if v.numel() else None


def _f64_out_floor(dtype, v, n_keys: int, dropout_p: float) -> float | None:
    """For float64 inputs the oracle has the same precision, so the naive error is often 0 by coincidence: the floor
    is eps at the terms' magnitude (max |v|, scaled by dropout's 1/(1 − p)) times √(keys summed), as test_backends
    does for float64 gradients. Other dtypes keep check_against_oracle's floor (their naive error dominates)."""
    if dtype != torch.float64 or not v.numel():
        return None
    return testing.floor_for(dtype, v.abs().max().item() / (1 - dropout_p)) * math.sqrt(max(1, n_keys))


def _laid_out(t, layout: str):
    """The same values in another memory layout, differentiably (gradients reach t): (B, N, H, D) transposed to
    (B, H, N, D) as a projection gives it, or every other number of a twice-as-wide head dim (stride 2)."""
    if layout == "transposed":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":
        return torch.stack([t, t], -1).flatten(-2)[..., ::2]
    return t


def check_attention_case(case) -> str:
    """Run one drawn call on its backend and judge it against the oracle; returns "ok" or "declined"."""
    B, H_q, H_kv, N_q, N_k, D, D_v = case["shape"]
    dtype, kw, name = case["dtype"], dict(case["kw"]), case["backend"]
    g = torch.Generator().manual_seed(case["seed"])
    q64 = torch.randn(B, H_q, N_q, D, generator=g, dtype=torch.float64)
    k64 = torch.randn(B, H_kv, N_k, D, generator=g, dtype=torch.float64)
    v64 = torch.randn(B, H_kv, N_k, D_v, generator=g, dtype=torch.float64)
    q, k, v = (t.to(dtype).requires_grad_(case["grad"]) for t in (q64, k64, v64))
    layout = case.get("layout", "contiguous")
    try:
        out, lse = selfattn.attention(*(_laid_out(t, layout) for t in (q, k, v)), backend=name, return_lse=True, **kw)
    except selfattn.BackendError as e:
        _log("declined", f"{describe(case)}: {e}")
        return "declined"
    assert out.shape == (B, H_q, N_q, D_v) and out.dtype == dtype, (out.shape, out.dtype)
    if not case["return_lse"]:
        plain = selfattn.attention(*(_laid_out(t, layout) for t in (q, k, v)), backend=name, **kw)
        assert torch.equal(plain, out), "out without return_lse differs from out with it"
    q_r, k_r, v_r = (t.detach().double().requires_grad_(case["grad"]) for t in (q, k, v))
    out_ref, lse_ref = selfattn.attention(q_r, k_r, v_r, backend="reference", return_lse=True, **kw)
    q_n, k_n, v_n = (t.detach().clone().requires_grad_(case["grad"]) for t in (q, k, v))
    nkw = {n: kw[n] for n in ("scale", "mask", "bias", "causal", "score_mod", "sinks", "dropout_p", "dropout_seed")
           if n in kw}
    if "bias" in nkw:
        nkw["bias"] = nkw["bias"].to(dtype)
    if "sinks" in nkw:
        nkw["sinks"] = nkw["sinks"].to(dtype)
    out_naive = testing.naive_modded(q_n, k_n, v_n, **nkw) if N_k else torch.zeros_like(out)
    what = describe(case)
    testing.check_against_oracle(out, out_naive, out_ref, what=f"out [{what}]",
                                 floor=_out_floor(dtype, v64, lse_ref.detach(), N_k, kw.get("dropout_p", 0.0)))
    dead = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), dead), f"lse must be -inf exactly where the oracle's is [{what}]"
    if (~dead).any():
        err = testing.max_error(lse[~dead], lse_ref[~dead])
        assert err <= _lse_bound(dtype, lse_ref[~dead]), f"lse error {err:.2e} [{what}]"
    if case["grad"] and N_q and N_k:
        d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
        got = torch.autograd.grad(out, (q, k, v), d_out.to(dtype))
        ref = torch.autograd.grad(out_ref, (q_r, k_r, v_r), d_out)
        naive = torch.autograd.grad(out_naive, (q_n, k_n, v_n), d_out.to(dtype))
        with torch.no_grad():
            steps_kw = {n: kw[n] for n in ("scale", "mask", "bias", "causal", "score_mod", "sinks") if n in kw}
            weights = reference.steps(q_r.detach(), k_r.detach(), v_r.detach(), **steps_kw).weights
            floors = testing.grad_floors(q_r, k_r, v_r, d_out, weights, scale=kw.get("scale"), dtype=dtype)
        for n, a, r, nv, floor in zip("qkv", got, ref, naive, floors, strict=True):
            if dtype == torch.float64:  # the oracle is float64 too: sums of N_q·group terms in another order
                floor *= math.sqrt(N_q * (H_q // H_kv))
            testing.check_against_oracle(a, nv, r, factor=3.0, what=f"d{n} [{what}]",
                                         floor=max(floor, testing.floor_for(dtype, r.abs().max().item())))
    _log("ok", what)
    return "ok"


@st.composite
def varlen_case(draw):
    lengths = draw(st.lists(st.integers(0, 24), min_size=1, max_size=5))
    H_kv = draw(st.integers(1, 2))
    H_q = H_kv * draw(st.sampled_from([1, 2]))
    D = draw(st.sampled_from([3, 8, 16]))
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.integers(1, 6))) if causal else None
    return dict(lengths=lengths, H_q=H_q, H_kv=H_kv, D=D, causal=causal, window=window,
                dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**31 - 1)), grad=draw(st.booleans()),
                backend=draw(st.sampled_from(backends.names())))


def check_varlen_case(case) -> str:
    lengths, H_q, H_kv, D, dtype = case["lengths"], case["H_q"], case["H_kv"], case["D"], case["dtype"]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    T = int(cu[-1])
    g = torch.Generator().manual_seed(case["seed"])
    q64, k64, v64 = (torch.randn(T, h, D, generator=g, dtype=torch.float64) for h in (H_q, H_kv, H_kv))
    q, k, v = (t.to(dtype).requires_grad_(case["grad"]) for t in (q64, k64, v64))
    kw = dict(causal=case["causal"], window=case["window"])
    what = f"varlen lengths={lengths} H={H_q}/{H_kv} D={D} {dtype} {kw} backend={case['backend']}"
    try:
        out, lse = selfattn.varlen_attention(q, k, v, cu, backend=case["backend"], return_lse=True, **kw)
    except selfattn.BackendError as e:
        _log("declined", f"{what}: {e}")
        return "declined"
    q_r, k_r, v_r = (t.detach().double().requires_grad_(case["grad"]) for t in (q, k, v))
    out_ref, lse_ref = selfattn.varlen_attention(q_r, k_r, v_r, cu, backend="reference", return_lse=True, **kw)
    assert out.shape == (T, H_q, D) and out.dtype == dtype, what
    mask = varlen.packed_mask(cu, T, causal=case["causal"], window=case["window"])
    q_n, k_n, v_n = (t.detach().clone().requires_grad_(case["grad"]) for t in (q, k, v))
    out_naive = (testing.naive(*(t.transpose(0, 1)[None] for t in (q_n, k_n, v_n)), mask=mask)[0].transpose(0, 1)
                 if T else torch.zeros_like(out))
    testing.check_against_oracle(out, out_naive, out_ref, what=f"out [{what}]",
                                 floor=_f64_out_floor(dtype, v64, max(lengths), 0.0))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)), f"lse's -inf rows [{what}]"
    if case["grad"] and T:
        d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
        got = torch.autograd.grad(out, (q, k, v), d_out.to(dtype))
        ref = torch.autograd.grad(out_ref, (q_r, k_r, v_r), d_out)
        naive = torch.autograd.grad(out_naive, (q_n, k_n, v_n), d_out.to(dtype))
        with torch.no_grad():
            as4 = [t.detach().transpose(0, 1)[None] for t in (q_r, k_r, v_r)]  # (T, H, D) -> (1, H, T, D)
            weights = reference.steps(*as4, mask=mask).weights
            floors = testing.grad_floors(*as4, d_out.transpose(0, 1)[None], weights, dtype=dtype)
        for n, a, r, nv, floor in zip("qkv", got, ref, naive, floors, strict=True):
            if dtype == torch.float64:
                floor *= math.sqrt(T * (H_q // H_kv))
            testing.check_against_oracle(a, nv, r, factor=3.0, what=f"d{n} [{what}]",
                                         floor=max(floor, testing.floor_for(dtype, r.abs().max().item())))
    _log("ok", what)
    return "ok"


# ------------------------------------------------------------------------------------------------------ the tests


@FUZZ
@given(attention_case())
def test_fuzz_attention_matches_the_oracle(case):
    check_attention_case(case)


@FUZZ
@given(varlen_case())
def test_fuzz_varlen_matches_the_oracle(case):
    check_varlen_case(case)


# ------------------------------------------------------------------------------------------ failures it found


def test_found_t5_max_distance_within_the_exact_buckets_is_refused():
    """Found by the fuzzer: relative_bias(table, buckets=32, max_distance=8) divided by log(max_distance / 8) = 0 in
    T5's bucket formula and indexed the table at -2^63 (an IndexError inside the score_mod); now the constructor
    says what max_distance must be."""
    with pytest.raises(ValueError, match="max_distance must be an int above the 8 exact buckets"):
        score_mods.relative_bias(torch.randn(1, 32), buckets=32, max_distance=8)
    with pytest.raises(ValueError, match="above the 16 exact buckets"):
        score_mods.relative_bias(torch.randn(1, 32), buckets=32, bidirectional=False, max_distance=16)
    mod = score_mods.relative_bias(torch.randn(1, 32), buckets=32, max_distance=9)  # just above: every bucket valid
    check_attention_case(dict(shape=(1, 1, 1, 40, 40, 8, 8), dtype=torch.float32, kw=dict(score_mod=mod), seed=3,
                              return_lse=True, grad=True, backend="tiled"))


def test_found_a_strided_head_dim_gave_silently_wrong_results():
    """Found by tests/test_bad_inputs.py: q[..., ::2] (last-dim stride 2) went to PyTorch's fused CPU kernel, which
    read the rows as if dense: errors of O(1), no exception. The tiled backend now makes such rows dense first."""
    for grad in (False, True):
        check_attention_case(dict(layout="strided", shape=(2, 4, 2, 13, 17, 16, 8), dtype=torch.float32,
                                  kw=dict(causal=True), seed=1, return_lse=True, grad=grad, backend="tiled"))


def test_found_float64_output_floor_counts_the_keys():
    """Found by make fuzz: float64, 21 keys, a custom mask, a relative bias and dropout 0.1: the tiled backend was off
    the float64 oracle by 8.9e-16 (4 ulps) where the naive float64 error happened to be 1.1e-16 and the floor
    2·eps·|out|; float64 outputs are now allowed eps at max |v| / (1 − p) times √keys. The table is as hypothesis
    printed it (4 decimals), so the values are near, not equal to, the drawn ones: this keeps the case's shape and
    kinds in the suite; the failure itself was a few ulps and does not replay bit for bit."""
    table = torch.tensor([[-0.4272, -0.6231, 1.4525, 0.5597, 2.4440], [0.4762, 0.0731, 0.0459, -0.0645, -0.2727],
                          [1.3212, -0.6788, 0.6479, 0.0723, 0.3977]])  # the drawn table, as hypothesis printed it
    check_attention_case(dict(layout="contiguous", shape=(1, 3, 3, 1, 21, 3, 16), dtype=torch.float64,
                              kw=dict(mask=masks.Mask(lambda b, h, q, k: (q - k + h) % 3 != 1, "custom%3"),
                                      score_mod=score_mods.relative_bias(table), dropout_p=0.1, dropout_seed=145),
                              seed=1_374_158_357, return_lse=False, grad=False, backend="tiled"))


def test_found_one_key_dv_carries_the_lse_rounding():
    """Found by make fuzz: float32, one key, scale 1.0 (scores ~10): dV = P·dO with P = exp(S − L) recomputed from the
    float32 lse was off by 1.3e-6 (5 ulps of |dO|) against 3x a naive error of 9.7e-8 + floor 6.3e-7; P carries
    eps·|S| from L's rounding, and testing.grad_floors now says so."""
    check_attention_case(dict(layout="contiguous", shape=(1, 2, 2, 1, 1, 16, 40), dtype=torch.float32,
                              kw=dict(scale=1.0), seed=303761048, return_lse=False, grad=True, backend="tiled"))


def test_found_sdpa_misread_a_strided_head_dim():
    """Found by make fuzz: a head dim with stride 2 (q[..., ::2]) reached the kernel below SDPA's public API, which
    reads rows as dense: errors of 0.5–2.3 on (1, 1, 1, 1, 1, 3, 3) with sinks, the same bug tiled had. The sdpa
    backend now makes such rows dense first (base.dense_rows)."""
    for shape, kw in (((1, 1, 1, 1, 1, 3, 3), dict(sinks=torch.tensor([1.5410]))),
                      ((1, 1, 1, 1, 1, 1, 5), dict(bias=torch.tensor([[[[1.5410]]]]), sinks=torch.tensor([-0.2934]))),
                      ((2, 4, 2, 13, 17, 16, 8), dict(causal=True)), ((1, 2, 2, 5, 5, 8, 8), {})):
        check_attention_case(dict(layout="strided", shape=shape, dtype=torch.float32, kw=kw, seed=1_537_364_731,
                                  return_lse=True, grad=False, backend="sdpa"))


def test_found_flex_probe_lost_precision_below_lse_zero():
    """Found by make fuzz: with one key (the naive result is exact) flex's CPU output was 3–7 ulps off, over the
    2·eps floor: its lse probe gave the real keys' weight as 1 − w, which loses e^−L ulps when L < 0. The probe now
    carries a second column that gives 1 − w directly."""
    probe = torch.ones(1, 1, 1, 8)
    reasons = backends.get("flex").not_supported_reasons(selfattn.api.make_call(probe, probe, probe))
    if reasons:
        pytest.skip(f"flex does not run here: {reasons}")
    for lengths, H_q, H_kv, D, seed in (([1], 2, 1, 8, 0), ([1, 1], 4, 2, 3, 233)):
        assert check_varlen_case(dict(lengths=lengths, H_q=H_q, H_kv=H_kv, D=D, causal=False, window=None,
                                      dtype=torch.float32, seed=seed, grad=False, backend="flex")) != "declined"
    # a row whose every score is far below zero (L ≈ −30) is not a masked row
    q, k, v = (torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    bias = torch.full((1, 1, 4, 4), -30.0)
    out, lse = selfattn.attention(q, k, v, bias=bias, backend="flex", return_lse=True)
    out_ref, lse_ref = selfattn.attention(q.double(), k.double(), v.double(), bias=bias.double(), backend="reference",
                                          return_lse=True)
    testing.check_against_oracle(out, testing.naive(q, k, v, bias=bias), out_ref)
    lse_naive = torch.logsumexp((q @ k.transpose(-2, -1)) / math.sqrt(8) + bias, dim=-1)  # float32, textbook
    testing.check_against_oracle(lse, lse_naive, lse_ref, what="lse")


def test_found_flex_compiles_a_chain_of_a_ready_made_and_a_custom_modifier():
    """Found by make fuzz: alibi >> custom has no spec (a custom link), so flex handed FlexAttention the chain's
    tile function, whose ALiBi link indexes the (B, H, 1, 1) grids it is given on tiles: an IndexError inside
    torch.compile. A chain now keeps its links (ScoreMod.parts) and flex rebuilds each one in scalar form."""
    probe = torch.ones(1, 1, 1, 8)
    reasons = backends.get("flex").not_supported_reasons(selfattn.api.make_call(probe, probe, probe))
    if reasons:
        pytest.skip(f"flex does not run here: {reasons}")
    chain = score_mods.alibi(torch.tensor([0.0039])) >> score_mods.ScoreMod(
        lambda s, b, h, q, k: s * 0.5 + (h - (q - k) % 3).to(s.dtype) * 0.25, "custom")
    assert chain.spec is None and len(chain.parts) == 2
    for shape in ((1, 1, 1, 1, 1, 1, 1), (1, 2, 1, 6, 9, 8, 8)):
        H_q = shape[1]
        mod = chain if H_q == 1 else score_mods.alibi(score_mods.alibi_slopes(H_q)) >> chain.parts[1]
        assert check_attention_case(dict(layout="contiguous", shape=shape, dtype=torch.float32,
                                         kw=dict(bias=torch.tensor([[[[1.5410]]]]), score_mod=mod,
                                                 sinks=torch.full((H_q,), -0.2934)),
                                         seed=1_537_364_731, return_lse=False, grad=False, backend="flex")) == "ok"


def test_found_native_exp_u20_pushed_one_key_dv_over_the_rule():
    """Found by make fuzz: with ATen's exp_u20 in the native forward's row pass (torch's own kernel uses it), one
    key, scale 1, ALiBi, a bias and a sink gave dV 6% over 3x the naive error + floor: P = exp(S − lse) in the
    backward inherits the forward's exp rounding through lse. The forward uses SLEEF's 1-ulp exp again."""
    case = dict(layout="contiguous", shape=(1, 1, 1, 1, 1, 16, 16), dtype=torch.float32,
                kw=dict(bias=torch.tensor([[[[1.5410]]]]), score_mod=score_mods.alibi(torch.tensor([0.0039])),
                        sinks=torch.tensor([-0.2934]), scale=1.0),
                seed=1_537_364_731, return_lse=False, grad=True, backend="native")
    if backends.get("native").unavailable_reasons():
        pytest.skip(f"native: {backends.get('native').unavailable_reasons()}")
    assert check_attention_case(case) == "ok"


def test_found_decoding_with_large_scores_needs_the_score_rounding_floor():
    """Found by make fuzz (see _out_floor): one query against 35 keys, scale 1.0 with D = 64, a window and a bias. The
    bias is as hypothesis printed it (4 decimals), so the values are near, not equal to, the drawn ones: the failure
    (7 % over the old floor) does not replay bit for bit; this keeps the case's shape and kinds in the suite."""
    bias = torch.tensor([[[[0.1121, 0.1186, -2.8982, 0.6117, 0.4083, 0.3702, -1.6857, 0.5578, 1.7563, -0.5614,
                            -0.0174, -1.3995, 0.5696, -0.7258, -0.8076, -2.0162, 1.2012, 2.4154, 1.1451, -0.2654,
                            -0.9139, 1.0883, 0.1410, 0.3827, -0.0566, -0.7232, -0.5790, -0.3217, 0.9871, 1.3394,
                            -0.2210, -1.2181, 1.6568, 0.3974, -0.7533]]]])
    assert check_attention_case(dict(layout="contiguous", shape=(1, 4, 2, 1, 35, 64, 64), dtype=torch.float32,
                                     kw=dict(mask=masks.sliding_window(16), bias=bias, scale=1.0),
                                     seed=1_537_171_349, return_lse=False, grad=False, backend="tiled")) == "ok"
