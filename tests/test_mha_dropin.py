"""selfattn.nn.MultiheadAttention against torch.nn.MultiheadAttention on the same weights."""

import pytest
import torch

from selfattn.nn import MultiheadAttention

E, H = 24, 4
CONFIGS = {
    "default": {},
    "batch_first": {"batch_first": True},
    "kdim_vdim": {"kdim": 5, "vdim": 7},  # separate q/k/v_proj_weight
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
}


def _modules(cfg):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, **cfg).eval()
    ours = MultiheadAttention(E, H, **cfg).eval()
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    return theirs, ours


def _inputs(cfg, B=3, L=7, S=10):
    q = torch.randn(B, L, E)
    k = torch.randn(B, S, cfg.get("kdim", E))
    v = torch.randn(B, S, cfg.get("vdim", E))
    if not cfg.get("batch_first"):
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (L, N, E)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 6:] = True  # right padding
    kpm[2, :3] = True  # left padding
    attn_mask = torch.rand(L, S) < 0.3
    attn_mask[:, 4] = False  # every query keeps one key, so torch gives no NaN rows
    return q, k, v, {
        "none": {},
        "key_padding_mask": {"key_padding_mask": kpm},
        "bool attn_mask": {"attn_mask": attn_mask},
        "float attn_mask per head + kpm": {"attn_mask": torch.randn(B * H, L, S),
                                           "key_padding_mask": torch.where(kpm, -torch.inf, 0.0)},
        "both bool, weights per head": {"attn_mask": attn_mask, "key_padding_mask": kpm,
                                        "average_attn_weights": False},
        "no weights": {"key_padding_mask": kpm, "need_weights": False},
    }


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_torch_module(name):
    cfg = CONFIGS[name]
    theirs, ours = _modules(cfg)
    q, k, v, cases = _inputs(cfg)
    for case, kwargs in cases.items():
        want, want_w = theirs(q, k, v, **kwargs)
        got, got_w = ours(q, k, v, **kwargs)
        # fixed bounds, why: torch's module and ours are two float32 paths of one computation; nothing third-party to
        # measure: rtol 1e-5 ~ 84 ulps (run on the scalar, AVX2, AVX-512 kernels by make test-portable); a wrong mask,
        # scale or position moves values by > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, c=case: f"{name}/{c}: {m}")
        if want_w is None:
            assert got_w is None, case
        else:
            torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6, msg=lambda m, c=case: f"{name}/{c}: {m}")


def test_self_attention_causal_unbatched_and_gradients():
    theirs, ours = _modules({"batch_first": True})
    x = torch.randn(2, 9, E)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(9)
    want, _ = theirs(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    got, _ = ours(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    # fixed bounds: as in test_matches_torch_module
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got_no_mask, _ = ours(x, x, x, is_causal=True, need_weights=False)  # the hint alone is enough here
    torch.testing.assert_close(got_no_mask, want, rtol=1e-5, atol=1e-6)

    want1, want1_w = theirs(x[0], x[0], x[0])  # unbatched (L, E)
    got1, got1_w = ours(x[0], x[0], x[0])
    torch.testing.assert_close(got1, want1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got1_w, want1_w, rtol=1e-5, atol=1e-6)

    theirs(x, x, x, attn_mask=causal)[0].square().sum().backward()
    ours(x, x, x, attn_mask=causal)[0].square().sum().backward()
    for (n, p_t), p_o in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        # gradients sum over the batch and positions: rtol 1e-4 ~ 840 ulps, same reason as above
        torch.testing.assert_close(p_o.grad, p_t.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"grad {n}: {m}")


def test_errors_name_the_fix():
    mha = MultiheadAttention(E, H, dropout=0.1)
    x = torch.randn(5, 2, E)
    mha.eval()
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 3\)"):
        mha(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(x, x, x, key_padding_mask=torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal=True needs as many queries as keys"):
        mha(x, torch.randn(7, 2, E), torch.randn(7, 2, E), is_causal=True)
    with pytest.raises(TypeError, match="bool .* or float"):
        mha(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="features, expected 24"):
        mha(torch.randn(5, 2, 23), x, x)


def test_dropout_is_honoured_in_training_and_equals_the_oracle():
    """torch's dropout= now drops attention weights in training (the counter-based dropout of selfattn.score_mods):
    with one seed the tiled backend and the oracle agree; in eval mode there is none."""
    x = torch.randn(2, 7, E, dtype=torch.float64)
    mha = MultiheadAttention(E, H, dropout=0.3, batch_first=True, dtype=torch.float64)
    ref = MultiheadAttention(E, H, dropout=0.3, batch_first=True, dtype=torch.float64, backend="reference")
    ref.load_state_dict(mha.state_dict())
    torch.manual_seed(5)
    a = mha(x, x, x, need_weights=False)[0]
    torch.manual_seed(5)
    b = ref(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    mha.eval()
    assert not torch.allclose(a, mha(x, x, x, need_weights=False)[0])
