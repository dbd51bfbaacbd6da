"""``selfattn::attention`` as a PyTorch custom operator, so ``torch.compile(fullgraph=True)`` sees one opaque op.

Under ``torch.compile`` (dynamo), ``selfattn.attention`` validates its arguments in traced Python and then calls
``torch.ops.selfattn.attention``; the op picks a backend from the same registry and runs it eagerly, so the backends'
Python (block loops, thread pools, memory probes) never reaches the tracer and never breaks the graph. Outside of
compilation ``selfattn.attention`` calls the backend directly, keeping the backend's own autograd.

Masks are Python functions and cannot cross an op boundary. A ready-made mask (or an "and" of them) travels as plain
data — a causal flag, a window, key lengths and starts, document ids, a dense bool tensor — and is rebuilt inside the
op with ``selfattn.masks``, keeping its cheap block classification (``OpMask``). Any other mask (a custom
``mask_mod``, an "or" of masks) is evaluated by the traced code into a bool tensor broadcastable to (B, H_q, N_q, N_k)
and travels as the dense mask: correct, but O(N_q·N_k) memory.

The backward is a second op, ``selfattn::attention_backward``: it asks the chosen backend for the gradient given the
saved out and log-sum-exp (the block API, ``Backend.backward_block``), so nothing is recomputed but P. A gradient
with respect to ``bias`` is computed from the oracle's steps in float64 (the bias is O(N_q·N_k) anyway).

Shapes follow ``selfattn.api``: q (B, H_q, N_q, D), k (B, H_kv, N_k, D), v (B, H_kv, N_k, D_v).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfattn import backends, masks
from selfattn.backends import AttentionCall, BackendError


@dataclass(frozen=True)
class OpMask:
    """A conjunction of ready-made masks as the op's plain arguments (None = that part is absent)."""

    causal: bool = False
    window: int | None = None
    key_lengths: Tensor | None = None  # (B,) int64: keys at positions >= key_lengths[b] are hidden
    key_starts: Tensor | None = None  # (B,) int64: keys at positions < key_starts[b] are hidden (left padding)
    doc_ids: Tensor | None = None  # (N_k,) or (B, N_k)
    dense: Tensor | None = None  # bool, broadcastable to (B, H_q, N_q, N_k), True = visible

    @staticmethod
    def from_spec(spec: tuple | None, N_q: int, N_k: int) -> OpMask | None:
        """The op arguments for a mask ``spec`` (see ``masks.Mask``), or None when it is not a conjunction the op
        can carry (an "or", two document masks, a tensor mask made for other sizes)."""
        parts = {"causal": False, "window": None, "key_lengths": None, "key_starts": None, "doc_ids": None,
                 "dense": None}
        for leaf in _conjunction(spec):
            kind, *args = leaf
            if kind == "causal":
                parts["causal"] = True
            elif kind == "sliding_window":
                w = args[0]
                parts["window"] = w if parts["window"] is None else min(w, parts["window"])
            elif kind in ("key_padding", "key_range"):
                starts, ends = (None, args[0]) if kind == "key_padding" else args
                parts["key_lengths"] = _tighter(parts["key_lengths"], ends, torch.minimum)
                parts["key_starts"] = _tighter(parts["key_starts"], starts, torch.maximum)
            elif kind == "document" and parts["doc_ids"] is None:
                parts["doc_ids"] = args[0]
            elif kind == "tensor" and tuple(args[1:]) == (N_q, N_k):
                d = args[0]
                parts["dense"] = d if parts["dense"] is None else d & parts["dense"]
            else:
                return None
        return OpMask(**parts)

    def build(self, N_q: int, N_k: int) -> masks.Mask | None:
        """The Mask these arguments describe (inside the op)."""
        parts = []
        if self.causal:
            parts.append(masks.causal())
        if self.window is not None:
            parts.append(masks.sliding_window(self.window))
        if self.key_starts is not None:
            parts.append(masks.key_range(self.key_starts, self.key_lengths))
        elif self.key_lengths is not None:
            parts.append(masks.key_padding(self.key_lengths))
        if self.doc_ids is not None:
            parts.append(masks.document(self.doc_ids))
        if self.dense is not None:
            parts.append(masks.from_tensor(self.dense, N_q, N_k))
        mask = None
        for p in parts:
            mask = p if mask is None else mask & p
        return mask

    def args(self) -> tuple:
        return self.causal, self.window, self.key_lengths, self.key_starts, self.doc_ids, self.dense


def _tighter(old: Tensor | None, new: Tensor | None, op) -> Tensor | None:
    return new if old is None else old if new is None else op(old, new)


def _conjunction(spec: tuple | None) -> list[tuple]:
    if spec is None:
        return [("unknown",)]
    if spec[0] == "and":
        return _conjunction(spec[1]) + _conjunction(spec[2])
    return [spec]


def op_mask_for(call: AttentionCall) -> OpMask:
    """The op's mask arguments for a validated call; a mask without a usable spec is evaluated densely here (traced
    by dynamo when compiling) into a bool tensor broadcastable to (B, H_q, N_q, N_k)."""
    if call.mask is None:
        return OpMask()
    op_mask = OpMask.from_spec(call.mask.spec, call.N_q, call.N_k)
    if op_mask is not None:
        return op_mask
    b, h, q, k = masks.grid(call.B, call.H_q, call.N_q, call.N_k, call.device, q_pos0=call.q_start,
                            k_pos0=call.k_pos0)
    return OpMask(dense=call.mask.mask_mod(b, h, q, k))  # (B or 1, H_q or 1, N_q or 1, N_k or 1)


def forward(call: AttentionCall, backend: str | None) -> tuple[Tensor, Tensor]:
    """(out, lse) for a validated call: through the custom op while dynamo traces, else the backend directly."""
    if torch.compiler.is_compiling():
        return torch.ops.selfattn.attention(call.q, call.k, call.v, call.scale, *op_mask_for(call).args(), call.bias,
                                            backend)
    return backends.choose(call, backend).forward(call)


# ---------------------------------------------------------------------------------------------------- the operator


def _call(q, k, v, scale, causal, window, key_lengths, key_starts, doc_ids, dense_mask, bias) -> AttentionCall:
    op_mask = OpMask(causal, window, key_lengths, key_starts, doc_ids, dense_mask)
    return AttentionCall(q, k, v, scale, op_mask.build(q.shape[2], k.shape[2]), bias, causal)


@torch.library.custom_op("selfattn::attention", mutates_args=())
def attention_op(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, window: int | None, key_lengths: Tensor | None,
    key_starts: Tensor | None, doc_ids: Tensor | None, dense_mask: Tensor | None, bias: Tensor | None,
    backend: str | None,
) -> tuple[Tensor, Tensor]:
    """out (B, H_q, N_q, D_v) in q's dtype and lse (B, H_q, N_q) float32, from the backend the registry chooses."""
    call = _call(q, k, v, scale, causal, window, key_lengths, key_starts, doc_ids, dense_mask, bias)
    with torch.no_grad():
        out, lse = backends.choose(call, backend).forward(call)
    return out.contiguous(), lse.to(torch.float32).contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, scale, causal, window, key_lengths, key_starts, doc_ids, dense_mask, bias, backend):
    B, H_q, N_q, _ = q.shape
    out = q.new_empty((B, H_q, N_q, v.shape[3]))
    lse = q.new_empty((B, H_q, N_q), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("selfattn::attention_backward", mutates_args=())
def attention_backward_op(
    d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, causal: bool,
    window: int | None, key_lengths: Tensor | None, key_starts: Tensor | None, doc_ids: Tensor | None,
    dense_mask: Tensor | None, bias: Tensor | None, backend: str | None, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias) in the inputs' dtypes; dbias is empty unless ``bias_grad``."""
    call = _call(q, k, v, scale, causal, window, key_lengths, key_starts, doc_ids, dense_mask, bias)
    if bias_grad:
        dq, dk, dv, dbias = _oracle_backward(call, d_out)
        dbias = _sum_to(dbias, bias.shape).to(bias.dtype)
    else:
        chosen = backends.choose(call, backend)
        if not chosen.supports_blocks:
            raise BackendError(
                f"the selfattn custom op computes gradients with a backend's block API, which {chosen.name!r} lacks "
                f"(supports_blocks=False); pass backend= one of "
                f"{[n for n, b in backends.REGISTRY.items() if b.supports_blocks]}, or run without torch.compile"
            )
        with torch.no_grad():
            dq, dk, dv = chosen.backward_block(call, out, lse, d_out)
        dbias = q.new_empty(0)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dbias.contiguous()


@attention_backward_op.register_fake
def _attention_backward_fake(d_out, q, k, v, out, lse, scale, causal, window, key_lengths, key_starts, doc_ids,
                             dense_mask, bias, backend, bias_grad):
    # contiguous, like the real outputs (empty_like would copy the strides of a transposed q and mislead the graph)
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _oracle_backward(call: AttentionCall, d_out: Tensor):
    """Every gradient from the oracle's float64 steps: dS = P∘(dP − rowsum(dO∘O)) is also d(bias)."""
    from selfattn import reference

    with torch.no_grad():
        s = reference.steps(call.q, call.k, call.v, scale=call.scale, mask=call.mask, bias=call.bias)
        d_out = d_out.to(torch.float64)
        dv = s.weights.transpose(-2, -1) @ d_out  # (B, H_q, N_k, D_v)
        dp = d_out @ s.v.transpose(-2, -1)  # (B, H_q, N_q, N_k)
        ds = s.weights * (dp - (d_out * s.out).sum(-1, keepdim=True))
        dq = ds @ s.k * call.scale  # (B, H_q, N_q, D)
        dk = ds.transpose(-2, -1) @ s.q * call.scale  # (B, H_q, N_k, D)
        group = call.H_q // call.H_kv
        dk = dk.unflatten(1, (call.H_kv, group)).sum(2)  # (B, H_kv, N_k, D)
        dv = dv.unflatten(1, (call.H_kv, group)).sum(2)  # (B, H_kv, N_k, D_v)
    return dq, dk, dv, ds


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a (B, H_q, N_q, N_k) gradient to the shape of the bias that was broadcast to it."""
    while t.dim() > len(shape):
        t = t.sum(0)
    dims = [i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1]
    return t.sum(dims, keepdim=True) if dims else t


def _setup_context(ctx, inputs, output):
    q, k, v, scale, causal, window, key_lengths, key_starts, doc_ids, dense_mask, bias, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_lengths, key_starts, doc_ids, dense_mask, bias)
    ctx.scale, ctx.causal, ctx.window, ctx.backend = scale, causal, window, backend
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[10]
    ctx.mark_non_differentiable(lse)


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, key_lengths, key_starts, doc_ids, dense_mask, bias = ctx.saved_tensors
    dq, dk, dv, dbias = attention_backward_op(
        d_out.contiguous(), q, k, v, out, lse, ctx.scale, ctx.causal, ctx.window, key_lengths, key_starts, doc_ids,
        dense_mask, bias, ctx.backend, ctx.bias_grad,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, (dbias if ctx.bias_grad else None), None


attention_op.register_autograd(_backward, setup_context=_setup_context)
