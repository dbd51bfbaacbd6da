"""The Triton backend: FlashAttention-2-style kernels (``triton_kernels``) for CUDA tensors, forward and backward.

What it serves: fp16 / bf16 / fp32, head dims up to 256 (any size: padded to a power of two inside the kernel),
grouped-query attention without copying K/V, and the ready-made masks of ``selfattn.masks`` joined by ``&``:
``causal()``, ``sliding_window(w)``, ``key_padding(lengths)``, ``key_range(starts, ends)`` (left padding),
``document(doc_ids)`` (packed sequences). A mask is recognised by its ``Mask.spec`` and turned into kernel arguments
(``KernelMask``); a custom ``mask_mod``, an ``|`` of masks or a dense bool tensor are refused with the reason, and the
chooser goes on to the next backend (nothing silently changes meaning). An additive ``bias`` (ALiBi, T5's position
bias, a float mask with −inf entries) is read in place through its broadcast strides, tile by tile; when it requires
grad, the dQ kernel writes dS as its gradient (O(N_q·N_k), like the bias itself).

Score modifiers, sinks and dropout (``selfattn.score_mods``) are kernel arguments too (``KernelMod``): the ready-made
modifiers from their spec — ``softcap(cap)``, ``alibi(slopes)`` (per head or per batch element and head),
``relative_bias(table)`` (clamped or T5-bucketed: the host gathers the table at every distance the call has) — and
their ``>>`` compositions with at most one of each, the additive ones before or after the soft-cap; per-head
``sinks``; ``dropout_p`` with the oracle's counter-based mask. Gradients reach q, k, v, the bias, the sinks and the
ALiBi slopes (deterministically). A custom (spec-less) ``score_mod``, other compositions and a relative-bias table that
requires grad are declined with the reason.

Triton is imported when a call runs, never when selfattn is imported, and the GPU is not probed at import.

On CPU tensors the same kernels run under Triton's interpreter, for tests on machines without a GPU: set
``TRITON_INTERPRET=1`` in the environment *before* Triton is first imported and name the backend
(``attention(..., backend="triton")``). It is never chosen automatically for CPU tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from selfattn import score_mods
from selfattn.backends.base import AttentionCall, Backend, sum_to_bias

MAX_HEAD_DIM = 256


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # a file-system search: once per process


@functools.cache
def _cuda_available() -> bool:
    return torch.cuda.is_available()  # asked on the first call, never at import


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class _NoKernelForm(Exception):
    """A mask the kernels cannot express; the message is the reason shown to the user."""


@dataclass(frozen=True)
class KernelMask:
    """A recognised mask as kernel arguments. Positions: query row i at q_pos0 + i, key j at k_pos0 + j.

    causal: k_pos <= q_pos.  window: also k_pos > q_pos − window (0 = no window).
    key_lengths (B,) int32: key j of batch b exists when key_starts[b] <= j < key_lengths[b] (both given or neither).
    key_starts (B,) int32: the first real key of each batch element (left padding); zeros for right padding only.
    doc_ids (B or 1, N_doc): q sees k when doc_ids[q_pos] == doc_ids[k_pos] (queries outside 0..N_doc see nothing).
    runs: (run_lo, run_hi), each (B or 1, N_doc) int32, when every document is one contiguous run of positions:
    the half-open range of positions of the run holding each position — lets the kernels skip whole blocks.
    """

    causal: bool = False
    window: int = 0
    key_lengths: Tensor | None = None
    key_starts: Tensor | None = None
    doc_ids: Tensor | None = None
    runs: tuple[Tensor, Tensor] | None = None


@dataclass(frozen=True)
class KernelMod:
    """A ready-made score modifier, sinks and dropout as kernel arguments (see ``triton_kernels._modify``).

    alibi / rel: 0 absent, 1 added before the soft-cap, 2 after it (or without one). slopes (B or 1, H_q) float32;
    rel_bias (H_q, N_q + N_k − 1) float32: the table at distance k_pos − q_pos = rel_d0 + column. seed: the dropout
    hash's mixed seed and thr = round(p·2³²), both as the int32 with the same bits as the uint32 value."""

    softcap: float = 0.0
    alibi: int = 0
    slopes: Tensor | None = None
    rel: int = 0
    rel_bias: Tensor | None = None
    rel_d0: int = 0
    dropout: bool = False
    seed: int = 0
    thr: int = 0
    drop_scale: float = 1.0


_TRANSLATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Mask -> {(B, N_k, k_pos0, device): ...}


def kernel_mask(call: AttentionCall) -> KernelMask:
    """Translate ``call.mask`` (via its spec) into kernel arguments; raises _NoKernelForm with the reason.

    Remembered per Mask object and shape, so a mask reused by every layer (and asked twice per call, by the chooser
    and by the forward) is translated, and its tensors moved to the GPU, once."""
    if call.mask is None:
        return KernelMask()
    # the spec's tensors' version counters: a lengths or ids tensor changed in place is translated again (inference
    # tensors have no counter)
    tensors = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in _spec_tensors(call.mask.spec))
    key = (call.B, call.N_k, call.k_pos0, str(call.device), tensors)
    per_mask = _TRANSLATED.setdefault(call.mask, {})
    if key not in per_mask:
        if len(per_mask) > 8:
            per_mask.clear()
        try:
            per_mask[key] = _translate(call)
        except _NoKernelForm as e:
            per_mask[key] = str(e)
    if isinstance(per_mask[key], str):
        raise _NoKernelForm(per_mask[key])
    return per_mask[key]


def _spec_tensors(spec) -> list[Tensor]:
    if spec is None:
        return []
    return [t for part in spec for t in ([part] if isinstance(part, Tensor) else
                                         _spec_tensors(part) if isinstance(part, tuple) else [])]


def _translate(call: AttentionCall) -> KernelMask:
    if call.mask.spec is None:
        raise _NoKernelForm(
            f"mask {call.mask.name!r} is a custom mask_mod, which the kernels cannot evaluate; they take the "
            "ready-made masks (causal, sliding_window, key_padding, key_range, document) joined by &"
        )
    causal, window, starts, lengths, docs = False, 0, [], [], []
    for kind, *args in _conjuncts(call.mask.spec):
        if kind == "causal":
            causal = True
        elif kind == "sliding_window":
            causal, window = True, args[0] if window == 0 else min(window, args[0])
        elif kind == "key_padding":
            lengths.append(_key_rows(args[0], call, "key_padding lengths"))
        elif kind == "key_range":
            starts.append(_key_rows(args[0], call, "key_range starts"))
            if args[1] is not None:
                lengths.append(_key_rows(args[1], call, "key_range ends"))
        elif kind == "document":
            docs.append(args[0])
        else:
            raise _NoKernelForm(f"mask part {kind!r} has no kernel form")
    if len(docs) > 1:
        raise _NoKernelForm("more than one document mask; join the ids into one document(doc_ids)")
    key_lengths = key_starts = None
    if lengths or starts:  # one flag (HAS_LEN) carries both bounds: absent ones become 0 and N_k
        full = torch.full((call.B,), call.N_k, device=call.device)
        key_lengths = torch.stack([full, *lengths]).amin(0).clamp(0, call.N_k).to(torch.int32).contiguous()
        key_starts = torch.stack([full * 0, *starts]).amax(0).clamp(0, call.N_k).to(torch.int32).contiguous()
    doc_ids, runs = (_document(docs[0], call) if docs else (None, None))
    return KernelMask(causal, window, key_lengths, key_starts, doc_ids, runs)


def _conjuncts(spec: tuple) -> list[tuple]:
    kind = spec[0]
    if kind == "and":
        return _conjuncts(spec[1]) + _conjuncts(spec[2])
    if kind == "or":
        raise _NoKernelForm("an | of masks has no kernel form (the kernels take masks joined by & only)")
    if kind == "tensor":
        raise _NoKernelForm("a dense bool mask tensor has no kernel form; express it with causal / sliding_window / "
                            "key_padding / document masks where it is one of those")
    return [spec]


def _key_rows(positions: Tensor, call: AttentionCall, what: str) -> Tensor:
    if positions.shape != (call.B,):
        raise _NoKernelForm(f"{what} have shape {tuple(positions.shape)}, expected (B,) = ({call.B},)")
    return (positions.to(call.device) - call.k_pos0).clamp(min=0)  # masks count positions; the kernel counts rows


def _document(doc_ids: Tensor, call: AttentionCall):
    ids = doc_ids if doc_ids.dim() == 2 else doc_ids[None]  # (B or 1, N_doc)
    n = ids.shape[-1]
    if ids.shape[0] not in (1, call.B):
        raise _NoKernelForm(f"document ids have batch size {ids.shape[0]}, expected 1 or B={call.B}")
    if call.k_pos0 < 0 or call.k_pos0 + call.N_k > n:
        raise _NoKernelForm(f"document ids cover positions 0..{n - 1} but the keys sit at "
                            f"{call.k_pos0}..{call.k_pos0 + call.N_k - 1}")
    ids = ids.to(call.device).contiguous()
    pos = torch.arange(n, device=ids.device).expand_as(ids)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    n_runs = starts.sum(1)
    by_id = ids.sort(1).values
    n_docs = (by_id[:, 1:] != by_id[:, :-1]).sum(1) + 1
    if not torch.equal(n_runs, n_docs):  # a document split into several runs: compare ids everywhere, skip nothing
        return ids, None
    run_lo = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
    run_hi = (torch.where(ends, pos + 1, torch.full_like(pos, n)).flip(1).cummin(1).values).flip(1)
    return ids, (run_lo.to(torch.int32).contiguous(), run_hi.to(torch.int32).contiguous())


def _as_int32_bits(u: int) -> int:
    """A uint32 value as the int32 with the same bits: a kernel argument of one type whatever its value."""
    return u - (1 << 32) if u >= 1 << 31 else u


def kernel_mod(call: AttentionCall) -> KernelMod:
    """Translate ``call.score_mod`` (via its spec) and dropout into kernel arguments; raises _NoKernelForm with the
    reason. Sinks need no translation (a (H_q,) tensor)."""
    kw = {}
    mod = call.score_mod
    if mod is not None:
        if mod.spec is None:
            raise _NoKernelForm(
                f"score_mod {mod.name!r} is a custom function, which the kernels cannot evaluate; they take the "
                "ready-made modifiers (softcap, alibi, relative_bias) and their >> compositions")
        leaves = _mod_leaves(mod.spec)
        kinds = [leaf[0] for leaf in leaves]
        for kind, what in (("softcap", "soft-caps"), ("alibi", "ALiBi terms"), ("table", "relative-bias tables")):
            if sum(k == kind or (kind == "table" and k in ("relative", "t5")) for k in kinds) > 1:
                raise _NoKernelForm(f"score_mod {mod.name!r} has more than one of its {what}; the kernels take at "
                                    "most one soft-cap, one ALiBi and one relative bias")
        cap_at = kinds.index("softcap") if "softcap" in kinds else -1
        for at, leaf in enumerate(leaves):
            where = 1 if at < cap_at else 2  # added before the soft-cap, or after it (or with none)
            if leaf[0] == "softcap":
                kw["softcap"] = float(leaf[1])
            elif leaf[0] == "alibi":
                kw.update(alibi=where, slopes=_slopes(leaf[1], call))
            else:
                kw.update(rel=where, **_relative(leaf, call))
    if call.dropout_p:
        thr = int(round(call.dropout_p * 2**32))
        if thr >= 2**32:
            raise _NoKernelForm(f"dropout_p={call.dropout_p} rounds to 1 in the 32-bit hash (every weight dropped)")
        seed = score_mods._mix(call.dropout_seed & 0xFFFFFFFF)
        kw.update(dropout=True, seed=_as_int32_bits(seed), thr=_as_int32_bits(thr),
                  drop_scale=1.0 / (1.0 - call.dropout_p))
    return KernelMod(**kw)


def _mod_leaves(spec: tuple) -> list[tuple]:
    if spec[0] == "then":
        return _mod_leaves(spec[1]) + _mod_leaves(spec[2])
    if spec[0] not in ("softcap", "alibi", "relative", "t5"):
        raise _NoKernelForm(f"score_mod part {spec[0]!r} has no kernel form")
    return [spec]


def _slopes(slopes: Tensor, call: AttentionCall) -> Tensor:
    if slopes.shape not in ((call.H_q,), (call.B, call.H_q)):
        raise _NoKernelForm(f"alibi slopes have shape {tuple(slopes.shape)}, expected (H_q,) = ({call.H_q},) or "
                            f"(B, H_q) = ({call.B}, {call.H_q})")
    return slopes.detach().to(call.device, torch.float32).reshape(-1, call.H_q).contiguous()


def _relative(leaf: tuple, call: AttentionCall) -> dict:
    """The table read at every distance k_pos − q_pos of this call: (H_q, N_q + N_k − 1) float32, O(H·N)."""
    table = leaf[1]
    if table.shape[0] != call.H_q:
        raise _NoKernelForm(f"relative_bias table has {table.shape[0]} rows, expected H_q = {call.H_q}")
    if table.requires_grad and torch.is_grad_enabled():
        raise _NoKernelForm("relative_bias's table requires grad: its gradient sums dS along the diagonals of the "
                            "score matrix, which the kernels do not compute (the tiled and reference backends do)")
    d0 = call.k_pos0 - (call.q_start + call.N_q - 1)  # the smallest distance: first key, last query
    d = torch.arange(d0, d0 + call.N_q + call.N_k - 1, device=table.device)
    if leaf[0] == "relative":
        col = d.clamp(-leaf[2], leaf[2]) + leaf[2]
    else:
        col = score_mods.t5_bucket(d, leaf[2], table.shape[1], leaf[3])
    return dict(rel_bias=table.detach()[:, col].to(call.device, torch.float32).contiguous(), rel_d0=d0)


# -------------------------------------------------------------------------------------------------------- launches


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


# Block sizes under the interpreter: small, and different for rows and keys so that both tilings are exercised.
INTERPRETER_BLOCKS = {"fwd": (16, 32), "dkdv": (16, 32), "dq": (32, 16)}
# Under the interpreter the forward loads K/V through tensor descriptors (the TMA variant that the GPU's autotuner
# may choose) when this is True and the call allows it; the tests run both variants.
INTERPRETER_TMA = False


def tma_ok(call: AttentionCall) -> bool:
    """May the forward read K and V through tensor descriptors (Hopper's TMA)? The descriptor wants a unit last
    stride, 16-byte aligned rows and base, and whole tiles of the head dim (D a power of two, no padding); on a GPU
    also compute capability 9 (Hopper) or newer."""
    if call.dtype not in (torch.float16, torch.bfloat16) or _pow2(call.D) != call.D or _pow2(call.D_v) != call.D_v:
        return False
    for t in (call.k, call.v):
        e = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * e % 16 for st in t.stride()[:-1]):
            return False
    if interpreting():
        return True
    return torch.cuda.get_device_capability(call.device)[0] >= 9


def _ensure_allocator() -> None:
    """Descriptors made inside a kernel need a little global scratch memory from Triton's allocator; give it one
    backed by torch's caching allocator, unless the program already set its own (it is per thread/context)."""
    import triton

    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # a Triton without this module: set ours
        pass
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _launch(name: str, grid_rows: int, n_programs: int, args: list, flags: dict):
    """Launch kernel ``name`` over (row tiles × n_programs) programs: fixed small tiles under the interpreter,
    autotuned tiles on a GPU (or the default tiles when SELFATTN_TRITON_AUTOTUNE=0)."""
    from selfattn.backends import triton_kernels as tk

    tile = "BLOCK_N" if name == "attn_bwd_dkdv" else "BLOCK_M"
    if interpreting():
        bm, bn = INTERPRETER_BLOCKS[name.removeprefix("attn_").removeprefix("bwd_")]
        rows = bn if tile == "BLOCK_N" else bm
        if name == "attn_fwd":
            flags = dict(flags, TMA=INTERPRETER_TMA and flags["TMA_OK"])
        getattr(tk, name)[(triton_cdiv(grid_rows, rows) * n_programs,)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn)
        return
    if flags.get("TMA_OK"):
        _ensure_allocator()
    from selfattn.backends import triton_tuning

    if triton_tuning.autotuning():
        triton_tuning.tuned(name)[lambda meta: (triton_cdiv(grid_rows, meta[tile]) * n_programs,)](*args, **flags)
    else:
        config = triton_tuning.default_config(name, max(flags["BLOCK_D"], flags["BLOCK_DV"]))
        getattr(tk, name)[(triton_cdiv(grid_rows, config[tile]) * n_programs,)](*args, **flags, **config)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _mask_args(m: KernelMask, call: AttentionCall):
    dummy = call.q  # never read: the constexpr flags switch the loads off
    docs = m.doc_ids if m.doc_ids is not None else dummy
    run_lo, run_hi = m.runs if m.runs is not None else (dummy, dummy)
    s_doc_b = docs.stride(0) if m.doc_ids is not None and docs.shape[0] > 1 else 0
    s_doc_n = docs.stride(1) if m.doc_ids is not None else 0
    n_doc = docs.shape[1] if m.doc_ids is not None else 0
    klen = m.key_lengths if m.key_lengths is not None else dummy
    kstart = m.key_starts if m.key_starts is not None else dummy
    return klen, kstart, docs, run_lo, run_hi, s_doc_b, s_doc_n, n_doc


def _bias_args(call: AttentionCall) -> list:
    """The bias as a (B, H_q, N_q, N_k) view (stride 0 where it broadcasts: nothing is copied) and its strides."""
    if call.bias is None:
        return [call.q, 0, 0, 0, 0]  # never read: HAS_BIAS switches the loads off
    bias = call.bias.detach()
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(call.B, call.H_q, call.N_q, call.N_k)
    return [bias, *bias.stride()]


def _mod_args(call: AttentionCall, km: KernelMod) -> tuple[list, list, list]:
    """(pointers SLOPES, RELD; strides s_sl_b, s_rel_h; scalars rel_d0, cap2, seed, drop_thr, drop_scale)."""
    dummy = call.q  # never read: the constexpr flags switch the loads off
    slopes = km.slopes if km.slopes is not None else dummy
    rel = km.rel_bias if km.rel_bias is not None else dummy
    s_sl_b = slopes.stride(0) if km.slopes is not None and km.slopes.shape[0] > 1 else 0
    s_rel_h = rel.stride(0) if km.rel_bias is not None else 0
    cap2 = km.softcap * _LOG2E if km.softcap else 1.0  # the cap in the kernels' log2 units
    return [slopes, rel], [s_sl_b, s_rel_h], [km.rel_d0, cap2, km.seed, km.thr, km.drop_scale]


def _constexprs(call: AttentionCall, m: KernelMask, km: KernelMod) -> dict:
    return dict(HAS_BIAS=call.bias is not None, SOFTCAP=km.softcap > 0, ALIBI=km.alibi, REL=km.rel,
        DROPOUT=km.dropout,
        HEAD_D=call.D, HEAD_DV=call.D_v, BLOCK_D=_pow2(call.D), BLOCK_DV=_pow2(call.D_v),
        CAUSAL=m.causal, WINDOW=m.window > 0, HAS_LEN=m.key_lengths is not None, HAS_DOC=m.doc_ids is not None,
        DOC_RUNS=m.runs is not None, PRECISION="ieee" if call.dtype == torch.float32 else "tf32",
        UPCAST=interpreting() and call.dtype == torch.bfloat16,
    )


def _tune_keys(call: AttentionCall) -> tuple[int, int]:
    """Autotuning is redone per power-of-two bucket of lengths (all lengths above 4096 share one), not per length."""
    return tuple(min(1 << max(n - 1, 0).bit_length(), 4096) for n in (call.N_q, call.N_k))


def _on(device: torch.device):
    """Launch on the tensors' GPU, not on the current one (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _forward(call: AttentionCall, m: KernelMask, km: KernelMod, out_dtype: torch.dtype | None = None,
             sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    with _on(call.device):
        return _forward_here(call, m, km, out_dtype, sinks)


def _forward_here(call: AttentionCall, m: KernelMask, km: KernelMod, out_dtype: torch.dtype | None,
                  sinks: Tensor | None) -> tuple[Tensor, Tensor]:
    """(out, lse); with ``sinks`` (H_q,) they join every row's softmax (lse is then the final one)."""
    q, k, v = call.q, call.k, call.v
    out = torch.empty(call.B, call.H_q, call.N_q, call.D_v, dtype=out_dtype or call.dtype, device=call.device)
    lse = torch.empty(call.B, call.H_q, call.N_q, dtype=torch.float32, device=call.device)
    klen, kstart, docs, run_lo, run_hi, s_doc_b, s_doc_n, n_doc = _mask_args(m, call)
    bias, *bias_strides = _bias_args(call)
    mod_ptrs, mod_strides, mod_scalars = _mod_args(call, km)
    sink_ptr = sinks.detach().to(torch.float32).contiguous() if sinks is not None else call.q
    args = [q, k, v, out, lse, klen, kstart, docs, run_lo, run_hi, bias, *mod_ptrs, sink_ptr, *q.stride(),
            *k.stride(), *v.stride(), *out.stride(), s_doc_b, s_doc_n, *bias_strides, *mod_strides, call.H_q,
            call.N_q, call.N_k, n_doc, call.H_q // call.H_kv, call.q_start, call.k_pos0, m.window,
            call.scale * _LOG2E, *mod_scalars, *_tune_keys(call)]
    flags = _constexprs(call, m, km) | {"TMA_OK": tma_ok(call), "HAS_SINK": sinks is not None}
    _launch("attn_fwd", call.N_q, call.B * call.H_q, args, flags)
    return out, lse


def _backward(call: AttentionCall, m: KernelMask, km: KernelMod, out: Tensor, lse: Tensor, d_out: Tensor,
              d_lse: Tensor | None, grad_dtype: torch.dtype | None = None, bias_grad: bool = False,
              slope_grad: bool = False):
    """(dq, dk, dv, dbias, dslope): dbias (B, H_q, N_q, N_k) float32 with ``bias_grad``, dslope (B, H_q) float64
    (Σ dS·(k_pos − q_pos), to be summed over B for per-head slopes) with ``slope_grad``, else None. ``out`` and
    ``lse`` are the final ones (with the sinks when there are)."""
    with _on(call.device):
        return _backward_here(call, m, km, out, lse, d_out, d_lse, grad_dtype, bias_grad, slope_grad)


def _backward_here(call: AttentionCall, m: KernelMask, km: KernelMod, out: Tensor, lse: Tensor, d_out: Tensor,
                   d_lse: Tensor | None, grad_dtype: torch.dtype | None, bias_grad: bool, slope_grad: bool):
    q, k, v = call.q, call.k, call.v
    # delta_i = Σ_d dO·O (the softmax Jacobian's row term). A gradient flowing into lse adds P·d_lse to dS, which is
    # the same as subtracting d_lse from delta.
    delta = torch.empty_like(lse)
    d_lse = d_lse.float().contiguous() if d_lse is not None else lse
    rows = 16 if interpreting() else 64
    from selfattn.backends import triton_kernels as tk

    tk.attn_bwd_delta[(triton_cdiv(call.N_q, rows) * call.B * call.H_q,)](
        out, d_out, d_lse, delta, *out.stride(), *d_out.stride(), call.H_q, call.N_q, HEAD_DV=call.D_v,
        BLOCK_DV=_pow2(call.D_v), HAS_DLSE=d_lse is not lse, BLOCK_M=rows)
    dq, dk, dv = (torch.empty(t.shape, dtype=grad_dtype or t.dtype, device=t.device) for t in (q, k, v))
    klen, kstart, docs, run_lo, run_hi, s_doc_b, s_doc_n, n_doc = _mask_args(m, call)
    mod_ptrs, mod_strides, mod_scalars = _mod_args(call, km)
    common = [call.q_start, call.k_pos0, m.window, call.scale * _LOG2E, call.scale, *mod_scalars, *_tune_keys(call)]
    flags = _constexprs(call, m, km)
    bias, *bias_strides = _bias_args(call)
    args = [q, k, v, d_out, lse, delta, dk, dv, klen, kstart, docs, run_lo, run_hi, bias, *mod_ptrs, *q.stride(),
            *k.stride(), *v.stride(), *d_out.stride(), *dk.stride(), *dv.stride(), s_doc_b, s_doc_n, *bias_strides,
            *mod_strides, call.H_q, call.H_kv, call.N_q, call.N_k, n_doc, call.H_q // call.H_kv, *common]
    _launch("attn_bwd_dkdv", call.N_k, call.B * call.H_kv, args, flags)
    # dS is the bias's gradient: written whole (O(N_q·N_k), like the bias), zeros where no block was visited
    dbias = (torch.zeros(call.B, call.H_q, call.N_q, call.N_k, dtype=torch.float32, device=call.device)
             if bias_grad else None)
    # each query row's share of the slopes' gradient in its own slot (every row is written): summed below in order
    dslope = torch.empty(call.B, call.H_q, call.N_q, dtype=torch.float32, device=call.device) if slope_grad else None
    args = [q, k, v, d_out, lse, delta, dq, klen, kstart, docs, run_lo, run_hi, bias,
            dbias if bias_grad else call.q, *mod_ptrs, dslope if slope_grad else call.q, *q.stride(), *k.stride(),
            *v.stride(), *d_out.stride(), *dq.stride(), s_doc_b, s_doc_n, *bias_strides, *mod_strides, call.H_q,
            call.N_q, call.N_k, n_doc, call.H_q // call.H_kv, *common]
    _launch("attn_bwd_dq", call.N_q, call.B * call.H_q, args, flags | {"BIAS_GRAD": bias_grad,
                                                                       "SLOPE_GRAD": slope_grad})
    return dq, dk, dv, dbias, (dslope.double().sum(-1) if slope_grad else None)


_LOG2E = 1.4426950408889634  # 1/ln 2: the scale is multiplied by it once so the kernels use exp2


class _Attention(torch.autograd.Function):
    """One autograd Function for every variant; the score modifier's captured tensors (ALiBi slopes, a relative-bias
    table) come last, so that autograd asks for their gradients."""

    @staticmethod
    def forward(ctx, q, k, v, bias, sinks, call: AttentionCall, m: KernelMask, km: KernelMod, *captures):
        out, lse = _forward(call, m, km, sinks=sinks)
        ctx.save_for_backward(q, k, v, bias, sinks, out, lse)
        ctx.call, ctx.kmask, ctx.kmod = call, m, km
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, bias, sinks, out, lse = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros_like(out)
        call = dataclasses.replace(ctx.call, q=q, k=k, v=v, bias=bias)
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        captures = call.captures
        slopes = ctx.kmod.slopes  # the kernels' float32 (B or 1, H_q) copy of the ALiBi slopes, if any
        slope_at = [n for n, t in enumerate(captures) if ctx.needs_input_grad[8 + n] and slopes is not None
                    and _is_alibi_slopes(call.score_mod.spec, t)]
        dq, dk, dv, dbias, dslope = _backward(call, ctx.kmask, ctx.kmod, out, lse, d_out, d_lse,
                                              bias_grad=bias_grad, slope_grad=bool(slope_at))
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[4]:
            dsinks = score_mods.sinks_grad(out, lse, d_out, sinks)
            if d_lse is not None:  # L' = logaddexp(L, sink): d sink = P_sink · d_lse as well
                p_sink = torch.exp(sinks.double().view(1, -1, 1) - lse.double())
                dsinks = dsinks + (p_sink * d_lse.double()).sum((0, 2)).to(sinks.dtype)
        by_capture = [None] * len(captures)
        for n in slope_at:
            t = captures[n]
            by_capture[n] = (dslope if t.dim() == 2 else dslope.sum(0)).to(t.device, t.dtype)
        return (dq, dk, dv, (sum_to_bias(dbias, bias) if bias_grad else None), dsinks, None, None, None,
                *by_capture)


def _is_alibi_slopes(spec: tuple, t: Tensor) -> bool:
    return any(leaf[0] == "alibi" and leaf[1] is t for leaf in _mod_leaves(spec))


# --------------------------------------------------------------------------------------------------------- backend


@dataclass(frozen=True)
class TritonBackend(Backend):
    def unavailable_reasons(self) -> list[str]:
        if not _triton_installed():
            return ["triton not installed (pip install 'selfattn[gpu]')"]
        if not interpreting() and not _cuda_available():
            return ["no CUDA GPU"]
        return []

    def device_types(self) -> frozenset[str]:
        return self.devices | {"cpu"} if interpreting() else self.devices

    def call_reasons(self, call: AttentionCall) -> list[str]:
        reasons = []
        for translate in (kernel_mask, kernel_mod):
            try:
                translate(call)
            except _NoKernelForm as e:
                reasons.append(str(e))
        return reasons

    def forward(self, call: AttentionCall) -> tuple[Tensor, Tensor]:
        m, km = kernel_mask(call), kernel_mod(call)
        if call.q.numel() == 0 or call.k.numel() == 0:
            out = call.q.new_zeros(call.B, call.H_q, call.N_q, call.D_v)
            lse = torch.full(out.shape[:-1], -math.inf, device=call.device)
            if call.sinks is not None:  # the sink is the row's only term
                lse = call.sinks.detach().float().view(1, -1, 1).expand_as(lse).clone()
            return out, lse
        if call.needs_grad:
            return _Attention.apply(call.q, call.k, call.v, call.bias, call.sinks, call, m, km, *call.captures)
        return _forward(call, m, km, sinks=call.sinks)

    def forward_block(self, call: AttentionCall) -> tuple[Tensor, Tensor]:
        """(out, lse) in float32 for one block of a larger attention (positions q_pos0 / k_pos0), no autograd. Sinks
        are not applied here: the caller joins them once the blocks are merged."""
        with torch.no_grad():
            if call.q.numel() == 0 or call.k.numel() == 0:
                out = call.q.new_zeros(call.B, call.H_q, call.N_q, call.D_v, dtype=torch.float32)
                return out, torch.full(out.shape[:-1], -math.inf, device=call.device)
            return _forward(call, kernel_mask(call), kernel_mod(call), out_dtype=torch.float32)

    def backward_block(self, call: AttentionCall, out: Tensor, lse: Tensor, d_out: Tensor):
        """This key block's share of (dq, dk, dv), float32, given the rows' *final* out and lse. d_out is rounded to
        the input dtype for the tensor-core products (as in the fused backward)."""
        with torch.no_grad():
            if call.q.numel() == 0 or call.k.numel() == 0:
                return tuple(torch.zeros(t.shape, device=t.device) for t in (call.q, call.k, call.v))
            return _backward(call, kernel_mask(call), kernel_mod(call), out, lse.float().contiguous(),
                             d_out.to(call.dtype), None, grad_dtype=torch.float32)[:3]


BACKEND = TritonBackend(
    name="triton",
    description="FlashAttention-2-style Triton kernels (fwd + deterministic bwd); CUDA, or the CPU interpreter "
                "when TRITON_INTERPRET=1 and named",
    devices=frozenset({"cuda"}),
    auto_devices=frozenset({"cuda"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    head_dims=(1, MAX_HEAD_DIM),
    supports_bias=True,
    supports_blocks=True,
    supports_score_mods=True,  # the ready-made ones (kernel_mod declines the rest, with the reason)
    supports_sinks=True,
    supports_dropout=True,
)
