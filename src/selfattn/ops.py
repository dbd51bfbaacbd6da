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

Ready-made score modifiers (``selfattn.score_mods``: softcap, ALiBi, relative and T5 biases, chained with ``>>``)
travel as plain data too: a string such as ``"softcap:30.0,alibi:0.0,relative:8.0"`` and the tensors they read
(slopes, tables); sinks as a tensor and dropout as (p, seed). A custom ``score_mod`` cannot cross the op boundary
and is refused under ``torch.compile`` with the fix.

The backward is a second op, ``selfattn::attention_backward``: it asks the chosen backend for the gradient given the
saved out and log-sum-exp (the block API, ``Backend.backward_block``), so nothing is recomputed but P. A gradient
with respect to ``bias`` is computed from the oracle's steps in float64 (the bias is O(N_q·N_k) anyway), and so are
the gradients of a modifier's tensors (slopes, tables); the sinks' gradient is O(N) from the saved out and lse.

Shapes follow ``selfattn.api``: q (B, H_q, N_q, D), k (B, H_kv, N_k, D), v (B, H_kv, N_k, D_v).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from selfattn import backends, masks, score_mods
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


def op_mods_for(call: AttentionCall) -> tuple[str, list[Tensor]]:
    """A ready-made score modifier as the op's (spec string "kind:param,...", tensors); ("", []) for none."""
    if call.score_mod is None:
        return "", []
    if call.score_mod.spec is None:
        raise TypeError(f"under torch.compile a score_mod crosses the selfattn custom op as plain data, which a custom "
                        f"function ({call.score_mod.name!r}) has not; use the ready-made ones of selfattn.score_mods "
                        "(softcap, alibi, relative_bias), or call selfattn.attention outside torch.compile")
    kinds, params, tensors = [], [], []
    for leaf in score_mods.leaves(call.score_mod.spec):
        kind = leaf[0]
        if kind == "softcap":
            kinds.append("softcap"), params.append(leaf[1])
        elif kind == "alibi":
            kinds.append("alibi"), params.append(0.0), tensors.append(leaf[1])
        elif kind == "relative":
            kinds.append("relative"), params.append(float(leaf[2])), tensors.append(leaf[1])
        else:  # ("t5", table, bidirectional, max_distance)
            kinds.append("t5" if leaf[2] else "t5-causal"), params.append(float(leaf[3])), tensors.append(leaf[1])
    return ",".join(f"{kind}:{param!r}" for kind, param in zip(kinds, params, strict=True)), tensors


def _build_mod(spec: str, tensors: list[Tensor]) -> score_mods.ScoreMod | None:
    mod, it = None, iter(tensors)
    for part in filter(None, spec.split(",")):
        kind, param = part.split(":")
        param = float(param)
        if kind == "softcap":
            m = score_mods.softcap(param)
        elif kind == "alibi":
            m = score_mods.alibi(next(it))
        elif kind == "relative":
            m = score_mods.relative_bias(next(it))
        else:
            table = next(it)
            m = score_mods.relative_bias(table, buckets=table.shape[1], bidirectional=kind == "t5",
                                         max_distance=int(param))
        mod = m if mod is None else mod >> m
    return mod


def forward(call: AttentionCall, backend: str | None) -> tuple[Tensor, Tensor]:
    """(out, lse) for a validated call: through the custom op while dynamo traces, else the backend directly."""
    if torch.compiler.is_compiling():
        return torch.ops.selfattn.attention(call.q, call.k, call.v, call.scale, *op_mask_for(call).args(), call.bias,
                                            backend, *op_mods_for(call), call.sinks, call.dropout_p,
                                            call.dropout_seed)
    return backends.choose(call, backend).forward(call)


# ---------------------------------------------------------------------------------------------------- the operator


def _call(q, k, v, scale, causal, window, key_lengths, key_starts, doc_ids, dense_mask, bias, mod_spec="",
          mod_tensors=(), sinks=None, dropout_p=0.0, dropout_seed=0) -> AttentionCall:
    op_mask = OpMask(causal, window, key_lengths, key_starts, doc_ids, dense_mask)
    return AttentionCall(q, k, v, scale, op_mask.build(q.shape[2], k.shape[2]), bias, causal,
                         score_mod=_build_mod(mod_spec, list(mod_tensors)), sinks=sinks,
                         dropout_p=dropout_p, dropout_seed=dropout_seed)


@torch.library.custom_op("selfattn::attention", mutates_args=())
def attention_op(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, window: int | None, key_lengths: Tensor | None,
    key_starts: Tensor | None, doc_ids: Tensor | None, dense_mask: Tensor | None, bias: Tensor | None,
    backend: str | None, mod_spec: str, mod_tensors: list[Tensor], sinks: Tensor | None, dropout_p: float,
    dropout_seed: int,
) -> tuple[Tensor, Tensor]:
    """out (B, H_q, N_q, D_v) in q's dtype and lse (B, H_q, N_q) float32, from the backend the registry chooses."""
    call = _call(q, k, v, scale, causal, window, key_lengths, key_starts, doc_ids, dense_mask, bias, mod_spec,
                 mod_tensors, sinks, dropout_p, dropout_seed)
    with torch.no_grad():  # the backward asks the same chooser for a block backend: both must pick the same one
        out, lse = backends.choose(call, backend, blocks=backend is None).forward(call)
    return out.contiguous(), lse.to(torch.float32).contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, scale, causal, window, key_lengths, key_starts, doc_ids, dense_mask, bias, backend,
                    mod_spec, mod_tensors, sinks, dropout_p, dropout_seed):
    B, H_q, N_q, _ = q.shape
    out = q.new_empty((B, H_q, N_q, v.shape[3]))
    lse = q.new_empty((B, H_q, N_q), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("selfattn::attention_backward", mutates_args=())
def attention_backward_op(
    d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, causal: bool,
    window: int | None, key_lengths: Tensor | None, key_starts: Tensor | None, doc_ids: Tensor | None,
    dense_mask: Tensor | None, bias: Tensor | None, backend: str | None, bias_grad: bool, mod_spec: str,
    mod_tensors: list[Tensor], sinks: Tensor | None, dropout_p: float, dropout_seed: int, mod_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """(dq, dk, dv, dbias, d mod_tensors) in the inputs' dtypes; dbias is empty unless ``bias_grad``, the
    modifier's tensors' gradients empty unless ``mod_grads``."""
    call = _call(q, k, v, scale, causal, window, key_lengths, key_starts, doc_ids, dense_mask, bias, mod_spec,
                 mod_tensors, sinks, dropout_p, dropout_seed)
    dmods = [t.new_empty(0) for t in mod_tensors]
    if bias_grad or mod_grads:
        dq, dk, dv, dbias, dmods = _oracle_backward(call, d_out, out, lse)
        dbias = _sum_to(dbias, bias.shape).to(bias.dtype) if bias_grad else q.new_empty(0)
        dmods = [g.to(t.dtype).contiguous() for g, t in zip(dmods, mod_tensors, strict=True)] if mod_grads else [
            t.new_empty(0) for t in mod_tensors]
    else:
        chosen = backends.choose(call, backend, blocks=backend is None)
        if not chosen.supports_blocks:
            raise BackendError(
                f"the selfattn custom op computes gradients with a backend's block API, which {chosen.name!r} lacks "
                f"(supports_blocks=False); pass backend= one of "
                f"{[n for n, b in backends.REGISTRY.items() if b.supports_blocks]}, or run without torch.compile"
            )
        with torch.no_grad():
            dq, dk, dv = chosen.backward_block(call, out, lse, d_out)
        dbias = q.new_empty(0)
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), dbias.contiguous(),
            dmods)


@attention_backward_op.register_fake
def _attention_backward_fake(d_out, q, k, v, out, lse, scale, causal, window, key_lengths, key_starts, doc_ids,
                             dense_mask, bias, backend, bias_grad, mod_spec, mod_tensors, sinks, dropout_p,
                             dropout_seed, mod_grads):
    # contiguous, like the real outputs (empty_like would copy the strides of a transposed q and mislead the graph)
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    dmods = [t.new_empty(t.shape) if mod_grads else t.new_empty(0) for t in mod_tensors]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias, dmods


def _oracle_backward(call: AttentionCall, d_out: Tensor, out: Tensor, lse: Tensor):
    """Every gradient from the oracle's float64 steps, by autograd through them: q, k, v, the bias (dS) and the
    modifier's tensors. O(N_q·N_k) memory, like the bias."""
    from selfattn import reference

    q, k, v = (t.detach().double().requires_grad_() for t in (call.q, call.k, call.v))
    bias = None if call.bias is None else call.bias.detach().double().requires_grad_()
    tensors = [t.detach().double().requires_grad_() for t in call.captures]
    mod = None
    if call.score_mod is not None:
        mod = _build_mod(op_mods_for(call)[0], tensors)
    wrt = [q, k, v] + ([bias] if bias is not None else []) + tensors

    def grad():
        s = reference.steps(q, k, v, scale=call.scale, mask=call.mask, bias=bias, score_mod=mod,
                            sinks=None if call.sinks is None else call.sinks.detach(), dropout_p=call.dropout_p,
                            dropout_seed=call.dropout_seed)
        return list(torch.autograd.grad(s.out, wrt, d_out.to(torch.float64), allow_unused=True))

    grads = score_mods.with_autograd(grad)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt, strict=True)]
    dq, dk, dv = grads[:3]
    dbias = grads[3] if bias is not None else None  # already in the bias's shape
    return dq, dk, dv, dbias, grads[3 + (bias is not None):]


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a (B, H_q, N_q, N_k) gradient to the shape of the bias that was broadcast to it."""
    while t.dim() > len(shape):
        t = t.sum(0)
    dims = [i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1]
    return t.sum(dims, keepdim=True) if dims else t


def _setup_context(ctx, inputs, output):
    (q, k, v, scale, causal, window, key_lengths, key_starts, doc_ids, dense_mask, bias, backend, mod_spec, mod_tensors,
     sinks, dropout_p, dropout_seed) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_lengths, key_starts, doc_ids, dense_mask, bias, sinks, *mod_tensors)
    ctx.scale, ctx.causal, ctx.window, ctx.backend = scale, causal, window, backend
    ctx.mods = (mod_spec, dropout_p, dropout_seed)
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[10]
    ctx.mod_grads = any(t.requires_grad for t in mod_tensors)
    ctx.sinks_grad = sinks is not None and ctx.needs_input_grad[14]
    ctx.mark_non_differentiable(lse)


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, key_lengths, key_starts, doc_ids, dense_mask, bias, sinks, *mod_tensors = ctx.saved_tensors
    mod_spec, dropout_p, dropout_seed = ctx.mods
    dq, dk, dv, dbias, dmods = attention_backward_op(
        d_out.contiguous(), q, k, v, out, lse, ctx.scale, ctx.causal, ctx.window, key_lengths, key_starts, doc_ids,
        dense_mask, bias, ctx.backend, ctx.bias_grad, mod_spec, mod_tensors, sinks, dropout_p, dropout_seed,
        ctx.mod_grads,
    )
    dsinks = score_mods.sinks_grad(out, lse, d_out, sinks) if ctx.sinks_grad else None
    dmods = list(dmods) if ctx.mod_grads else [None] * len(mod_tensors)  # one entry per tensor of the list input
    return (dq, dk, dv, None, None, None, None, None, None, None, (dbias if ctx.bias_grad else None), None, None,
            dmods, dsinks, None, None)


attention_op.register_autograd(_backward, setup_context=_setup_context)
