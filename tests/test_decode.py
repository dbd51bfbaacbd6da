"""KV caches and split-KV (flash-decoding) attention, judged against the float64 oracle."""

import math

import pytest
import torch

from selfattn import backends, decode, reference, testing
from selfattn.decode import KVCache, SlidingWindowCache, split_kv_attention
from selfattn.nn import MultiHeadAttention

SPLIT_CASES = [  # (B, H_q, H_kv, N_q, N_k, D, D_v, chunk)
    (1, 4, 4, 1, 1, 16, 16, 512),
    (2, 4, 2, 1, 97, 59, 33, 16),
    (1, 6, 3, 1, 1025, 32, 32, 512),
    (3, 2, 1, 3, 2049, 8, 8, 300),
    (1, 1, 1, 1, 4096, 64, 64, 4096),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-Nq{}-Nk{}-D{}-Dv{}-chunk{}".format(*c))
def test_split_kv_matches_the_oracle(case, dtype):
    B, H_q, H_kv, N_q, N_k, D, D_v, chunk = case
    q = torch.randn(B, H_q, N_q, D, dtype=dtype)
    k = torch.randn(B, H_kv, N_k, D, dtype=dtype)
    v = torch.randn(B, H_kv, N_k, D_v, dtype=dtype)
    testing.poison_allocator()
    out = split_kv_attention(q, k, v, chunk=chunk)
    oracle = reference.attention(q.double(), k.double(), v.double())
    testing.check_against_oracle(out, testing.naive(q, k, v), oracle, what=f"split-KV {case}")
    assert out.dtype == dtype


def test_split_kv_takes_the_first_block_backend_and_refuses_a_named_one_without_blocks():
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    out = split_kv_attention(q, k, v, chunk=7, backend="reference")
    # float64 oracle rounded to float32 vs the same merged in blocks: ~1 ulp; rtol 1e-5 ~ 84 ulps
    torch.testing.assert_close(out, reference.attention(q, k, v).float(), rtol=1e-5, atol=1e-6)
    auto = split_kv_attention(q, k, v, chunk=7)
    blockless = backends.Backend(name="test-noblocks", description="forward only")
    backends.register(blockless, before=backends.names()[0])
    try:
        torch.testing.assert_close(split_kv_attention(q, k, v, chunk=7), auto, rtol=0, atol=0)  # skips it
        with pytest.raises(backends.BackendError, match="supports_blocks=False"):
            split_kv_attention(q, k, v, chunk=7, backend="test-noblocks")
    finally:
        backends.REGISTRY.pop("test-noblocks")
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        split_kv_attention(q, k, v, chunk=0)


def test_kv_cache_appends_and_refuses_overflow_and_mismatch():
    cache = KVCache(2, 3, max_len=10, d_head=4)
    k1, v1 = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    cache.update(k1, v1)
    k2, v2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    k_all, v_all = cache.update(k2, v2)
    assert cache.length == 10 and cache.room() == 0
    torch.testing.assert_close(k_all, torch.cat((k1, k2), 2), rtol=0, atol=0)
    torch.testing.assert_close(v_all, torch.cat((v1, v2), 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_len=10.*SlidingWindowCache"):
        cache.update(k2[:, :, :1], v2[:, :, :1])
    with pytest.raises(ValueError, match="matching sizes"):
        KVCache(2, 3, max_len=10, d_head=4).update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        KVCache(1, 1, max_len=0, d_head=4)


def _streaming_oracle(mha, x, window, sinks):
    """Every step by hand: keep the first `sinks` and the last `window` tokens (the new one included), place them at
    contiguous positions 0.., rotate, and attend in float64; a fresh computation for every step."""
    B, N, _ = x.shape
    H, H_kv, D = mha.n_heads, mha.n_kv_heads, mha.d_head
    q_all = mha.W_Q(x).view(B, N, H, D).transpose(1, 2)
    k_all = mha.W_K(x).view(B, N, H_kv, D).transpose(1, 2)
    v_all = mha.W_V(x).view(B, N, H_kv, D).transpose(1, 2)
    outs = []
    for t in range(N):
        kept = list(range(t + 1)) if t + 1 <= sinks + window else list(range(sinks)) + list(range(t + 1 - window,
                                                                                                    t + 1))
        pos = torch.arange(len(kept))
        k = mha.rotary(k_all[:, :, kept], pos)
        q = mha.rotary(q_all[:, :, t:t + 1], pos[-1:])
        o = reference.attention(q.double(), k.double(), v_all[:, :, kept].double())
        outs.append(mha.W_O(o.float().transpose(1, 2).reshape(B, 1, H * D)))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("window,sinks", [(5, 2), (4, 0), (64, 4)])
def test_sliding_window_cache_matches_streaming_attention_by_hand(window, sinks):
    mha = MultiHeadAttention(d_model=24, n_heads=4, n_kv_heads=2, causal=True, rotary=True)
    x = torch.randn(2, 23, 24)
    cache = SlidingWindowCache(2, 2, 6, window=window, sinks=sinks, rotary=mha.rotary)
    nbytes = cache.nbytes()
    with torch.no_grad():
        first = min(3, cache.room())
        got = [mha(x[:, :first], cache=cache)]  # a prompt piece while the cache is filling
        for t in range(first, x.shape[1]):
            got.append(mha(x[:, t:t + 1], cache=cache))
        got = torch.cat(got, 1)
        expected = _streaming_oracle(mha, x, window, sinks)
    assert cache.length == 23 and cache.size == min(23, window + sinks) and cache.nbytes() == nbytes
    # fixed bound, why: the streaming oracle recomputes rotary positions in float32 another way; 1e-4 ~ 840 ulps, a
    # wrong window or sink position moves rows by > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_sliding_window_cache_rolls_one_token_at_a_time():
    cache = SlidingWindowCache(1, 1, 4, window=3, sinks=1)
    cache.update(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4))
    assert cache.room() == 1
    with pytest.raises(ValueError, match="one token per step"):
        cache.update(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
    with pytest.raises(ValueError, match="window must be a positive int"):
        SlidingWindowCache(1, 1, 4, window=0)


def test_decode_attention_uses_split_kv_for_one_query_against_many_keys(monkeypatch):
    calls = []
    original = decode.split_kv_attention
    monkeypatch.setattr(decode, "split_kv_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q = torch.randn(1, 2, 1, 8)
    kv = torch.randn(1, 2, decode.SPLIT_MIN_KEYS, 8)
    out = decode.decode_attention(q, kv, kv)
    assert calls == [1]
    scores = (q @ kv.transpose(-2, -1)) / math.sqrt(8)
    # two float32 paths of one computation, nothing third-party to measure: rtol 1e-5 ~ 84 ulps (run on the scalar,
    # AVX2, AVX-512 kernels by make test-portable); rtol 1e-5 ~ 84 ulps
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ kv, rtol=1e-5, atol=1e-6)
    decode.decode_attention(torch.randn(1, 2, 2, 8), kv, kv)
    assert calls == [1]
