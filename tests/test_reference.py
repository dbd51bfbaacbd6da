"""The oracle: a hand-worked example, agreement with torch's SDPA in float64, gradcheck, edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from selfattn import masks, reference

E = math.e


def test_hand_worked_example():
    # q = k = I (2x2), v = [[1, 2], [3, 4]], scale 1: row 0 scores [1, 0] -> weights [e/(e+1), 1/(e+1)]
    q = k = torch.eye(2, dtype=torch.float64).view(1, 1, 2, 2)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).view(1, 1, 2, 2)
    out, lse, w = reference.attention(q, k, v, scale=1.0, return_lse=True, return_weights=True)
    a = 0.7310585786300049  # e / (e + 1), by hand
    b = 0.2689414213699951  # 1 / (e + 1)
    torch.testing.assert_close(w[0, 0], torch.tensor([[a, b], [b, a]], dtype=torch.float64), rtol=0, atol=1e-15)
    expected = torch.tensor([[1 * a + 3 * b, 2 * a + 4 * b], [1 * b + 3 * a, 2 * b + 4 * a]], dtype=torch.float64)
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(lse[0, 0], torch.full((2,), 1 + math.log1p(1 / E), dtype=torch.float64))
    # causal: the first token sees only itself, so y_0 = v_0 and lse_0 = its one score
    out_c, lse_c = reference.attention(q, k, v, scale=1.0, causal=True, return_lse=True)
    torch.testing.assert_close(out_c[0, 0, 0], v[0, 0, 0], rtol=0, atol=0)
    assert lse_c[0, 0, 0].item() == 1.0


def test_default_scale_is_one_over_sqrt_d():
    q, k, v = (torch.randn(1, 1, 3, 16, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(reference.attention(q, k, v), reference.attention(q, k, v, scale=0.25))


def test_steps_follow_the_textbook_order():
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    s = reference.steps(q, k, v, causal=True)
    torch.testing.assert_close(s.scores, q @ k.transpose(-2, -1))
    torch.testing.assert_close(s.scaled, s.scores / math.sqrt(8))
    assert torch.isinf(s.masked[0, 0, 0, 1:]).all() and (s.masked[0, 0, 0, 1:] < 0).all()
    torch.testing.assert_close(s.weights.sum(-1), torch.ones(1, 2, 4, dtype=torch.float64))
    torch.testing.assert_close(s.lse, torch.logsumexp(s.masked, -1))
    torch.testing.assert_close(s.out, s.weights @ v)


def test_project_multiplies_by_the_three_matrices():
    x = torch.randn(5, 6, dtype=torch.float64)
    w = [torch.randn(6, 4, dtype=torch.float64) for _ in range(3)]
    q, k, v = reference.project(x, *w)
    torch.testing.assert_close(q[2], x[2] @ w[0])
    torch.testing.assert_close(v[4], x[4] @ w[2])


def bottom_right(N_q, N_k):
    return torch.ones(N_q, N_k, dtype=torch.bool).tril(diagonal=N_k - N_q)


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 2), H_kv=st.integers(1, 3), group=st.integers(1, 3), N_q=st.integers(1, 40),
    N_k=st.integers(1, 40), D=st.integers(1, 24), D_v=st.integers(1, 24), causal=st.booleans(),
    mask_kind=st.sampled_from(["none", "window", "padding", "document", "random"]), seed=st.integers(0, 2**16),
)
def test_agrees_with_torch_sdpa_in_float64(B, H_kv, group, N_q, N_k, D, D_v, causal, mask_kind, seed):
    g = torch.Generator().manual_seed(seed)
    H_q = H_kv * group
    q = torch.randn(B, H_q, N_q, D, dtype=torch.float64, generator=g)
    k = torch.randn(B, H_kv, N_k, D, dtype=torch.float64, generator=g)
    v = torch.randn(B, H_kv, N_k, D_v, dtype=torch.float64, generator=g)
    pos_q = torch.arange(N_q)[:, None] + N_k - N_q  # bottom-right positions, built here independently of masks.py
    pos_k = torch.arange(N_k)[None, :]
    dense = torch.ones(B, 1, N_q, N_k, dtype=torch.bool)
    mask = None
    if mask_kind == "window":
        w = int(torch.randint(1, N_k + 1, (), generator=g))
        mask, dense = masks.sliding_window(w), dense & ((pos_k <= pos_q) & (pos_k > pos_q - w))
    elif mask_kind == "padding":
        lengths = torch.randint(0, N_k + 1, (B,), generator=g)
        mask, dense = masks.key_padding(lengths), dense & (pos_k < lengths.view(B, 1, 1, 1))
    elif mask_kind == "document":
        ids = torch.sort(torch.randint(0, 4, (N_k,), generator=g)).values
        q_ids = torch.where(pos_q >= 0, ids[pos_q.clamp(min=0)], -1)
        mask, dense = masks.document(ids), dense & (q_ids == ids[pos_k])
    elif mask_kind == "random":
        t = torch.rand(B, H_q, N_q, N_k, generator=g) > 0.3
        mask, dense = t, dense & t
    if causal:
        dense = dense & bottom_right(N_q, N_k)
    dense = dense.expand(B, H_q, N_q, N_k)
    ours, lse = reference.attention(q, k, v, causal=causal, mask=mask, return_lse=True)
    live = dense.any(-1)  # torch gives NaN for rows with nothing visible; ours gives zeros
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    assert torch.equal(ours[~live], torch.zeros_like(ours[~live]))
    assert torch.isneginf(lse[~live]).all()
    if live.any():
        rel = (ours[live] - theirs[live]).norm() / theirs[live].norm().clamp(min=1e-300)
        assert rel <= 1e-12, f"relative difference {rel:.2e} > 1e-12"


def test_gradcheck_float64_with_mask_bias_and_gqa():
    q = torch.randn(1, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 7, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 7, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    mask = masks.sliding_window(4)
    assert torch.autograd.gradcheck(lambda *t: reference.attention(*t[:3], bias=t[3], mask=mask, causal=True),
                                    (q, k, v, bias))


def test_fully_masked_rows_are_zero_with_neg_inf_lse():
    q, k, v = (torch.randn(1, 1, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = reference.attention(q, k, v, mask=masks.key_padding(torch.tensor([0])), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_refuses_work_that_does_not_fit():
    q = torch.randn(1, 1, 1 << 20, 1)
    with pytest.raises(reference.TooLargeError, match="tiled backend"):
        reference.attention(q, q, q)
