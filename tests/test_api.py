"""The public function: every bad input gets a clear error naming the values; edge cases; backend choice."""

import math

import pytest
import torch

import selfattn
from selfattn import backends, masks, score_mods, testing


def qkv(B=1, H_q=2, H_kv=2, N_q=4, N_k=4, D=8, D_v=8, dtype=torch.float32):
    return (torch.randn(B, H_q, N_q, D, dtype=dtype), torch.randn(B, H_kv, N_k, D, dtype=dtype),
            torch.randn(B, H_kv, N_k, D_v, dtype=dtype))


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have 4 dimensions \(B, H, N, D\), got shape \(2, 4, 8\)"):
        selfattn.attention(q[0], k, v)


def test_not_a_tensor_and_integer_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got list"):
        selfattn.attention(q, k.tolist(), v)
    with pytest.raises(TypeError, match="floating-point"):
        selfattn.attention(q, k, v.long())


def test_batch_head_and_dim_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="batch sizes differ: q has B=1, k B=2"):
        selfattn.attention(q, torch.cat([k, k]), v)
    with pytest.raises(ValueError, match="q has D=8, k has D=4"):
        selfattn.attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match=r"k is \(H_kv=2, N_k=4\), v is \(2, 3\)"):
        selfattn.attention(q, k, v[:, :, :3])


def test_gqa_heads_not_a_multiple():
    q, k, v = qkv(H_q=6, H_kv=4)
    with pytest.raises(ValueError, match="got H_q=6 query heads and H_kv=4 .* multiple of H_kv"):
        selfattn.attention(q, k, v)


def test_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="share one dtype, got torch.float32, torch.float64"):
        selfattn.attention(q, k.double(), v)


def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device, got cpu, meta"):
        selfattn.attention(q, k.to("meta"), v)


def test_mask_that_does_not_broadcast():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"mask of shape \(3, 4\) does not broadcast to .* \(1, 2, 4, 4\)"):
        selfattn.attention(q, k, v, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bias="):
        selfattn.attention(q, k, v, mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="bias of shape"):
        selfattn.attention(q, k, v, bias=torch.ones(2, 2, 4, 4))
    with pytest.raises(TypeError, match="mask_mod"):
        selfattn.attention(q, k, v, mask="causal")


@pytest.mark.parametrize("scale, err", [(math.inf, ValueError), (math.nan, ValueError), ("0.1", TypeError)])
def test_bad_scale(scale, err):
    q, k, v = qkv()
    with pytest.raises(err, match="scale"):
        selfattn.attention(q, k, v, scale=scale)


def test_negative_window():
    with pytest.raises(ValueError, match="window=-4"):
        masks.sliding_window(-4)


def test_causal_must_be_bool():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="causal must be True or False"):
        selfattn.attention(q, k, v, causal="yes")


def test_empty_sequences():
    q, k, v = qkv(N_q=0)
    assert selfattn.attention(q, k, v).shape == (1, 2, 0, 8)
    q, k, v = qkv(N_k=0)
    out, lse = selfattn.attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros(1, 2, 4, 8)) and torch.isneginf(lse).all()


def test_inputs_are_untouched_after_an_error():
    q, k, v = qkv()
    before = [t.clone() for t in (q, k, v)]
    with pytest.raises(ValueError):
        selfattn.attention(q, k, v, bias=torch.ones(5, 5))
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v), strict=True))


def test_named_backend_that_cannot_serve_lists_reasons():
    q = torch.randn(1, 1, 1 << 20, 1)
    with pytest.raises(backends.BackendError, match="reference.*cannot serve.*GiB"):
        selfattn.attention(q, q, q, backend="reference")
    with pytest.raises(backends.BackendError, match="unknown backend 'nope'; registered backends"):
        selfattn.attention(*qkv(), backend="nope")


def test_chooser_error_lists_every_backend():
    q = torch.empty(1, 1, 8, 4, device="meta")  # a device no backend runs on
    with pytest.raises(backends.BackendError, match="no backend can serve this call") as info:
        selfattn.attention(q, q, q, mask=masks.Mask(lambda b, h, qi, ki: ki >= 0))
    for name in backends.names():
        assert f"  {name}: " in str(info.value), f"{name} missing from:\n{info.value}"


def test_bottom_right_causal_differs_from_torch_top_left():
    q, k, v = (t.double() for t in qkv(N_q=2, N_k=5))
    ours = selfattn.attention(q, k, v, causal=True)
    top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    bottom_right = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(2, 5, dtype=torch.bool).tril(diagonal=3))
    torch.testing.assert_close(ours, bottom_right, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours, top_left)


def test_attention_weights_rows_sum_to_one():
    q, k, _ = qkv(H_q=4, H_kv=2)
    w = selfattn.attention_weights(q, k, causal=True)
    assert w.shape == (1, 4, 4, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 4))
    assert (w.triu(1) == 0).all()


@pytest.mark.parametrize("backend", [None, *backends.names()])
def test_masks_built_for_other_sizes_say_so(backend):
    q = torch.randn(2, 2, 8, 16)  # N_k = 8, B = 2
    cases = [
        (masks.document(torch.tensor([0, 0, 1, 1, 1])), r"ids for 5 positions but there are N_k = 8 keys"),
        (masks.document(torch.zeros(3, 8, dtype=torch.long)), r"ids for 3 batch elements, the call has B = 2"),
        (masks.key_padding(torch.tensor([8, 9])), r"counts 9 keys as real .* only N_k = 8"),
        (masks.causal() & masks.key_padding(torch.tensor([3, 12])), r"counts 12 keys as real .* only N_k = 8"),
        (masks.key_padding(torch.tensor([4])), r"key_padding\(lengths\) has 1 entries, the call has B = 2"),
    ]
    for mask, message in cases:
        with pytest.raises(ValueError, match=message):
            selfattn.attention(q, q, q, mask=mask, backend=backend)
    fits = masks.document(torch.tensor([0] * 3 + [1] * 5)) & masks.key_padding(torch.tensor([8, 6]))
    if backend in (None, "reference", "tiled"):
        assert selfattn.attention(q, q, q, mask=fits, backend=backend).isfinite().all()


@pytest.mark.parametrize("backend", [None, *backends.names()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_mask_mod_that_returns_numbers_says_so(backend, dtype):
    q = torch.randn(1, 2, 8, 16)

    def numeric(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx).to(dtype)

    for mask in (numeric, masks.Mask(numeric, "numeric"), masks.causal() & numeric):
        call = selfattn.api.make_call(q, q, q, mask=mask)
        reasons = [] if backend is None else backends.get(backend).not_supported_reasons(call)
        if reasons:
            pytest.skip(f"{backend} does not serve this case: {'; '.join(reasons)}")
        with pytest.raises(TypeError, match=rf"returned {dtype}.*must return a bool tensor"):
            selfattn.attention(q, q, q, mask=mask, backend=backend)


# ------------------------------------------------------------------------- repeated calls (Backend.repeat)


@pytest.mark.parametrize("backend", ["native", "sdpa", None])
def test_a_repeated_plain_call_skips_validation_and_gives_the_same_bits(backend, monkeypatch):
    """The second call of a signature (a decoding step) runs the function the backend's ``repeat`` gave for the
    first: no validation, no planning, the same result bit for bit, from other tensors of that signature too."""
    from selfattn import api, backends

    b = backends.get(backend or "native")
    if b.unavailable_reasons():
        pytest.skip(f"{b.name}: {b.unavailable_reasons()}")
    causal = True
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(1, 4, 90, 16, generator=g)
    q = torch.randn(1, 4, 1, 16, generator=g)
    first = selfattn.attention(q, cache[:, :, :40], cache[:, :, 40:80], causal=causal, backend=backend,
                               return_lse=True)
    calls = []
    real = api.make_call
    monkeypatch.setattr(api, "make_call", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    k2, v2 = cache[:, :, 40:80].clone(), cache[:, :, :40].clone()  # other tensors, the same signature
    again = selfattn.attention(q, cache[:, :, :40], cache[:, :, 40:80], causal=causal, backend=backend,
                               return_lse=True)
    other = selfattn.attention(q, k2, v2, causal=causal, backend=backend)
    grown = [selfattn.attention(q, cache[:, :, :n], cache[:, :, 40:40 + n], causal=causal, backend=backend,
                                return_lse=True) for n in (33, 39, 41)]  # a decoding cache: N_k in one bucket
    assert calls == [], "the repeated call was validated again"
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    oracle = selfattn.attention(q.double(), k2.double(), v2.double(), causal=causal, backend="reference")
    testing.check_against_oracle(other, testing.naive(q, k2, v2, causal=causal), oracle)
    monkeypatch.setattr(api, "make_call", real)
    for n, (out, lse) in zip((33, 39, 41), grown, strict=True):  # the whole way gives the same bits
        want = selfattn.attention(q, cache[:, :, :n], cache[:, :, 40:40 + n], causal=causal, backend=backend,
                                  return_lse=True, dropout_p=0.0, dropout_seed=0)  # not plain: not kept
        assert torch.equal(out, want[0]) and torch.equal(lse, want[1]), n
    monkeypatch.setattr(api, "make_call", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    # what the signature does not cover goes the whole way again
    q.requires_grad_()
    selfattn.attention(q, cache[:, :, :40], cache[:, :, 40:80], causal=causal, backend=backend)
    assert calls, "a call with gradients took the kept function"


@pytest.mark.parametrize("backend", ["native", "sdpa"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_a_repeated_training_call_is_kept_apart_and_gives_the_same_gradients(backend, heads, monkeypatch):
    """A call that autograd records is kept under its own signature (a training step's attention): the second one
    skips validation, and its output and the gradients of q, k, v equal, bit for bit, those of the whole way
    (a call that is not plain); a call without gradients of the same shapes is not given the kept function."""
    from selfattn import api, backends

    b = backends.get(backend)
    if b.unavailable_reasons():
        pytest.skip(f"{b.name}: {b.unavailable_reasons()}")
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, 45, 16, generator=g) for h in (heads[0], heads[1], heads[1]))
    d_out = torch.randn(2, heads[0], 45, 16, generator=g)

    def step(**extra):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = selfattn.attention(*leaves, causal=True, backend=backend, **extra)
        return (out, *torch.autograd.grad(out, leaves, d_out))

    step()
    calls = []
    real = api.make_call
    monkeypatch.setattr(api, "make_call", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kept = step()
    assert calls == [], "the repeated training call was validated again"
    whole = step(dropout_p=0.0, dropout_seed=0)  # not plain: the whole way
    for name, a, w in zip(["out", "dq", "dk", "dv"], kept, whole, strict=True):
        assert torch.equal(a, w), name
    calls.clear()
    out = selfattn.attention(q, k, v, causal=True, backend=backend)
    assert calls, "a call without gradients took the training call's function"
    assert out.grad_fn is None and torch.equal(out, kept[0].detach())


def test_a_model_s_modifier_object_is_kept_with_its_decoding_steps(monkeypatch):
    """A ready-made modifier object passed again (a model's ALiBi, a decoding loop) joins the kept signature from
    its second call: later steps skip validation and give the whole way's bits, an in-place edit of its slopes is
    seen, and a modifier made anew per call, or one whose slopes require grad, is never kept."""
    from selfattn import api, backends
    from selfattn.backends import choice

    if backends.get("native").unavailable_reasons():
        pytest.skip("native kernel not built")
    g = torch.Generator().manual_seed(6)
    slopes = score_mods.alibi_slopes(4)
    alibi = score_mods.alibi(slopes)
    cache_k, cache_v = (torch.randn(1, 2, 200, 16, generator=g) for _ in range(2))
    q = torch.randn(1, 4, 1, 16, generator=g)

    def step(n, mod=alibi, **extra):
        return selfattn.attention(q, cache_k[:, :, :n], cache_v[:, :, :n], causal=True, score_mod=mod,
                                  backend="native", return_lse=True, **extra)

    step(100), step(101)  # the first call of the object goes the whole way; the second keeps the signature
    calls = []
    real = api.make_call
    monkeypatch.setattr(api, "make_call", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kept = [step(n) for n in (102, 103, 120)]
    assert calls == [], "a kept modifier's decoding step was validated again"
    for n, (out, lse) in zip((102, 103, 120), kept, strict=True):
        want = step(n, dropout_p=0.0, dropout_seed=0)  # not plain: the whole way
        assert torch.equal(out, want[0]) and torch.equal(lse, want[1]), n
    with torch.no_grad():
        slopes.mul_(2.0)  # edited in place after it was kept
    out = step(121)[0]
    k, v = cache_k[:, :, :121], cache_v[:, :, :121]
    oracle = selfattn.attention(q.double(), k.double(), v.double(), causal=True, score_mod=alibi, backend="reference")
    testing.check_against_oracle(out, testing.naive_modded(q, k, v, causal=True, score_mod=alibi), oracle)
    monkeypatch.setattr(api, "make_call", real)
    def kept_functions():
        return sum(isinstance(key, tuple) and key[:1] == ("repeat",) for key in choice.MEMO)

    before = kept_functions()
    for n in (130, 131, 132):
        step(n, mod=score_mods.alibi(score_mods.alibi_slopes(4)))  # a new object per call
        step(n, mod=score_mods.alibi(score_mods.alibi_slopes(4).requires_grad_()))
    grad_mod = score_mods.alibi(score_mods.alibi_slopes(4).requires_grad_())
    for n in (140, 141, 142):
        step(n, mod=grad_mod)
    assert kept_functions() == before, "modifiers made per call, or with gradients, filled the memo"


def test_a_kept_sdpa_causal_signature_leaves_unaligned_calls_to_the_whole_way():
    """sdpa's kept causal function serves N_q == N_k (torch's top-left flag is selfattn's bottom-right there); a later
    call of the same signature with other N_k in the bucket is not one it serves, and goes the whole way (a dense
    mask) with the right answer."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 20, 8, generator=g)
    cache = torch.randn(1, 2, 30, 8, generator=g)
    selfattn.attention(q, cache[:, :, :20], cache[:, :, :20], causal=True, backend="sdpa")  # kept
    k, v = cache[:, :, :27], cache[:, :, 3:]
    out = selfattn.attention(q, k, v, causal=True, backend="sdpa")
    oracle = selfattn.attention(q.double(), k.double(), v.double(), causal=True, backend="reference")
    testing.check_against_oracle(out, testing.naive(q, k, v, causal=True), oracle)


def test_a_repeated_signature_still_rejects_what_validation_rejects():
    q = k = v = torch.randn(1, 2, 3, 8)
    selfattn.attention(q, k, v, causal=True, scale=1.0)  # kept under causal=True, scale=1.0
    with pytest.raises(TypeError, match="causal must be True or False"):
        selfattn.attention(q, k, v, causal=1, scale=1.0)
    with pytest.raises(TypeError, match="scale must be a float"):
        selfattn.attention(q, k, v, causal=True, scale=True)
    with pytest.raises(TypeError, match="return_lse must be True or False"):
        selfattn.attention(q, k, v, causal=True, scale=1.0, return_lse="yes")
    with pytest.raises(TypeError, match="dropout_p must be a float"):  # not a tensor's ambiguous truth value
        selfattn.attention(q, k, v, causal=True, scale=1.0, dropout_p=torch.zeros(2))


def test_a_kept_call_rejects_k_and_v_of_different_lengths_like_validation():
    q = torch.randn(1, 2, 1, 8)
    selfattn.attention(q, torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8), causal=True)
    with pytest.raises(ValueError, match="k and v must have the same heads and positions"):
        selfattn.attention(q, torch.randn(1, 2, 30, 8), torch.randn(1, 2, 31, 8), causal=True)
    out = selfattn.attention(q, torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8), causal=True)
    assert out.shape == (1, 2, 1, 8) and not out.any()


def test_registry_changes_and_reset_forget_repeated_calls():
    from selfattn.backends import choice

    q = k = v = torch.randn(1, 2, 3, 8)
    selfattn.attention(q, k, v)
    assert any(key[0] == "repeat" for key in choice.MEMO if isinstance(key, tuple) and key and key[0] == "repeat")
    choice.reset()
    assert not any(isinstance(key, tuple) and key and key[0] == "repeat" for key in choice.MEMO)
