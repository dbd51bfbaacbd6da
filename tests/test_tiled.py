"""What is specific to the tiled backend: masked tiles are really skipped, memory stays O(N), the work is split
over the cores. Its accuracy against the oracle is tested with every other backend in test_backends.py."""

import subprocess
import sys
import textwrap

import pytest
import torch

import selfattn
from selfattn import backends, masks, testing
from selfattn.backends import tiled


def run_counted(n, **kw):
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
    tiled.TILE_COUNTS.clear()
    out = selfattn.attention(q, k, v, backend="tiled", **kw)
    out.sum().backward()
    return dict(tiled.TILE_COUNTS)


def test_causal_skips_the_tiles_above_the_diagonal(monkeypatch):
    monkeypatch.setattr(tiled, "kernel_block_q", lambda call: tiled.BLOCK_Q)  # one tile per kernel call: countable
    n_blocks = 6  # 6 x 6 tiles of 256: the lower triangle with its diagonal is 21 of 36
    counts = run_counted(n_blocks * tiled.BLOCK_Q, causal=True)
    assert counts == {"forward": 21, "backward": 21}, counts


def test_sliding_window_computes_a_band():
    n, w = 8 * tiled.BLOCK_Q, tiled.BLOCK_Q  # each query block sees its own tile and the one before it
    counts = run_counted(n, mask=masks.sliding_window(w))
    assert counts == {"forward": 15, "backward": 15}, counts


def test_packed_documents_skip_the_other_documents():
    n = 8 * tiled.BLOCK_Q
    ids = torch.arange(n) // (2 * tiled.BLOCK_Q)  # four documents of two blocks each
    counts = run_counted(n, mask=masks.document(ids), causal=True)
    # the forward runs each document as its own causal call (one block of 512 rows x 2 key blocks; see
    # tiled.DOCUMENT_SPLIT_MIN_MEAN); the backward tiles 256 x 256: 3 of a document's 4 tiles are not above the diagonal
    assert counts == {"forward": 4 * 2, "backward": 4 * 3}, counts


def test_key_padding_skips_padding_blocks_and_zeroes_empty_rows():
    n = 4 * tiled.BLOCK_Q
    q, k, v = (torch.randn(2, 2, n, 16) for _ in range(3))
    lengths = torch.tensor([tiled.BLOCK_K, 0])  # batch element 1 sees nothing at all
    tiled.TILE_COUNTS.clear()
    out, lse = selfattn.attention(q, k, v, mask=masks.key_padding(lengths), backend="tiled", return_lse=True)
    assert tiled.TILE_COUNTS["forward"] == 4, dict(tiled.TILE_COUNTS)  # one key block for every query block
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    torch.testing.assert_close(out[0], selfattn.attention(q[:1], k[:1, :, :256], v[:1, :, :256], backend="tiled")[0])


def test_left_padding_skips_the_blocks_before_the_first_real_key():
    n = 4 * tiled.BLOCK_K
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    starts = torch.tensor([3 * tiled.BLOCK_K])  # only the last key block holds real keys
    tiled.TILE_COUNTS.clear()
    out = selfattn.attention(q, k, v, mask=masks.key_range(starts), backend="tiled")
    n_qb = -(-n // tiled.BLOCK_Q)
    assert tiled.TILE_COUNTS["forward"] == n_qb, dict(tiled.TILE_COUNTS)  # one key block for every query block
    torch.testing.assert_close(out, selfattn.attention(q, k[:, :, -tiled.BLOCK_K:], v[:, :, -tiled.BLOCK_K:],
                                                       backend="tiled"))


def test_float16_and_bfloat16_inputs_keep_their_dtype_and_give_float32_lse():
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = (torch.randn(1, 2, 300, 32, dtype=dtype, requires_grad=True) for _ in range(3))
        out, lse = selfattn.attention(q, k, v, causal=True, backend="tiled", return_lse=True)
        out.float().sum().backward()
        assert out.dtype == dtype and lse.dtype == torch.float32 and q.grad.dtype == dtype
        assert all(torch.isfinite(t).all() for t in (out, q.grad, k.grad, v.grad))


def test_tiled_is_the_default_for_what_native_does_not_take():
    """The native C++ kernel comes first on the CPU where it is built; float64 (and everything where it is not
    built) goes to tiled."""
    q = torch.randn(1, 1, 4, 8)
    call = selfattn.api.make_call(q, q, q, causal=True)
    native_built = not backends.get("native").unavailable_reasons()
    assert backends.choose(call).name == ("native" if native_built else "tiled")
    q64 = q.double()
    assert backends.choose(selfattn.api.make_call(q64, q64, q64, causal=True)).name == "tiled"


def test_bias_gradient_takes_the_tile_path_and_skips_masked_tiles():
    """The fused kernel's backward hands out no dS, so a bias that requires grad runs the tile backward; tiles the
    mask hides are skipped there too, and their share of the bias gradient is zero."""
    q, k, v = (torch.randn(1, 4, 1024, 32, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 4, 1024, 1024, requires_grad=True)
    out = selfattn.attention(q, k, v, bias=bias, mask=masks.sliding_window(200), backend="tiled")
    tiled.TILE_COUNTS.clear()
    (dbias,) = torch.autograd.grad(out.sum(), bias)
    assert 0 < tiled.TILE_COUNTS["backward"] < 16, tiled.TILE_COUNTS  # 4x4 tiles of 256, the band touches 7
    far = masks.sliding_window(200).dense(1, 1, 1024, 1024)
    assert (dbias[~far.expand_as(dbias)] == 0).all()


def test_balance_splits_the_tiles_evenly():
    costs = list(range(1, 17))  # a causal column profile: later key blocks have fewer (here: more) tiles
    shares = tiled._balance(costs, 2)
    assert sorted(j for s in shares for j in s) == list(range(16))
    a, b = (sum(costs[j] for j in s) for s in shares)
    assert abs(a - b) <= max(costs), (a, b)


def test_peak_memory_grows_linearly():
    """Forward and backward at N = 16,384 would need a 1 GiB float32 score matrix per head; the tiled backend must
    stay within a small multiple of its inputs (measured in a fresh process)."""
    script = textwrap.dedent("""
        import resource, torch, selfattn
        q, k, v = (torch.randn(1, 1, 16384, 32, requires_grad=True) for _ in range(3))
        selfattn.attention(q[:, :, :300], k[:, :, :300], v[:, :, :300], backend="tiled").sum().backward()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        selfattn.attention(q, k, v, causal=True, backend="tiled").sum().backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               env={"PYTHONPATH": ":".join(sys.path)}).stdout)
    n_squared = 16384**2 * 4
    assert grown < n_squared / 16, f"peak memory grew by {grown / 2**20:.0f} MiB; N² floats are {n_squared / 2**20} MiB"


@pytest.mark.parametrize("min_heads", [0, 10**9], ids=["kernel-backward", "tiled-backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_both_backward_paths_match_the_oracle(monkeypatch, min_heads, dtype):
    """GQA, D != D_v, bottom-right causal with a bias, odd sizes, several row blocks, through either backward."""
    monkeypatch.setattr(tiled, "KERNEL_BACKWARD_MIN_HEADS", min_heads)
    monkeypatch.setattr(tiled, "DENSE_BLOCK_Q", 128)
    g = torch.Generator().manual_seed(3)
    q64, k64, v64 = (torch.randn(2, h, n, d, generator=g, dtype=torch.float64)
                     for h, n, d in ((4, 300, 40), (2, 520, 40), (2, 520, 24)))
    kw = dict(causal=True, bias=torch.randn(1, 4, 300, 520, generator=g, dtype=torch.float64))
    d_out = torch.randn(2, 4, 300, 24, generator=g, dtype=torch.float64)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    out = selfattn.attention(q, k, v, backend="tiled", **{**kw, "bias": kw["bias"].to(dtype)})
    grads = torch.autograd.grad(out, (q, k, v), d_out.to(dtype))
    q_r, k_r, v_r = (t.detach().double().requires_grad_() for t in (q, k, v))
    grads_ref = torch.autograd.grad(selfattn.reference.attention(q_r, k_r, v_r, **kw), (q_r, k_r, v_r), d_out)
    with torch.no_grad():
        grads_naive = testing.naive_grads_from_out(q, k, v, d_out, **{**kw, "bias": kw["bias"].to(dtype)})
    for name, a, r, n in zip("qkv", grads, grads_ref, grads_naive, strict=True):
        testing.check_against_oracle(a, n, r, factor=3.0, what=f"d{name}")


@pytest.mark.parametrize("schedule", ["native", "float32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_schedules_match_the_oracle(monkeypatch, schedule, dtype):
    """Both half-precision schedules (the kernel in the inputs' dtype, or upcast to float32; each CPU gets the faster
    one, see tiled.half_schedule) meet the oracle rule, forward and backward, with GQA by heads and causal."""
    from selfattn import reference

    monkeypatch.setenv("SELFATTN_HALF", schedule)
    g = torch.Generator().manual_seed(5)
    q64, k64, v64 = (torch.randn(1, h, 300, 32, generator=g, dtype=torch.float64) for h in (6, 2, 2))
    d_out = torch.randn(1, 6, 300, 32, generator=g, dtype=torch.float64)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    out = selfattn.attention(q, k, v, causal=True, backend="tiled")
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, (q, k, v), d_out.to(dtype))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out_ref = reference.attention(*ref_in, causal=True)
    grads_ref = torch.autograd.grad(out_ref, ref_in, d_out)
    naive_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_naive = testing.naive(*naive_in, causal=True)
    grads_naive = torch.autograd.grad(out_naive, naive_in, d_out.to(dtype))
    testing.check_against_oracle(out, out_naive, out_ref, what=f"{schedule} out")
    for name, a, r, n in zip("qkv", grads, grads_ref, grads_naive, strict=True):
        testing.check_against_oracle(a, n, r, factor=3.0, what=f"{schedule} d{name}")


def test_half_schedule_is_measured_or_named(monkeypatch):
    monkeypatch.delenv("SELFATTN_HALF", raising=False)
    for dtype in (torch.bfloat16, torch.float16):
        schedule = tiled.half_schedule(dtype)
        assert set(schedule) == {"forward", "backward"} and set(schedule.values()) <= {"native", "float32"}
    monkeypatch.setenv("SELFATTN_HALF", "fast")
    with pytest.raises(ValueError, match="SELFATTN_HALF must be 'native' or 'float32'"):
        tiled.half_schedule(torch.bfloat16)


@pytest.mark.parametrize("B, H_q, H_kv, N_q, N_k", [(1, 9, 3, 1, 1000), (2, 8, 1, 1, 1027), (1, 4, 4, 3, 999),
                                                    (1, 8, 2, 2, 1536)])
def test_decoding_split_over_the_cores_matches_the_oracle(monkeypatch, B, H_q, H_kv, N_q, N_k):
    """Flash-decoding (keys cut into chunks that are extra kernel heads, a tail of leftover keys, merged by lse),
    made to run on small caches by lowering its thresholds; output and lse against the oracle."""
    from selfattn import reference

    monkeypatch.setattr(tiled, "SPLIT_MIN_KEYS", 256)
    monkeypatch.setattr(tiled, "SPLIT_MIN_CHUNK", 64)
    calls = []
    split = tiled._split_keys
    monkeypatch.setattr(tiled, "_split_keys", lambda *a: calls.append(a[-1]) or split(*a))
    g = torch.Generator().manual_seed(N_k)
    q, k, v = (torch.randn(B, h, n, 32, generator=g) for h, n in ((H_q, N_q), (H_kv, N_k), (H_kv, N_k)))
    out, lse = selfattn.attention(q, k, v, causal=True, backend="tiled", return_lse=True)
    assert calls and all(c > 1 for c in calls), calls
    out_ref, lse_ref = reference.attention(q.double(), k.double(), v.double(), causal=True, return_lse=True)
    out_naive = testing.naive(q, k, v, causal=True)
    testing.check_against_oracle(out, out_naive, out_ref, what="split-KV out")
    # lse is float32 at magnitude ~log N_k + max score (~10): 1e-5 is ~10 ulps there
    torch.testing.assert_close(lse.double(), lse_ref, rtol=0, atol=1e-5)
