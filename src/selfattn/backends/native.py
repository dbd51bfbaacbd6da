"""The native backend: selfattn's own fused C++ kernel on the CPU (``src/selfattn/csrc/attention.cpp``).

How it differs from the oracle, and how a call reaches the kernel:

* float32 arithmetic with FlashAttention-2's tiling and online softmax, forward and backward, in one C++ kernel
  that applies the score modifier, the bias, the mask and dropout to each row of a tile while it is in cache.
  bfloat16 / float16 inputs are computed in float32: the forward converts each K / V tile as it reads it (no copy of
  the cache per decoding step), the backward works on float32 copies; float64 is left to ``tiled`` and the oracle
  (it is the checking dtype).
* What the kernel reads is prepared here, once per call, in O(N) memory:
  - the mask: plain causal goes by positions; any other mask becomes a table of EMPTY / PARTIAL / FULL tiles (its
    ``block_states``) and the bits of its PARTIAL tiles, made by its own ``mask_mod`` (tiles at the same offset of a
    shift-invariant mask share their bits). A mask whose partial tiles would need more than ``MAX_MASK_BYTES`` of
    bits is declined (``tiled`` evaluates it tile by tile).
  - additive ready-made score modifiers (ALiBi, relative and T5 biases) depend on kv_idx − q_idx only: they become
    one float per head and distance, ``dist`` (B or 1, H_q, N_q + N_k − 1), made by the modifiers themselves with
    torch operations, so autograd carries the kernel's ``d dist`` on to slopes and tables;
  - a soft-cap is a number; a custom Python ``score_mod`` is declined (``tiled`` runs it with autograd);
  - dropout: the per-row and per-key halves of ``score_mods``'s counter-based hash, made by the extension
    (``dropout_halves``, the same bits as ``score_mods.dropout_rows`` / ``dropout_cols``), the per-score round by the
    kernel, so the dropped weights are the oracle's bit for bit;
  - sinks join each row's softmax in the forward's last step (what ``score_mods.add_sinks`` does after a kernel),
    and their gradient is O(N).
* Work is split over the cores by (batch, query-head group, query block) in the forward, with the query heads of a
  grouped-query group folded into one tile's rows, and by key ranges as well when there are few rows
  (flash-decoding); by (batch, K/V head, key block) in the backward.

The kernel is compiled at install (``setup.py``), once per instruction set PyTorch dispatches on; the variant that
matches ``torch.backends.cpu.get_cpu_capability()`` is loaded. Without it, ``unavailable_reasons`` says why and how
to build it, and ``tiled`` serves the CPU.
"""

from __future__ import annotations

import importlib
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from selfattn import masks, score_mods
from selfattn.backends.base import AttentionCall, Backend

# Tiles: query rows x keys per kernel tile. The forward folds the heads of a group into one tile's rows
# (FORWARD_ROWS rows in all); the backward holds four BQ x BK float tiles per core.
FORWARD_ROWS = 128
FORWARD_BK = 512
BACKWARD_BQ = 128
BACKWARD_BK = 256
MAX_MASK_BYTES = 256 << 20  # bits of partial tiles a call may prepare; beyond it the call is tiled's
# Flash-decoding: with fewer work items than this many per core, the keys are split too, in ranges of at least
# SPLIT_MIN_KEYS (below that the parts' merge costs more than a second core gains).
SPLIT_ITEMS_PER_CORE = 2
SPLIT_MIN_KEYS = 1024

_ISAS = {"AVX512": ("avx512", "avx2", "default"), "AVX2": ("avx2", "default")}
_HOW = "build it with `pip install --no-build-isolation -e .` (needs torch installed first and g++)"
_LOADED: dict = {}
_LOCK = threading.Lock()


def extension():
    """The compiled module for this CPU's instruction set, or None; ``load_error()`` says why."""
    with _LOCK:
        if "module" not in _LOADED:
            _LOADED["module"], _LOADED["error"] = _load()
        return _LOADED["module"]


def load_error() -> str | None:
    extension()
    return _LOADED["error"]


def _load():
    capability = torch.backends.cpu.get_cpu_capability()
    tried = []
    for isa in _ISAS.get(capability, ("default",)):
        try:
            return importlib.import_module(f"selfattn._native_{isa}"), None
        except ImportError as e:
            tried.append(f"_native_{isa}: {e}")
    return None, (f"not built (no compiled kernel for {capability} here: {'; '.join(tried)}); {_HOW}")


# ---------------------------------------------------------------------------------------------------- call → kernel


@dataclass
class _Plan:
    """The kernel's arguments for one call, except q, k, v (and dist, which carries gradients)."""

    BQ: int
    BK: int
    mask_kind: int = 0  # 0 none, 1 causal from positions, 2 block table + partial bits
    states: Tensor | None = None
    bits_at: Tensor | None = None
    bits: Tensor | None = None
    mask_heads: int = 1  # 1 when the mask does not depend on h
    extras: dict = field(default_factory=dict)


def _mask_plan(call: AttentionCall, BQ: int, BK: int) -> _Plan | str:
    """The mask as the kernel reads it, or the reason it cannot."""
    mask = call.mask
    if mask is None:
        return _Plan(BQ, BK)
    if mask.spec == ("causal",):
        return _Plan(BQ, BK, mask_kind=1)
    key = _mask_key(call, BQ, BK)
    if key is not None and key in _MASK_CACHE:
        return _MASK_CACHE[key]
    B, H, N_q, N_k = call.B, call.H_q, call.N_q, call.N_k
    st = mask.block_states(B, H, N_q, N_k, BQ, BK, q_pos0=call.q_start, k_pos0=call.k_pos0)
    st = st.reshape(-1, st.shape[-2], st.shape[-1])
    lo, hi = st.amin(0), st.amax(0)
    states = torch.where(hi == masks.EMPTY, masks.EMPTY, torch.where(lo == masks.FULL, masks.FULL, masks.PARTIAL))
    states = states.to(torch.int8).contiguous()
    partial = (states == masks.PARTIAL).nonzero().tolist()
    shift_invariant = _shift_invariant(mask.spec)
    by_offset: dict = {}
    tiles: list[Tensor] = []
    at = torch.full(states.shape, -1, dtype=torch.int32)
    for qb, kb in partial:
        q0, k0 = qb * BQ, kb * BK
        nr, nk = min(BQ, N_q - q0), min(BK, N_k - k0)
        offset = (call.q_start + q0 - call.k_pos0 - k0, nr, nk)
        if shift_invariant and offset in by_offset:
            at[qb, kb] = by_offset[offset]
            continue
        b, h, qi, ki = masks.grid(B, H, nr, nk, q_pos0=call.q_start + q0, k_pos0=call.k_pos0 + k0)
        m = mask.mask_mod(b, h, qi, ki)
        m = m.expand(*m.shape[:2], nr, nk)
        tiles.append(torch.nn.functional.pad(m, (0, BK - nk, 0, BQ - nr)))
        at[qb, kb] = by_offset[offset] = len(tiles) - 1
        if len(tiles) * m.shape[0] * m.shape[1] * BQ * BK > MAX_MASK_BYTES:
            return (f"the mask's partial tiles would need over {MAX_MASK_BYTES >> 20} MiB of bits "
                    "(tiled evaluates them tile by tile)")
    Bm = max([t.shape[0] for t in tiles], default=1)
    Hm = max([t.shape[1] for t in tiles], default=1)
    bits = torch.stack([t.expand(Bm, Hm, BQ, BK) for t in tiles]) if tiles else \
        torch.zeros(0, 1, 1, BQ, BK, dtype=torch.bool)
    plan = _Plan(BQ, BK, 2, states, at, bits.to(torch.uint8).contiguous(), Hm)
    if key is not None:
        if len(_MASK_CACHE) > 64:
            _MASK_CACHE.clear()
        _MASK_CACHE[key] = plan
    return plan


_MASK_CACHE: dict = {}


def _mask_key(call: AttentionCall, BQ: int, BK: int):
    """A cache key for masks described by plain data without tensors (windows, causal combinations), else None."""
    spec = call.mask.spec
    if spec is None or not _plain(spec):
        return None
    return spec, call.B, call.H_q, call.N_q, call.N_k, call.q_start, call.k_pos0, BQ, BK


def _shift_invariant(spec) -> bool:
    if spec is None:
        return False
    if spec[0] in ("and", "or"):
        return _shift_invariant(spec[1]) and _shift_invariant(spec[2])
    return spec[0] in ("causal", "sliding_window")


def _modifier(call: AttentionCall) -> tuple[float, list, bool] | str:
    """(soft-cap or 0, additive ready-made modifiers, whether they come after the cap), or why not; kept on the
    modifier object (frozen: its spec never changes)."""
    mod = call.score_mod
    if mod is None:
        return 0.0, [], True
    found = mod.__dict__.get("_native_modifier")
    if found is None:
        found = _split_modifier(mod)
        object.__setattr__(mod, "_native_modifier", found)
    return found


def _split_modifier(mod) -> tuple[float, list, bool] | str:
    if mod.spec is None:
        return f"a custom score_mod ({mod.name}) runs as Python on tiles: the tiled backend takes it"
    leaves = score_mods.leaves(mod.spec)
    caps = [i for i, leaf in enumerate(leaves) if leaf[0] == "softcap"]
    if len(caps) > 1:
        return "more than one soft-cap in a chain"
    cap = leaves[caps[0]][1] if caps else 0.0
    at = caps[0] if caps else len(leaves)
    before, after = leaves[:at], leaves[at + 1:]
    if before and after:
        return "additive modifiers both before and after the soft-cap"
    return cap, [score_mods.from_spec(leaf) for leaf in before + after], not before


def _dist(call: AttentionCall, additive: list) -> Tensor | None:
    """Σ of the additive modifiers by head and distance d = kv_pos − q_pos: (B or 1, H_q, N_q + N_k − 1) float32,
    index d − d_min, unit stride along d. Differentiable in the slopes and tables when they require grad; otherwise
    a view of a table kept per modifier object (``_dist_view``), so a decoding step or a layer that reuses its
    modifier does not make it again."""
    if not additive:
        return None
    d_min = call.k_pos0 - (call.q_start + call.N_q - 1)
    L = call.N_q + call.N_k - 1
    if call.score_mod.trains:
        return _dist_table(call.B, call.H_q, additive, d_min, L)
    return _dist_view(call.score_mod, additive, call.B, call.H_q, d_min, L)


def _dist_view(mod, additive: list, B: int, H_q: int, d_min: int, L: int) -> Tensor:
    """Distances d_min .. d_min + L − 1 of the table kept for ``mod``."""
    lo, table = _dist_kept(mod, additive, B if _per_batch(additive) else 1, H_q, d_min, L)
    return table.narrow(-1, d_min - lo, L)


def _dist_kept(mod, additive: list, B_d: int, H_q: int, d_min: int, L: int) -> tuple[int, Tensor]:
    """(lo, table): the table kept for ``mod``, distances lo .. lo + n − 1 ⊇ d_min .. d_min + L − 1 (made again,
    larger, when they leave it, or when its tensors were edited in place). B_d: B if the table is per batch, else 1.
    The kernel reads it whole, from lo (a decoding step then makes no view)."""
    # (a table made under inference_mode cannot be saved for a backward: kept apart)
    key = (B_d, H_q, torch.is_inference_mode_enabled(),
           tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in mod.captures))
    kept = _DIST_TABLES.get(mod)
    if kept is None or kept[0] != key or not kept[1] <= d_min <= d_min + L <= kept[1] + kept[2].shape[-1]:
        lo, hi = d_min, d_min + L
        if kept is not None and kept[0] == key:  # what was there too
            lo, hi = min(lo, kept[1]), max(hi, kept[1] + kept[2].shape[-1])
        lo, n = lo - (hi - lo), 3 * (hi - lo)  # room on both sides: a growing cache extends it rarely
        with torch.no_grad():
            kept = _DIST_TABLES[mod] = (key, lo, _dist_table(B_d, H_q, additive, lo, n))
    return kept[1], kept[2]


def _per_batch(additive: list) -> bool:
    return any(m.spec[0] == "alibi" and m.spec[1].dim() == 2 for m in additive)


def _dist_table(B: int, H_q: int, additive: list, lo: int, n: int) -> Tensor:
    """The modifiers' Σ for distances lo .. lo + n − 1: (B or 1, H_q, n) float32, contiguous."""
    b = torch.arange(B if _per_batch(additive) else 1).view(-1, 1, 1, 1)
    h = torch.arange(H_q).view(1, -1, 1, 1)
    qi = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    ki = torch.arange(lo, lo + n).view(1, 1, 1, n)
    zero = torch.zeros((), dtype=torch.float32)
    total = sum(m.score_mod(zero, b, h, qi, ki).float() for m in additive)
    return total.expand(b.shape[0], H_q, 1, n).reshape(b.shape[0], H_q, n).contiguous()


_DIST_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ScoreMod -> (key, lo, table)


def _dropout(call: AttentionCall):
    if not call.dropout_p:
        return None, None, 0, 1.0
    # score_mods.dropout_rows / dropout_cols for this call's rows and keys, made by the extension (a few µs, where the
    # Python expressions cost 0.2 ms): tests/test_native.py checks that the two agree bit for bit
    rows, cols = (_EXT[0] or extension()).dropout_halves(call.dropout_seed & 0xFFFFFFFF, call.B, call.H_q,
                                                         call.q_start, call.N_q, call.k_pos0, call.N_k)
    return rows, cols, int(round(call.dropout_p * 2**32)), 1.0 / (1.0 - call.dropout_p)


def _bias(call: AttentionCall) -> Tensor | None:
    if call.bias is None:
        return None
    bias = call.bias.detach().float()
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    if bias.shape[-1] > 1 and bias.stride(-1) != 1:
        bias = bias.contiguous()
    return bias.expand(call.B, call.H_q, call.N_q, call.N_k)


def _tiles(call: AttentionCall, phase: str) -> tuple[int, int, int]:
    """(BQ, BK, fold): query rows per head in a tile, keys per tile, query heads folded into a tile's rows."""
    group = call.H_q // call.H_kv
    if phase == "backward":
        return min(BACKWARD_BQ, call.N_q), BACKWARD_BK, 1
    fold = group
    BQ = max(1, min(call.N_q, max(16, FORWARD_ROWS // fold)))
    return BQ, FORWARD_BK, fold


def _args(call: AttentionCall, plan: _Plan, dist: Tensor | None, d_min: int, cap: float, after: bool):
    drop_rows, drop_cols, T, drop_scale = plan.extras["dropout"]
    return dict(scale=call.scale, q_start=call.q_start, k_pos0=call.k_pos0, mask_kind=plan.mask_kind, BQ=plan.BQ,
                BK=plan.BK, states=plan.states, bits_at=plan.bits_at, bits=plan.bits, cap=cap, dist=dist, d_min=d_min,
                dist_after_cap=after, bias=plan.extras["bias"], drop_rows=drop_rows, drop_cols=drop_cols, drop_T=T,
                drop_scale=drop_scale)


def _prepare(call: AttentionCall, phase: str) -> _Plan:
    BQ, BK, fold = _tiles(call, phase)
    plan = _mask_plan(call, BQ, BK)
    if isinstance(plan, str):
        raise ValueError(f"backend 'native' cannot serve this call: {plan}; pass backend='tiled'")
    plan = _Plan(plan.BQ, plan.BK, plan.mask_kind, plan.states, plan.bits_at, plan.bits, plan.mask_heads)
    plan.extras.update(fold=fold if plan.mask_heads == 1 else 1, bias=_bias(call), dropout=_dropout(call))
    return plan


def _f32(t: Tensor) -> Tensor:
    """float32 rows the kernel's GEMMs can read (the backward, and block calls): see ``_rows``."""
    return _rows(t if t.dtype is torch.float32 else t.float())


def _rows(t: Tensor) -> Tensor:
    """Rows the kernel can read, in t's dtype: unit stride along D, and rows at least D apart (BLAS's leading
    dimension; overlapping or expanded rows are copied). The forward reads bf16 / fp16 itself, tile by tile."""
    if t.is_contiguous():  # the common case, checked cheaply (it runs per call)
        return t
    unit = t.shape[-1] <= 1 or t.stride(-1) == 1
    rows_apart = t.shape[-2] <= 1 or t.stride(-2) >= t.shape[-1]
    return t if unit and rows_apart else t.contiguous()


def _splits(call: AttentionCall, plan: _Plan) -> int:
    return _split_count(call.B, call.H_q, plan.extras["fold"], call.N_q, plan.BQ, plan.BK, call.N_k)


def _split_count(B: int, H_q: int, fold: int, N_q: int, BQ: int, BK: int, N_k: int) -> int:
    """Key ranges per work item (flash-decoding) when there are fewer than SPLIT_ITEMS_PER_CORE items per core."""
    items = B * (H_q // fold) * -(-N_q // BQ)
    cores = torch.get_num_threads()
    n_kb = -(-N_k // BK)
    if items >= SPLIT_ITEMS_PER_CORE * cores or N_k < 2 * SPLIT_MIN_KEYS:
        return 1
    want = -(-SPLIT_ITEMS_PER_CORE * cores // items)
    return max(1, min(want, N_k // SPLIT_MIN_KEYS, n_kb))


def forward_f32(call: AttentionCall, q: Tensor, k: Tensor, v: Tensor, dist: Tensor | None,
                sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out, lse) float32, no autograd; q, k, v float32, or bf16 / fp16 (converted tile by tile). ``sinks`` (H_q,)
    join each row's softmax in the kernel's last step (as ``score_mods.add_sinks`` would after it)."""
    launch = _launch(call)
    drop_rows, drop_cols, T, drop_scale = _dropout(call)
    ext = _EXT[0] or extension()
    return ext.forward(q, k, v, call.scale, launch.q_start, call.k_pos0, *launch.mask_args, launch.cap, dist,
                       launch.d_min, launch.after, _bias(call), drop_rows, drop_cols, T, drop_scale, launch.fold,
                       launch.splits, None if sinks is None else sinks.detach().float().contiguous())
    # (positional: pybind's keyword matching cost 2 µs of a decoding step)


@dataclass(frozen=True)
class _Launch:
    """What the forward kernel is told about a call besides its tensors: the same for every call of one signature
    (shapes, positions, the mask's and modifier's plain structure, the thread count), so it is made once and kept
    (a decoding step then costs the kernel and a dictionary lookup)."""

    q_start: int
    mask_args: tuple  # mask_kind, BQ, BK, states, bits_at, bits
    cap: float
    after: bool
    d_min: int
    fold: int
    splits: int


def _launch(call: AttentionCall) -> _Launch:
    key = _launch_key(call)
    launch = _LAUNCHES.get(key) if key is not None else None
    if launch is None:
        cap, _, after = call_modifier(call)
        plan = _prepare(call, "forward")
        mask_args = (plan.mask_kind, plan.BQ, plan.BK, plan.states, plan.bits_at, plan.bits)
        launch = _Launch(call.q_start, mask_args, cap, after, call.k_pos0 - (call.q_start + call.N_q - 1),
                         plan.extras["fold"], _splits(call, plan))
        if key is not None:
            if len(_LAUNCHES) >= _LAUNCHES_MAX:
                _LAUNCHES.clear()
            _LAUNCHES[key] = launch
    return launch


def _launch_key(call: AttentionCall):
    """The signature a launch plan depends on, or None when the mask holds tensors (its plan reads their values)."""
    mask, mod = call.mask, call.score_mod
    mask_key = None
    if mask is not None:
        mask_key = mask.__dict__.get("_native_key")
        if mask_key is None:
            mask_key = mask.spec if mask.spec is not None and _plain(mask.spec) else False
            object.__setattr__(mask, "_native_key", mask_key)  # frozen objects that never change their spec
        if mask_key is False:
            return None
    mod_key = None
    if mod is not None:
        mod_key = mod.__dict__.get("_native_key")
        if mod_key is None:
            mod_key = _skeleton(mod.spec) if mod.spec is not None else False
            object.__setattr__(mod, "_native_key", mod_key)
    return (call.q.shape, call.k.shape, call.v.shape, call.q_pos0, call.k_pos0, mask_key, mod_key,
            torch.get_num_threads())


def _plain(spec) -> bool:
    return all(_plain(s) if isinstance(s, tuple) else not isinstance(s, Tensor) for s in spec)


def _skeleton(spec) -> tuple:
    return tuple(tuple(p.shape) if isinstance(p, Tensor) else _skeleton(p) if isinstance(p, tuple) else p
                 for p in spec)


_LAUNCHES: dict = {}
_LAUNCHES_MAX = 1024
_EXT: list = [None]  # the loaded extension, once a call has been admitted (NativeBackend.unavailable_reasons)


def backward_f32(call: AttentionCall, q, k, v, dist, out, lse, d_out, dist_grad: bool = True):
    """(dq, dk, dv, d_dist or None) float32 given the final out and lse (sinks included); ``dist_grad=False``: the
    table's gradient is not wanted (a fixed ALiBi, a block of ring attention), and the kernel skips it."""
    cap, _, after = call_modifier(call)
    plan = _prepare(call, "backward")
    d_min = call.k_pos0 - (call.q_start + call.N_q - 1)
    out, d_out, lse = (t.float().contiguous() for t in (out, d_out, lse))  # the kernel makes rowsum(dO * O) itself
    grads = extension().backward(q, k, v, out, d_out, lse, **_args(call, plan, dist, d_min, cap, after),
                                 dist_grad=dist_grad)
    return (*grads[:3], grads[3] if len(grads) > 3 else None)


def call_modifier(call: AttentionCall):
    mod = _modifier(call)
    if isinstance(mod, str):
        raise ValueError(mod)
    return mod


class _NativeAttention(torch.autograd.Function):
    """q, k, v (float32, or bf16 / fp16 read by the forward itself), dist (or None) and sinks (or None) in; out
    (float32) and lse out. The backward works in float32: it converts q, k, v when it runs."""

    @staticmethod
    def forward(ctx, q, k, v, dist, sinks, call: AttentionCall):
        out, lse = forward_f32(call, q, k, v, None if dist is None else dist.detach(), sinks)
        ctx.save_for_backward(q, k, v, dist, sinks, out, lse)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, dist, sinks, out, lse = ctx.saved_tensors
        dq, dk, dv, d_dist = backward_f32(ctx.call, _f32(q), _f32(k), _f32(v), dist, out, lse, d_out,
                                          dist_grad=ctx.needs_input_grad[3])
        d_sinks = score_mods.sinks_grad(out, lse, d_out, sinks) if sinks is not None and ctx.needs_input_grad[4] \
            else None
        return dq, dk, dv, d_dist, d_sinks, None


@dataclass(frozen=True)
class NativeBackend(Backend):
    def unavailable_reasons(self) -> list[str]:
        _EXT[0] = extension()
        return [] if _EXT[0] is not None else [load_error()]

    def call_reasons(self, call: AttentionCall) -> list[str]:
        reasons = []
        mod = _modifier(call)
        if isinstance(mod, str):
            reasons.append(mod)
        if call.bias is not None and call.bias.requires_grad and torch.is_grad_enabled():
            reasons.append("the gradient of a dense bias is a N_q x N_k tensor: the tiled backend makes it")
        if call.dropout_p and round(call.dropout_p * 2**32) >= 2**32:
            reasons.append(f"dropout_p={call.dropout_p} rounds to 1 in 32 bits")
        if call.mask is not None and call.mask.block_fn is None and \
                call.B * call.H_q * call.N_q * call.N_k > MAX_MASK_BYTES:
            reasons.append(f"a mask without a block classifier ({call.mask.name}) would need its bits for all "
                           f"{call.B * call.H_q * call.N_q * call.N_k:,} scores, over {MAX_MASK_BYTES >> 20} MiB: "
                           "the tiled backend evaluates it tile by tile")
        return reasons

    def forward(self, call: AttentionCall):
        dist = None
        if call.score_mod is not None:
            _, additive, _ = call_modifier(call)
            dist = _dist(call, additive)
        if call.needs_grad:  # bf16 / fp16 as given: the forward reads them (bf16 products where the CPU has them)
            out, lse = _NativeAttention.apply(_rows(call.q), _rows(call.k), _rows(call.v), dist, call.sinks, call)
        else:  # nothing here needs autograd: the kernel's outputs carry none; half precision is converted per tile
            out, lse = forward_f32(call, _rows(call.q), _rows(call.k), _rows(call.v), dist, call.sinks)
        return (out if out.dtype == call.dtype else out.to(call.dtype)), lse

    def repeat(self, call: AttentionCall):
        """For later calls that differ from this one only in N_k (a decoding step: the cache grows by one), with no
        mask or plain causal, and a ready-made modifier without gradients at most (its table by distance is a view
        per call): nothing else the kernel is told depends on N_k but what ``run`` works out."""
        if call.mask is not None and call.mask.spec != ("causal",) or call.q_pos0 is not None or call.k_pos0:
            return None
        launch, ext, scale, dtype = _launch(call), extension(), call.scale, call.dtype
        B, H_q, N_q, fold, BQ, BK = call.B, call.H_q, call.N_q, launch.fold, launch.mask_args[1], launch.mask_args[2]
        if call.needs_grad:  # a training step: the autograd function, with this call's mask for the backward
            if call.score_mod is not None:
                return None
            mask, causal = call.mask, call.causal

            def run_grad(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
                out, lse = _NativeAttention.apply(_rows(q), _rows(k), _rows(v), None, None,
                                                  AttentionCall(q, k, v, scale, mask, None, causal))
                return (out if out.dtype is dtype else out.to(dtype)), lse
            return run_grad
        mod, (_, additive, _) = call.score_mod, call_modifier(call)
        kind, cap, after = launch.mask_args[0], launch.cap, launch.after  # (no mask tables: none or plain causal)
        # this signature's rows and heads fix everything in _split_count but N_k: few work items split the keys
        few = B * (H_q // fold) * -(-N_q // BQ) < SPLIT_ITEMS_PER_CORE * torch.get_num_threads()
        forward = ext.forward

        B_d = (B if _per_batch(additive) else 1) if additive else 0

        def run(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            # (the fixed cost of a decoding step: each line here was timed, a few hundred ns at a time)
            N_k = k.shape[2]
            d_min, dist = _dist_kept(mod, additive, B_d, H_q, 1 - N_k, N_q + N_k - 1) if additive else (0, None)
            splits = _split_count(B, H_q, fold, N_q, BQ, BK, N_k) if few and N_k >= 2 * SPLIT_MIN_KEYS else 1
            out, lse = forward(q if q.is_contiguous() else _rows(q), k if k.is_contiguous() else _rows(k),
                               v if v.is_contiguous() else _rows(v), scale, N_k - N_q, 0, kind, BQ, BK, None, None,
                               None, cap, dist, d_min, after, None, None, None, 0, 1.0, fold, splits, None)
            return (out if out.dtype is dtype else out.to(dtype)), lse
        return run

    def forward_block(self, call: AttentionCall):
        _, additive, _ = call_modifier(call)
        with torch.no_grad():
            dist = _dist(call, additive)
            return forward_f32(call, _f32(call.q), _f32(call.k), _f32(call.v), dist)

    def backward_block(self, call: AttentionCall, out, lse, d_out):
        _, additive, _ = call_modifier(call)
        with torch.no_grad():
            dist = _dist(call, additive)
            return backward_f32(call, _f32(call.q), _f32(call.k), _f32(call.v), dist, out, lse, d_out,
                                dist_grad=False)[:3]


BACKEND = NativeBackend(
    name="native",
    description="selfattn's fused C++ CPU kernel (FlashAttention-2 tiling; modifiers, masks, dropout fused; "
                "float32 arithmetic, bf16/fp16 in and out)",
    devices=frozenset({"cpu"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    supports_blocks=True,
    supports_score_mods=True,
    supports_sinks=True,
    supports_dropout=True,
)


def describe() -> str:
    """One line for ``selfattn info``."""
    mod = extension()
    if mod is None:
        return f"native: {load_error()}"
    blas = "MKL sgemm" if mod.uses_mkl() else "plain loops (no MKL in this torch: slow)"
    ok, why = mod.bf16_dot()
    bf16 = "oneDNN brgemm (AVX512-BF16)" if ok else f"converted to float32 ({why})"
    return (f"native: built for {mod.isa} (CPU capability {torch.backends.cpu.get_cpu_capability()}), GEMM: {blas}, "
            f"bf16 products: {bf16}")


__all__ = ["BACKEND", "extension", "load_error", "describe"]
