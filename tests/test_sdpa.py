"""The sdpa backend beyond the registry's matrix: additive modifiers and sinks, dead rows, and what it declines."""

import math

import pytest
import torch

import selfattn
from selfattn import backends, masks, reference, score_mods, testing
from selfattn.backends import sdpa


def _qkv(B=2, H_q=4, H_kv=2, N_q=37, N_k=90, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, D, generator=g) for h, n in ((H_q, N_q), (H_kv, N_k), (H_kv, N_k))]


@pytest.mark.parametrize("mod", ["alibi", "relative", "t5"])
def test_additive_modifiers_as_a_dense_mask_match_the_oracle(mod):
    q, k, v = _qkv()
    score_mod = {"alibi": score_mods.alibi(score_mods.alibi_slopes(4)),
                 "relative": score_mods.relative_bias(torch.randn(4, 2 * 8 + 1)),
                 "t5": score_mods.relative_bias(torch.randn(4, 16), buckets=16, bidirectional=False)}[mod]
    kw = dict(mask=masks.key_padding(torch.tensor([0, 70])) & masks.causal(), score_mod=score_mod)
    out, lse = selfattn.attention(q, k, v, backend="sdpa", return_lse=True, **kw)
    ref, lse_ref = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    testing.check_against_oracle(out, testing.naive_modded(q, k, v, **kw), ref, what=f"sdpa {mod}")
    dead = torch.isneginf(lse_ref)
    assert dead.any() and torch.equal(torch.isneginf(lse), dead) and (out[dead] == 0).all()
    torch.testing.assert_close(lse[~dead].double(), lse_ref[~dead], rtol=0, atol=1e-5)


@pytest.mark.parametrize("groups", ["kernel", "views"])
@pytest.mark.parametrize("case", ["causal", "none", "padding", "alibi", "decode"])
def test_grouped_query_heads_forward_and_backward(groups, case, monkeypatch):
    """Grouped-query calls, with the kernel taking the groups itself (this torch's, ``cpu_kernel_groups``) and with
    the views used where it does not (folded rows, or K and V expanded per batch element), against the float64
    oracle with the 2x / 3x rule."""
    if groups == "kernel" and not sdpa.cpu_kernel_groups():
        pytest.skip("this torch's CPU flash kernel does not take grouped K/V heads")
    if groups == "views":
        monkeypatch.setattr(sdpa, "cpu_kernel_groups", lambda: False)
    backends.choice.MEMO.clear()  # kept runs were made with the other path
    B, H_q, H_kv, N_q, N_k, D = 2, 6, 2, 37, 37, 24
    kw = {"causal": dict(causal=True), "none": {},
          "padding": dict(mask=masks.key_padding(torch.tensor([37, 20]))),
          "alibi": dict(causal=True, score_mod=score_mods.alibi(score_mods.alibi_slopes(H_q))),
          "decode": dict(causal=True)}[case]
    if case == "decode":
        N_q = 1  # one query: it sees every key, no mask
    q, k, v = _qkv(B, H_q, H_kv, N_q, N_k, D, seed=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert not backends.get("sdpa").not_supported_reasons(selfattn.api.make_call(q, k, v, **kw))
    testing.check_backend("sdpa", q, k, v, **kw)
    backends.choice.MEMO.clear()


def test_sinks_forward_and_a_bias_that_hides_a_row():
    q, k, v = _qkv()
    sinks = torch.randn(4)
    bias = torch.randn(1, 4, 37, 90)
    bias[..., 3, :] = -math.inf
    out, lse = selfattn.attention(q, k, v, backend="sdpa", sinks=sinks, bias=bias, return_lse=True)
    ref, lse_ref = reference.attention(q.double(), k.double(), v.double(), sinks=sinks.double(), bias=bias.double(),
                                       return_lse=True)
    testing.check_against_oracle(out, testing.naive_modded(q, k, v, sinks=sinks, bias=bias), ref)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=0, atol=1e-5)
    assert (out[:, :, 3] == 0).all()


@pytest.mark.parametrize("kw, words", [
    (dict(dropout_p=0.1), "no dropout"),
    (dict(score_mod=score_mods.softcap(5.0)), "inside its softmax"),
    (dict(mask=masks.sliding_window(8)), None),  # small: a dense mask, served
])
def test_what_it_declines_says_why(kw, words):
    q, k, v = _qkv()
    reasons = backends.get("sdpa").not_supported_reasons(selfattn.api.make_call(q, k, v, **kw))
    assert (words is None and not reasons) or any(words in r for r in reasons), reasons


def test_large_masks_are_declined_with_the_limit():
    q = torch.randn(1, 1, 4096, 8)
    call = selfattn.api.make_call(q, q, q, mask=masks.sliding_window(64))
    assert any("DENSE_MAX_ELEMENTS" in r for r in backends.get("sdpa").not_supported_reasons(call))
    short = torch.randn(1, 1, 5, 8)
    assert not backends.get("sdpa").not_supported_reasons(selfattn.api.make_call(short, q, q, causal=True))
