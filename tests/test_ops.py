"""The custom op selfattn::attention: opcheck, torch.compile(fullgraph=True) without graph breaks, gradients."""

import pytest
import torch
import torch._dynamo

import selfattn
from selfattn import masks, ops, reference, testing
from selfattn.ops import OpMask


def _qkv(B=2, H_q=4, H_kv=2, N_q=9, N_k=13, D=8, D_v=6, dtype=torch.float32, grad=False):
    q = torch.randn(B, H_q, N_q, D, dtype=dtype, requires_grad=grad)
    k = torch.randn(B, H_kv, N_k, D, dtype=dtype, requires_grad=grad)
    v = torch.randn(B, H_kv, N_k, D_v, dtype=dtype, requires_grad=grad)
    return q, k, v


def _mask_cases(B, N_q, N_k):
    lengths = torch.tensor([N_k, 4])[:B]
    docs = torch.tensor([0] * 5 + [1] * (N_k - 5))
    dense = torch.rand(B, 1, N_q, N_k) < 0.7
    return {
        "none": None,
        "causal": masks.causal(),
        "window": masks.sliding_window(4),
        "padding": masks.key_padding(lengths),
        "causal&padding": masks.causal() & masks.key_padding(lengths),
        "causal&left-padding": masks.causal() & masks.key_range(N_k - lengths),
        "window&key-range&padding": masks.sliding_window(5) & masks.key_range(torch.tensor([2, 0])[:B], lengths + 3)
                                    & masks.key_padding(lengths),
        "documents": masks.causal() & masks.document(docs),
        "dense": dense,
        "or": masks.sliding_window(2) | masks.key_padding(torch.tensor([3, 3])),  # no op spec: evaluated densely
        "custom": lambda b, h, q, k: (q - k) % 3 != 1,
    }


@pytest.mark.parametrize("case", list(_mask_cases(2, 9, 13)))
def test_op_mask_rebuilds_the_same_mask(case):
    B, H, N_q, N_k = 2, 4, 9, 13
    mask = _mask_cases(B, N_q, N_k)[case]
    call = selfattn.api.make_call(*_qkv(B, H, 2, N_q, N_k), mask=mask)
    rebuilt = ops.op_mask_for(call).build(N_q, N_k)
    if call.mask is None:
        assert rebuilt is None
        return
    want = call.mask.dense(B, H, N_q, N_k)
    got = rebuilt.dense(B, H, N_q, N_k)
    assert torch.equal(got, want), f"{case}: {int((got != want).sum())} of {want.numel()} entries differ"
    travels_dense = ops.op_mask_for(call).dense is not None
    assert travels_dense == (case in ("dense", "or", "custom")), f"{case}: dense={travels_dense}"


def test_op_mask_refuses_what_it_cannot_carry():
    assert OpMask.from_spec(None, 3, 3) is None
    assert OpMask.from_spec(("or", ("causal",), ("causal",)), 3, 3) is None
    assert OpMask.from_spec(("tensor", torch.ones(4, 4, dtype=torch.bool), 4, 4), 3, 3) is None
    two_windows = OpMask.from_spec(("and", ("sliding_window", 5), ("sliding_window", 3)), 3, 3)
    assert two_windows.window == 3, two_windows


def _op_args(q, k, v, mask=None, bias=None, causal=False, backend=None, **variants):
    call = selfattn.api.make_call(q, k, v, mask=mask, bias=bias, causal=causal, **variants)
    return (q, k, v, call.scale, *ops.op_mask_for(call).args(), bias, backend, *ops.op_mods_for(call), call.sinks,
            call.dropout_p, call.dropout_seed)


@pytest.mark.parametrize("case", ["none", "causal&padding", "causal&left-padding", "window", "documents", "dense"])
def test_opcheck(case):
    q, k, v = _qkv(grad=True)
    args = _op_args(q, k, v, mask=_mask_cases(2, 9, 13)[case])
    torch.library.opcheck(torch.ops.selfattn.attention.default, args)


def test_opcheck_with_a_bias_that_needs_grad():
    q, k, v = _qkv(B=1, H_q=2, H_kv=1, N_q=5, N_k=7, grad=True)
    bias = torch.randn(1, 2, 5, 7, requires_grad=True)
    torch.library.opcheck(torch.ops.selfattn.attention.default, _op_args(q, k, v, bias=bias, causal=True))


class _TinyBlock(torch.nn.Module):
    """A decoder layer as users write it: projections, selfattn.attention, output projection."""

    def __init__(self, d=32, heads=4, kv_heads=2, mask=None):
        super().__init__()
        self.heads, self.kv_heads, self.d_head, self.mask = heads, kv_heads, d // heads, mask
        self.qkv = torch.nn.Linear(d, (heads + 2 * kv_heads) * self.d_head)
        self.out = torch.nn.Linear(d, d)

    def forward(self, x, lengths=None, starts=None):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).split([self.heads * self.d_head, self.kv_heads * self.d_head,
                                     self.kv_heads * self.d_head], -1)
        q = q.view(B, N, self.heads, self.d_head).transpose(1, 2)  # (B, H_q, N, D)
        k = k.view(B, N, self.kv_heads, self.d_head).transpose(1, 2)  # (B, H_kv, N, D)
        v = v.view(B, N, self.kv_heads, self.d_head).transpose(1, 2)  # (B, H_kv, N, D)
        mask = self.mask if lengths is None else masks.key_padding(lengths)
        mask = mask if starts is None else masks.key_range(starts)
        y = selfattn.attention(q, k, v, causal=True, mask=mask)  # (B, H_q, N, D)
        return self.out(y.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("mask", ["none", "padding-built-inside", "left-padding-built-inside", "window", "custom"])
def test_compile_fullgraph_has_no_graph_break_and_matches_eager(mask):
    torch._dynamo.reset()
    fixed = {"none": None, "padding-built-inside": None, "left-padding-built-inside": None,
             "window": masks.sliding_window(5), "custom": lambda b, h, q, k: (q - k) % 4 != 3}[mask]
    model = _TinyBlock(mask=fixed)
    x = torch.randn(2, 23, 32)
    lengths = torch.tensor([23, 11]) if mask == "padding-built-inside" else None
    starts = torch.tensor([0, 9]) if mask == "left-padding-built-inside" else None
    explained = torch._dynamo.explain(model)(x, lengths, starts)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1, explained.graph_count

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x1 = x.clone().requires_grad_()
    y = compiled(x1, lengths, starts)
    y.square().sum().backward()
    x2 = x.clone().requires_grad_()
    want = model(x2, lengths, starts)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want.square().sum().backward()
    # compiled vs not: two float32 paths of one computation, nothing third-party to measure: rtol 1e-5 ~ 84 ulps (run on
    # the scalar, AVX2, AVX-512 kernels by make test-portable); a wrong mask, scale or position moves values by > 1e-3
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def test_compile_with_inductor_counts_one_graph():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    q, k, v = _qkv()
    f = torch.compile(lambda q, k, v: selfattn.attention(q, k, v, causal=True).relu(), backend=counter, fullgraph=True)
    f(q, k, v)
    assert counter.frame_count == 1 and counter.op_count >= 2, (counter.frame_count, counter.op_count)
    out = torch.compile(lambda q, k, v: selfattn.attention(q, k, v, causal=True), fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, selfattn.attention(q, k, v, causal=True), rtol=0, atol=0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_op_gradients_against_the_oracle(with_bias):
    torch.manual_seed(1)
    q, k, v = _qkv(B=2, H_q=6, H_kv=3, N_q=17, N_k=11, D=7, D_v=5, grad=True)
    mask = masks.causal() & masks.key_padding(torch.tensor([11, 6]))
    bias = torch.randn(1, 6, 17, 11, requires_grad=True) if with_bias else None
    testing.poison_allocator()
    out, lse = torch.ops.selfattn.attention(*_op_args(q, k, v, mask=mask, bias=bias))
    d_out = torch.randn_like(out)
    inputs = (q, k, v) + ((bias,) if with_bias else ())
    got = torch.autograd.grad(out, inputs, d_out)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    b64 = bias.detach().double().requires_grad_() if with_bias else None
    o64, lse64 = reference.attention(q64, k64, v64, mask=mask, bias=b64, return_lse=True)
    want = torch.autograd.grad(o64, (q64, k64, v64) + ((b64,) if with_bias else ()), d_out.double())
    qn, kn, vn = (t.detach().requires_grad_() for t in (q, k, v))
    bn = bias.detach().requires_grad_() if with_bias else None
    on = testing.naive(qn, kn, vn, mask=mask, bias=bn)
    naive = torch.autograd.grad(on, (qn, kn, vn) + ((bn,) if with_bias else ()), d_out)

    testing.check_against_oracle(out, on, o64, what="out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64.float())), "fully masked rows must have lse -inf"
    for name, g, n, w in zip("q k v bias".split(), got, naive, want, strict=False):
        testing.check_against_oracle(g, n, w, factor=3.0, what=f"d{name}")


def test_fully_masked_rows_are_zero_under_compile():
    q, k, v = _qkv(N_q=5, N_k=5)
    f = torch.compile(lambda q, k, v, m: selfattn.attention(q, k, v, mask=m), fullgraph=True, backend="aot_eager")
    m = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    m[:, :, 2] = False
    out = f(q, k, v, m)
    assert torch.isfinite(out).all() and out[:, :, 2].abs().max() == 0, out[:, :, 2]


def test_lse_is_not_differentiable_through_the_op():
    q, k, v = _qkv(grad=True)
    out, lse = torch.ops.selfattn.attention(*_op_args(q, k, v, causal=True))
    assert out.requires_grad and not lse.requires_grad


def test_opcheck_backward_op():
    q, k, v = _qkv(B=1, H_q=2, H_kv=1, N_q=6, N_k=8)
    args = _op_args(q, k, v, mask=masks.key_range(torch.tensor([2]), torch.tensor([7])), causal=True)
    out, lse = torch.ops.selfattn.attention(*args)
    d_out = torch.randn_like(out)
    q, k, v, scale, causal, window, lengths, starts, docs, dense, bias, backend, *variants = args
    assert lengths.tolist() == [7] and starts.tolist() == [2]
    torch.library.opcheck(torch.ops.selfattn.attention_backward.default,
                          (d_out, q, k, v, out, lse, scale, causal, window, lengths, starts, docs, dense, bias, backend,
                           False, *variants, False))


def test_opcheck_with_score_mods_sinks_and_dropout():
    from selfattn import score_mods

    q, k, v = _qkv(B=1, H_q=2, H_kv=1, N_q=5, N_k=7, grad=True)
    slopes, sinks = torch.rand(2, requires_grad=True), torch.randn(2, requires_grad=True)
    mod = score_mods.softcap(2.0) >> score_mods.alibi(slopes)
    torch.library.opcheck(torch.ops.selfattn.attention.default,
                          _op_args(q, k, v, causal=True, score_mod=mod, sinks=sinks, dropout_p=0.3, dropout_seed=4))


def test_backward_needs_a_backend_with_the_block_api():
    from dataclasses import dataclass

    from selfattn import backends
    from selfattn.backends.reference import ReferenceBackend

    @dataclass(frozen=True)
    class NoBlocks(ReferenceBackend):
        pass

    backends.register(NoBlocks(name="test-no-blocks", description="reference without the block API"))
    try:
        q, k, v = _qkv(grad=True)
        out, _ = torch.ops.selfattn.attention(*_op_args(q, k, v, backend="test-no-blocks"))
        with pytest.raises(backends.BackendError, match="block API.*'test-no-blocks'.*backend="):
            out.sum().backward()
    finally:
        backends.REGISTRY.pop("test-no-blocks")


def test_score_mods_sinks_and_dropout_compile_fullgraph_with_gradients():
    """Ready-made modifiers, sinks and dropout cross the custom op as plain data: no graph break, the same output
    and gradients (slopes, table, sinks included) as eager."""
    import torch._dynamo

    from selfattn import score_mods

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 33, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 40, 16, generator=g, requires_grad=True) for _ in range(2))
    slopes = score_mods.alibi_slopes(4).requires_grad_()
    table = torch.randn(4, 9, generator=g, requires_grad=True)
    sinks = torch.randn(4, generator=g, requires_grad=True)

    def f(q, k, v, slopes, table, sinks):
        mod = score_mods.softcap(3.0) >> score_mods.alibi(slopes) >> score_mods.relative_bias(table)
        return selfattn.attention(q, k, v, causal=True, score_mod=mod, sinks=sinks, dropout_p=0.2, dropout_seed=9)

    args = (q, k, v, slopes, table, sinks)
    explained = torch._dynamo.explain(f)(*args)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    want = f(*args)
    # compiled vs not: two float32 paths of one computation, nothing third-party to measure: rtol 1e-5 ~ 84 ulps (run on
    # the scalar, AVX2, AVX-512 kernels by make test-portable); a wrong mask, scale or position moves values by > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    d = torch.randn(got.shape, generator=g)
    for a, b, name in zip(torch.autograd.grad(got, args, d), torch.autograd.grad(want, args, d),
                          ["q", "k", "v", "slopes", "table", "sinks"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


def test_a_custom_score_mod_under_compile_says_what_to_do():
    import torch._dynamo

    torch._dynamo.reset()
    q = k = v = torch.randn(1, 2, 8, 16)

    def f(q, k, v):
        return selfattn.attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s * 2)

    with pytest.raises(Exception, match="ready-made"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
