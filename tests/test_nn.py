"""Attention modules: the textbook's named matrices, shapes, gradients, GQA, rotary positions, weights."""

import pytest
import torch

import selfattn
from selfattn import reference
from selfattn.nn import MultiHeadAttention, RotaryEmbedding, SelfAttention


def test_self_attention_is_the_textbook_head():
    layer = SelfAttention(d_in=6, d_k=4, d_v=3, causal=True).double()
    assert {n for n, _ in layer.named_parameters()} == {"W_Q", "W_K", "W_V"}
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    y, w = layer(x, return_weights=True)
    q, k, v = reference.project(x, layer.W_Q, layer.W_K, layer.W_V)
    expected = reference.attention(q[:, None], k[:, None], v[:, None], causal=True)[:, 0]
    torch.testing.assert_close(y, expected)
    assert y.shape == (2, 5, 3) and w.shape == (2, 5, 5)
    torch.testing.assert_close(w @ v, y)


def test_multi_head_attention_matches_a_hand_assembly():
    mha = MultiHeadAttention(d_model=16, n_heads=4, n_kv_heads=2, causal=True).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    q = mha.W_Q(x).view(3, 7, 4, 4).transpose(1, 2)
    k = mha.W_K(x).view(3, 7, 2, 4).transpose(1, 2).repeat_interleave(2, 1)
    v = mha.W_V(x).view(3, 7, 2, 4).transpose(1, 2).repeat_interleave(2, 1)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = mha.W_O(o.transpose(1, 2).reshape(3, 7, 16))
    torch.testing.assert_close(mha(x), expected)


def test_gradients_reach_every_matrix():
    mha = MultiHeadAttention(d_model=12, n_heads=3, rotary=True, causal=True)
    mha(torch.randn(2, 5, 12)).pow(2).sum().backward()
    for name, p in mha.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rotary_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    s1 = (rope(q, torch.tensor([5])) * rope(k, torch.tensor([2]))).sum()
    s2 = (rope(q, torch.tensor([13])) * rope(k, torch.tensor([10]))).sum()
    torch.testing.assert_close(s1, s2)
    with pytest.raises(ValueError, match="even head dim"):
        RotaryEmbedding(7)


def test_weights_on_request():
    mha = MultiHeadAttention(d_model=8, n_heads=2, causal=True)
    y, w = mha(torch.randn(1, 4, 8), return_weights=True)
    assert w.shape == (1, 2, 4, 4) and (w.triu(1) == 0).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=10, n_heads=3), "not divisible by n_heads=3"),
    (dict(d_model=8, n_heads=4, n_kv_heads=3), "multiple of n_kv_heads=3"),
    (dict(d_model=0, n_heads=1), "d_model must be a positive int"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"expects x of shape \(B, N, 8\), got \(4, 8\)"):
        MultiHeadAttention(8, 2)(torch.randn(4, 8))
    with pytest.raises(ValueError, match="SelfAttention"):
        SelfAttention(4, 2)(torch.randn(1, 3, 5))


def test_exported_at_top_level():
    assert selfattn.MultiHeadAttention is MultiHeadAttention and selfattn.SelfAttention is SelfAttention
