"""varlen_attention (packed sequences with cu_seqlens) against the textbook meaning of packing: every sequence
attended on its own by the float64 oracle. Generated from the registry: every backend that can run here is tested."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import selfattn
from selfattn import backends, masks, reference, testing, varlen


def per_sequence(fn, cu_seqlens, *tensors, **kw):
    """fn on each sequence's (1, H, n, D) view, results put back as packed (T, H, ...) tensors (empty ones skipped)."""
    bounds = [(a, b) for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True) if b > a]
    parts = [fn(*(t[a:b].transpose(0, 1)[None] for t in tensors), **kw) for a, b in bounds]
    parts = [p if isinstance(p, tuple) else (p,) for p in parts]
    return tuple(torch.cat([p[i][0].transpose(0, 1) for p in parts]) for i in range(len(parts[0])))


def mask_kw(kind: str, window: int = 0) -> dict:
    """Keyword arguments of varlen_attention, and of attention on one sequence, for one mask kind."""
    if kind == "causal":
        return dict(causal=True), dict(causal=True)
    if kind == "window":
        return dict(causal=True, window=window), dict(mask=masks.sliding_window(window))
    return {}, {}


CASES = [  # lengths, H_q, H_kv, D, D_v, mask kind
    ([1, 64, 97, 1, 130], 2, 2, 32, 32, "causal"),
    ([33, 0, 200, 7], 4, 2, 59, 40, "none"),  # an empty sequence; GQA; odd head dims; D != D_v
    ([150, 129, 1, 65], 3, 1, 16, 16, "window"),
    ([300], 2, 1, 24, 24, "causal"),  # one sequence: plain causal attention
    ([5] * 40, 2, 2, 16, 16, "none"),  # many short ones
    ([1, 300, 0, 257, 129], 4, 2, 40, 40, "causal"),  # long enough for the tiled forward to go document by document
    ([200, 150], 2, 1, 32, 24, "window"),
]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("backend", backends.names())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}seqs-T{sum(c[0])}-H{c[1]}x{c[2]}-{c[5]}")
def test_matches_each_sequence_attended_alone(backend, dtype, case):
    check_packing(backend, dtype, *case, seed=sum(case[0]) * 31 + case[1])


@pytest.mark.parametrize("seed", range(6))
def test_random_packings(seed):
    """Random numbers and lengths of sequences (empty and one-token ones likely), heads, head dims and masks, on the
    backend chosen automatically."""
    g = torch.Generator().manual_seed(100 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=g))]

    n_seqs = int(torch.randint(1, 7, (), generator=g))
    lengths = [pick([0, 1, 2, int(torch.randint(3, 200, (), generator=g))]) for _ in range(n_seqs)]
    lengths[0] = max(lengths[0], 1)
    H_kv = pick([1, 2])
    backend = backends.choose(selfattn.api.make_call(*(torch.zeros(1, 1, 1, 8) for _ in range(3)))).name
    check_packing(backend, torch.float32, lengths, H_kv * pick([1, 3]), H_kv, pick([8, 33, 64]), pick([8, 33]),
                  pick(["none", "causal", "window"]), seed=seed)


def check_packing(backend, dtype, lengths, H_q, H_kv, D, D_v, kind, *, seed):
    g = torch.Generator().manual_seed(seed)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    T = int(cu_seqlens[-1])
    q64 = torch.randn(T, H_q, D, generator=g, dtype=torch.float64)
    k64 = torch.randn(T, H_kv, D, generator=g, dtype=torch.float64)
    v64 = torch.randn(T, H_kv, D_v, generator=g, dtype=torch.float64)
    kw, kw_one = mask_kw(kind, window=int(torch.randint(1, 40, (), generator=g)))
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    mask = varlen.packed_mask(cu_seqlens, T, causal=kw.get("causal", False), window=kw.get("window"))
    call = selfattn.api.make_call(*(t.transpose(0, 1)[None] for t in (q, k, v)), mask=mask)
    reasons = backends.get(backend).not_supported_reasons(call)
    if reasons:
        pytest.skip(f"{backend} does not serve this case: {'; '.join(reasons)}")

    testing.poison_allocator()
    out, lse = selfattn.varlen_attention(q, k, v, cu_seqlens, backend=backend, return_lse=True, **kw)
    q_r, k_r, v_r = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = per_sequence(reference.attention, cu_seqlens, q_r, k_r, v_r, return_lse=True, **kw_one)
    q_n, k_n, v_n = (t.detach().clone().requires_grad_() for t in (q, k, v))
    (out_naive,) = per_sequence(testing.naive, cu_seqlens, q_n, k_n, v_n, **kw_one)

    assert out.shape == (T, H_q, D_v) and out.dtype == dtype and lse.shape == (T, H_q)
    testing.check_against_oracle(out, out_naive, out_ref, what=f"{backend} varlen out")
    assert not torch.isneginf(lse_ref).any()  # in self-attention packing every row sees at least itself
    torch.testing.assert_close(lse.double(), lse_ref, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)

    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), d_out.to(dtype))
    grads_ref = torch.autograd.grad(out_ref, (q_r, k_r, v_r), d_out)
    grads_naive = torch.autograd.grad(out_naive, (q_n, k_n, v_n), d_out.to(dtype))
    with torch.no_grad():  # the naive gradient's other textbook form (δ from O); the yardstick is the worse
        grads_naive_o = per_sequence(testing.naive_grads_from_out, cu_seqlens, q.detach(), k.detach(), v.detach(),
                                     d_out, **kw_one)
    # dS = P·(dP − δ) cancels: its rounding is relative to |dP|, not |dS| (triton_cases.py's floor). The tiled dQ
    # of the second sequence of the first case, attended alone by selfattn.attention, needs it as much as here.
    v_q = v64.repeat_interleave(H_q // H_kv, 1)  # (T, H_q, D_v)
    bounds = zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)
    dp = max(torch.einsum("ihd,jhd->hij", d_out[a:b], v_q[a:b]).abs().max().item() for a, b in bounds if b > a)
    big = max(q64.abs().max().item(), k64.abs().max().item()) * D**-0.5 * dp
    for name, a, r, n, n_o in zip("qkv", grads, grads_ref, grads_naive, grads_naive_o, strict=True):
        worse = n if testing.max_error(n, r) >= testing.max_error(n_o, r) else n_o
        testing.check_against_oracle(a, worse, r, factor=3.0, what=f"{backend} varlen d{name}",
                                     floor=testing.floor_for(dtype, max(big, r.abs().max().item())))


def test_packed_mask_equals_document_ids_and_its_blocks_are_exact():
    """masks.packed is document(ids) of the packing; its loop-free block classifier agrees with evaluating the mask
    densely at every block size and position offset (a block classifier may never be wrong about EMPTY or FULL)."""
    cu = torch.tensor([0, 3, 3, 10, 11, 40, 41], dtype=torch.int32)
    ids = torch.repeat_interleave(torch.arange(6), cu.diff().long())
    m = masks.packed(cu)
    assert m.spec[0] == "document" and torch.equal(m.spec[1], ids)
    assert torch.equal(m.dense(1, 1, 41, 41), masks.document(ids).dense(1, 1, 41, 41))
    for (bq, bk), (N_q, q_pos0, k_pos0) in zip([(4, 4), (3, 5), (16, 2), (1, 7)],
                                               [(41, 0, 0), (20, 21, 0), (30, -5, 3), (50, 0, 0)], strict=True):
        N_k = 41 - k_pos0
        fast = m.block_states(1, 1, N_q, N_k, bq, bk, q_pos0=q_pos0, k_pos0=k_pos0)
        exact = masks._dense_block_states(m, 1, 1, N_q, N_k, bq, bk, None, q_pos0, k_pos0)
        assert torch.equal(fast, exact), (bq, bk, N_q, q_pos0, k_pos0)


def test_tiled_forward_goes_document_by_document_only_where_it_may():
    """The tiled forward cuts packed self-attention into one fused-kernel problem per document (the oracle cases above
    check its numbers); it must not where a document's positions are not one run, or queries are not at the keys'."""
    from selfattn.backends import tiled

    def bounds(cu, T=None, dtype=torch.float32, **kw):
        T = int(cu[-1]) if T is None else T
        q = torch.zeros(1, 2, T, 8, dtype=dtype)
        return tiled._document_bounds(selfattn.api.make_call(q, q, q, **kw))

    cu = torch.tensor([0, 200, 200, 456])
    assert bounds(cu, mask=masks.packed(cu), causal=True) == [(0, 200), (200, 456)]
    assert bounds(cu, mask=masks.sliding_window(7) & masks.packed(cu)) == [(0, 200), (200, 456)]
    assert bounds(cu, mask=masks.packed(cu), dtype=torch.float64) is None  # float64: bit-identical tiles
    short = torch.tensor([0, 100, 255])  # documents of 127.5 tokens on average: tiles holding several are cheaper
    assert bounds(short, mask=masks.packed(short)) is None
    scattered = torch.tensor([0] * 128 + [1] * 200 + [0] * 128)
    assert bounds(cu, mask=masks.document(scattered)) is None  # document 0 in two runs
    assert bounds(cu, mask=masks.packed(cu) & masks.key_padding(torch.tensor([300]))) is None
    assert bounds(cu, mask=masks.packed(cu), bias=torch.zeros(456, 456)) is None


def test_layers_reuse_one_mask_per_cu_seqlens_tensor():
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    first = varlen.packed_mask(cu, 9, causal=True)
    assert varlen.packed_mask(cu, 9, causal=True) is first  # no O(T) work on the second layer
    assert varlen.packed_mask(cu, 9) is not first  # another mask: not causal
    assert varlen.packed_mask(cu.clone(), 9, causal=True) is not first  # another tensor
    cu[1] = 2  # changed in place: the mask follows
    changed = varlen.packed_mask(cu, 9, causal=True)
    assert changed is not first and changed.spec[2][1].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1]


def test_empty_packing_and_strided_inputs():
    out = selfattn.varlen_attention(*(torch.randn(0, 2, 8) for _ in range(3)), torch.tensor([0]))
    assert out.shape == (0, 2, 8)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(37, 3, 2, 16, generator=g, dtype=torch.float64)  # (T, 3, H, D): a fused projection's layout
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 20, 37])
    out = selfattn.varlen_attention(q, k, v, cu, causal=True)
    (ref,) = per_sequence(reference.attention, cu, q, k, v, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    cu = torch.tensor([0, 9, 10, 30], dtype=torch.int32)
    q, k, v = (torch.randn(30, h, 16, generator=g) for h in (4, 2, 2))

    def f(q, k, v, cu):
        return selfattn.varlen_attention(q, k, v, cu, causal=True).relu()

    explained = torch._dynamo.explain(f)(q, k, v, cu)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    got, want = compiled(q1, k, v, cu), f(q2, k, v, cu)
    # compiled vs not: two float32 paths of one computation, nothing third-party to measure: rtol 1e-5 ~ 84 ulps (run on
    # the scalar, AVX2, AVX-512 kernels by make test-portable); a wrong mask, scale or position moves values by > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-4, atol=1e-5)


T_, X = 6, torch.zeros(6, 2, 4)
CU = torch.tensor([0, 2, 6])


@pytest.mark.parametrize("args, kw, error, words", [
    ((X, X, X, CU.float()), {}, TypeError, "integer tensor"),
    ((X, X, X, [0, 2, 6]), {}, TypeError, "cu_seqlens must be an integer torch.Tensor"),
    ((X, X, X, CU[None]), {}, ValueError, "1-D"),
    ((X, X, X, torch.tensor([], dtype=torch.int32)), {}, ValueError, "cu_seqlens is empty"),
    ((X, X, X, torch.tensor([1, 2, 6])), {}, ValueError, "must start at 0, got cu_seqlens[0] = 1"),
    ((X, X, X, torch.tensor([0, 4, 3, 6])), {}, ValueError, "cu_seqlens[1] = 4 > cu_seqlens[2] = 3"),
    ((X, X, X, torch.tensor([0, 2, 5])), {}, ValueError,
     "cu_seqlens[-1] = 5 must equal the number of packed positions T = 6"),
    ((X[None], X, X, CU), {}, ValueError, "q must be packed as (T, H, D)"),
    ((X, X[:5], X[:5], CU), {}, ValueError, "T = 6, 5, 5"),
    ((torch.zeros(6, 3, 4), X, X, CU), {}, ValueError, "H_q=3 query heads and H_kv=2"),
    ((X, X, X.double(), CU), {}, TypeError, "share one dtype"),
    ((X, X, X, CU), dict(window=4), ValueError, "pass causal=True with it"),
    ((X, X, X, CU), dict(window=0, causal=True), ValueError, "window must be at least 1"),
    ((X, X, X, CU), dict(window=2.0, causal=True), TypeError, "window must be an int"),
    ((X, X, X, CU), dict(causal=1), TypeError, "causal must be True or False"),
    ((X, X, X, CU), dict(cu_seqlens_k=torch.tensor([0, 3, 6])), ValueError, "supports self-attention packing only"),
    ((X, X, X, CU), dict(backend="nope"), backends.BackendError, "unknown backend"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_errors_name_the_values_and_the_fix(args, kw, error, words):
    with pytest.raises(error, match=re.escape(words)):
        selfattn.varlen_attention(*args, **kw)


def test_same_packing_given_twice_is_accepted():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(T_, 2, 4, generator=g) for _ in range(3))
    a = selfattn.varlen_attention(q, k, v, CU, cu_seqlens_k=CU.clone().to(torch.int32))
    b = selfattn.varlen_attention(q, k, v, CU)
    assert torch.equal(a, b)


def test_benchmark_script_runs_end_to_end(tmp_path):
    """Only the plumbing (implementations, ratios, result files); at these sizes its numbers mean nothing."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_varlen.py"
    src = str(Path(selfattn.__file__).resolve().parents[1])
    run = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": src})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "varlen_smoke.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"varlen", "padded", "sdpa-padded", "per-sequence"}
    assert all(r["max_diff_vs_varlen"] < 1e-5 for r in rows), rows


def test_inference_mode_tensors():
    """Inference tensors have no version counter: the mask is built for each call, and a change in place is seen."""
    with torch.inference_mode():
        cu = torch.tensor([0, 3, 10], dtype=torch.int32)
        q = torch.randn(10, 2, 16)
        first = selfattn.varlen_attention(q, q, q, cu, causal=True)
        cu[1] = 5
        second = selfattn.varlen_attention(q, q, q, cu, causal=True)
        bhnd = [q[a:b].transpose(0, 1)[None].double() for a, b in ((0, 5), (5, 10))]  # (1, H, n, D) each
        want = torch.cat([reference.attention(x, x, x, causal=True)[0].transpose(0, 1) for x in bhnd])
    assert not torch.equal(first, second)
    # float32 result vs the float64 oracle on 5 keys: a few ulps; 1e-5 ~ 84 ulps (a wrong packing moves rows by O(1))
    torch.testing.assert_close(second.double(), want, rtol=1e-5, atol=1e-5)
