"""The tiled backend: exact attention in O(N) memory, forward and backward, default for CPU tensors.

How it differs from the oracle (``selfattn.reference``), which materialises the N_q x N_k matrices in float64:

* The score matrix is cut into tiles of ``block_q`` query rows x ``block_k`` keys. The mask's block classifier
  (``Mask.block_states``, FlexAttention's block mask) labels each tile EMPTY, PARTIAL or FULL; EMPTY tiles are never
  computed, PARTIAL tiles apply the mask element by element, FULL tiles need no mask at all.
* Forward: for each block of query rows, every maximal run of FULL tiles (and every run of PARTIAL tiles, with its
  mask and bias as an additive float mask) is handed to PyTorch's fused CPU flash kernel, which keeps a running
  maximum and sum in float32 and returns the log-sum-exp; runs are merged exactly by log-sum-exp. Only O and the
  per-row log-sum-exp (lse) are kept for the backward. float64 inputs (the checking dtype) take FlashAttention-2's
  online softmax in plain torch operations instead, so that the backward sees bit-identical scores.
* Backward, two ways to the same numbers: with at least ``KERNEL_BACKWARD_MIN_HEADS`` heads per core, the fused
  kernel's backward on the same runs, given the final O and lse (it parallelises over heads). Otherwise (B = H = 1,
  float64) plain torch operations with float32 accumulation: for each block of keys, the probabilities of every
  non-empty tile are recomputed from the saved lse, P = exp(S·scale − lse), and dV += Pᵀ·dO, dS = P∘(dP − δ) with
  δ = rowsum(dO∘O), dQ += dS·K·scale, dK += dSᵀ·Q·scale; key blocks are spread over a small thread pool (torch ops
  release the GIL), each worker with its own dQ accumulator, so one head uses every core. On that path bfloat16
  and float16 inputs are upcast to float32.
* Grouped-query attention never copies K or V: the ``group = H_q / H_kv`` query heads that share a key/value head
  are stacked along the row axis of that head ("folded"), so one matrix product serves the whole group and dK, dV
  come out summed over it.

Shapes follow the legend of ``selfattn.api``; Z = B·H_kv is the batch of matrix products, R = group·rows.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from selfattn import masks, score_mods
from selfattn.backends.base import AttentionCall, Backend, dense_rows, merge_by_lse, sum_to_bias

BLOCK_Q = 256  # query rows per tile: big enough that one tile's matrix products dwarf the Python overhead
# Query rows per call of the fused kernel when the mask is nothing or plain causal: the kernel then runs as fast as
# on the whole sequence (with 256 rows it lost ~25%), and it skips the upper half of a causal diagonal run itself.
DENSE_BLOCK_Q = 1024
BLOCK_K = 256  # keys per tile: the granularity at which masked regions are skipped
# The fused kernel's backward parallelises over batch x heads only: it is used when there are at least this many
# (key/value) heads per core; fewer heads (B = H = 1) take the tiled backward, parallel over key blocks. It is also
# slow on short runs (measured: 75 ms per 256-row call of a sliding window), so only no mask and plain causal use it.
KERNEL_BACKWARD_MIN_HEADS = 2
# Query rows per fused-kernel call when an additive score modifier (ALiBi, a relative bias) travels as the kernel's
# additive mask. With no mask or a shift-invariant one (causal, sliding windows) the mask of every run is a strided
# view of one band per head (see _band), and a block is N_q / 8 rows within these bounds: measured (causal, H = 8),
# fewer and larger blocks save the backward's per-call dK, dV sums (at 16k, 256 rows cost 1.5x no modifier, 1,024
# rows 1.18x), while the computed upper half of each diagonal block stays an eighth of the work or less.
ADDITIVE_BLOCK_Q = 512
BAND_BLOCK_Q = (256, 1024)

# Packed sequences (a document mask whose documents are contiguous, & causal or a sliding window, queries aligned
# with keys): the forward runs the fused kernel document by document, as if each were its own call (a causal one is
# then one kernel call that skips its upper triangle itself), when the documents average at least this many tokens.
# Shorter ones are cheaper as tiles that hold several documents (fewer kernel calls).
DOCUMENT_SPLIT_MIN_MEAN = 128

# PyTorch's fused CPU flash kernel, (out, lse) = _FLASH(q, k, v, dropout_p, is_causal, attn_mask=, scale=); its
# direct binding where torch has one (the op packet's Python dispatch costs a few microseconds per call)
_FLASH = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None) or \
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

# Half precision. The fused kernel computes bfloat16 / float16 in its own vector code, which is fast only where the
# CPU has half-precision arithmetic (AVX512-BF16, AMX, AVX512-FP16): on an AVX2 CPU (AMD EPYC Zen 3) its backward
# was measured 7x (bfloat16) and 11x (float16) slower than float32's, while its bfloat16 forward was as fast. So
# each phase's schedule is measured once per dtype on first use (``half_schedule``): "native" runs the kernel in the
# inputs' dtype, "float32" upcasts q, k, v (and dO) — O(N) copies — runs float32 and returns the inputs' dtype.
# SELFATTN_HALF=native|float32 skips the measurement.
HALF_DTYPES = (torch.float16, torch.bfloat16)
_HALF_SCHEDULES: dict = {}
_HALF_LOCK = threading.Lock()


def half_schedule(dtype: torch.dtype) -> dict[str, str]:
    """{"forward": s, "backward": s}, s = "native" or "float32", for ``dtype`` on this CPU (measured once)."""
    forced = os.environ.get("SELFATTN_HALF")
    if forced is not None:
        if forced not in ("native", "float32"):
            raise ValueError(f"SELFATTN_HALF must be 'native' or 'float32', got {forced!r}; unset it to measure")
        return {"forward": forced, "backward": forced}
    with _HALF_LOCK:
        if dtype not in _HALF_SCHEDULES:
            _HALF_SCHEDULES[dtype] = _measure_half(dtype)
        return _HALF_SCHEDULES[dtype]


def _measure_half(dtype: torch.dtype) -> dict[str, str]:
    """Time the fused kernel's forward and backward on a small causal problem (4 heads x 512 x 64) in ``dtype``
    and in float32, best of 3, interleaved; a phase runs natively unless that is over 1.15x float32's time."""
    import time

    fwd, bwd = _FLASH, _FLASH_BACKWARD
    g = torch.Generator().manual_seed(0)
    x32 = [torch.randn(1, 4, 512, 64, generator=g) for _ in range(4)]
    best = {}
    with torch.no_grad():
        for _ in range(3):
            for dt in (dtype, torch.float32):
                q, k, v, d_out = (t.to(dt) for t in x32)
                t0 = time.perf_counter()
                out, lse = fwd(q, k, v, is_causal=True)[:2]
                t1 = time.perf_counter()
                bwd(d_out, q, k, v, out, lse, 0.0, True)
                t2 = time.perf_counter()
                for phase, t in (("forward", t1 - t0), ("backward", t2 - t1)):
                    best[dt, phase] = min(best.get((dt, phase), math.inf), t)
    return {phase: "float32" if best[dtype, phase] > 1.15 * best[torch.float32, phase] else "native"
            for phase in ("forward", "backward")}


def _upcast_if_slow(call: AttentionCall, phase: str) -> AttentionCall:
    """The call in float32 when ``phase`` of its half-precision dtype runs faster that way on this CPU."""
    if call.dtype not in HALF_DTYPES or half_schedule(call.dtype)[phase] == "native":
        return call
    return dataclasses.replace(call, q=call.q.float(), k=call.k.float(), v=call.v.float())


# Tiles computed since the last reset, by phase ("forward", "backward"): lets tests check that skipping skips.
TILE_COUNTS: Counter = Counter()
_COUNT_LOCK = threading.Lock()


@contextmanager
def _one_thread():
    """Run small operations (tile masks, merges, accumulations) on the calling thread only. Each parallel region
    costs a wake-up of every intra-op thread: next to other busy processes that is milliseconds, 10x the work of a
    tile's mask (measured: a 0.5M-element masked_fill took 19 ms on 2 threads of a loaded machine, 2 ms on one).
    The thread count is per calling thread (OpenMP's and MKL's local settings)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Plan:
    """Which tiles of one call are computed, and how. ``states`` (n_qb, n_kb) int8 is EMPTY/PARTIAL/FULL for every
    batch element and head at once (a tile is FULL only if it is FULL for all of them, EMPTY only if EMPTY for all)."""

    call: AttentionCall
    block_q: int
    block_k: int
    states: Tensor
    cache: dict = field(default_factory=dict, compare=False)  # tile masks of shift-invariant masks, by offset

    @property
    def group(self) -> int:
        return self.call.H_q // self.call.H_kv

    def q_range(self, i: int) -> tuple[int, int]:
        return i * self.block_q, min((i + 1) * self.block_q, self.call.N_q)

    def k_range(self, j: int) -> tuple[int, int]:
        return j * self.block_k, min((j + 1) * self.block_k, self.call.N_k)

    def runs(self, i: int) -> list[tuple[int, int, bool]]:
        """Maximal runs (j0, j1, masked) of non-empty tiles in query block i; FULL and PARTIAL tiles apart."""
        out: list[tuple[int, int, bool]] = []
        for j, s in enumerate(self.states[i].tolist()):
            if s == masks.EMPTY:
                continue
            masked = s == masks.PARTIAL
            if out and out[-1][1] == j and out[-1][2] == masked:
                out[-1] = (out[-1][0], j + 1, masked)
            else:
                out.append((j, j + 1, masked))
        return out

    def offset(self, q0: int, k0: int) -> int:
        """Position of query row q0 minus position of key k0."""
        return self.call.q_start + q0 - (self.call.k_pos0 + k0)

    def cached(self, what: str, q0: int, q1: int, k0: int, k1: int, make):
        """``make()`` once per tile offset and shape when the mask depends only on q_idx − kv_idx (causal, sliding
        windows): a long causal or windowed call then builds two or three tile masks, not one per tile."""
        if not _shift_invariant(self.call.mask.spec):
            return make()
        key = (what, self.offset(q0, k0), q1 - q0, k1 - k0)
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def hidden(self, q0: int, q1: int, k0: int, k1: int, folded: bool = True) -> Tensor:
        """~visible; cached for shift-invariant masks."""
        return self.cached(f"hidden{folded}", q0, q1, k0, k1, lambda: ~self.visible(q0, q1, k0, k1, folded))

    def visible(self, q0: int, q1: int, k0: int, k1: int, folded: bool = True) -> Tensor:
        """The mask on rows q0:q1 and keys k0:k1: bool (B or 1, H_q or 1, rows, k1 − k0), or folded
        (B or 1, H_kv or 1, R, k1 − k0)."""
        c = self.call
        b, h, qi, ki = masks.grid(c.B, c.H_q, q1 - q0, k1 - k0, c.device, q_pos0=c.q_start + q0, k_pos0=c.k_pos0 + k0)
        m = c.mask.mask_mod(b, h, qi, ki)
        m = m.expand(*m.shape[:2], q1 - q0, k1 - k0)
        return _fold(m, self.group) if folded else m


def _plan(call: AttentionCall, block_q: int, block_k: int) -> _Plan:
    n_qb, n_kb = -(-call.N_q // block_q), -(-call.N_k // block_k)
    if call.mask is None:
        states = torch.full((n_qb, n_kb), masks.FULL, dtype=torch.int8)
    else:
        s = call.mask.block_states(call.B, call.H_q, call.N_q, call.N_k, block_q, block_k, call.device,
                                   q_pos0=call.q_start, k_pos0=call.k_pos0).cpu()
        s = s.expand(call.B, call.H_q, n_qb, n_kb).reshape(-1, n_qb, n_kb)
        lo, hi = s.amin(0), s.amax(0)
        states = torch.where(hi == masks.EMPTY, masks.EMPTY, torch.where(lo == masks.FULL, masks.FULL, masks.PARTIAL))
        states = states.to(torch.int8)
    return _Plan(call, block_q, block_k, states)


def _shift_invariant(spec) -> bool:
    if spec is None:
        return False
    if spec[0] in ("and", "or"):
        return _shift_invariant(spec[1]) and _shift_invariant(spec[2])
    return spec[0] in ("causal", "sliding_window")


def _fold(t: Tensor, group: int) -> Tensor:
    """(B', H_q or 1, rows, cols) -> (B', H_kv or 1, group·rows, cols): the query heads sharing a key/value head
    stacked along the rows. A view when group == 1 or the input is contiguous; otherwise a copy of this block."""
    Bp, Hp, rows, cols = t.shape
    if group == 1:
        return t
    if Hp == 1:
        return t.unsqueeze(2).expand(Bp, 1, group, rows, cols).reshape(Bp, 1, group * rows, cols)
    return t.reshape(Bp, Hp // group, group * rows, cols)  # (B', H_kv, group, rows, cols) -> rows stacked


def _unfold(t: Tensor, group: int) -> Tensor:
    """Inverse of ``_fold`` for (B, H_kv, group·rows, cols) -> (B, H_q, rows, cols)."""
    if group == 1:
        return t
    Bp, H_kv, R, cols = t.shape
    return t.reshape(Bp, H_kv * group, R // group, cols)


def _count(phase: str, n: int) -> None:
    with _COUNT_LOCK:
        TILE_COUNTS[phase] += n


# ------------------------------------------------------------------------------------------------------- forward


def _additive_mask(plan: _Plan, q0: int, q1: int, k0: int, k1: int, masked: bool, dtype: torch.dtype):
    """The mask and bias of one run as the float additive mask the fused kernel takes (−inf = hidden),
    (B or 1, H_q or 1, rows, keys), and the rows that see no key at all in this run (the kernel reports lse 0 for
    them, not −inf)."""
    c = plan.call
    if c.bias is None and c.score_mod is None:
        if not masked:
            return None, None
        return plan.cached(f"add-{dtype}", q0, q1, k0, k1, lambda: _with_dead(
            torch.zeros((), dtype=dtype).masked_fill(plan.hidden(q0, q1, k0, k1, folded=False), -math.inf)))
    add = _additive_terms(plan, q0, q1, k0, k1, dtype)
    if masked:
        add = add.masked_fill(plan.hidden(q0, q1, k0, k1, folded=False), -math.inf)
    elif c.bias is None:  # a modifier's terms are finite: every row of an unmasked run sees its keys
        return add, None
    return _with_dead(add)


def _additive_terms(plan: _Plan, q0: int, q1: int, k0: int, k1: int, dtype: torch.dtype) -> Tensor:
    """The bias plus an additive score modifier's term (ALiBi, relative bias) on rows q0:q1 and keys k0:k1:
    (B or 1, H_q or 1, rows, k1 − k0). Exact: such a modifier adds a term that does not depend on the score."""
    c = plan.call
    add = None if c.bias is None else _bias4(c.bias)[:, :, q0:q1, k0:k1].to(dtype)
    if c.score_mod is not None:
        b, h, qi, ki = masks.grid(c.B, c.H_q, q1 - q0, k1 - k0, c.device, q_pos0=c.q_start + q0, k_pos0=c.k_pos0 + k0)
        term = score_mods.additive_term(c.score_mod, b, h, qi, ki, dtype)  # (B or 1, H_q or 1, rows, bk)
        term = term.expand(*term.shape[:2], q1 - q0, k1 - k0)
        add = term if add is None else add + term
    return add


# An additive modifier of kv_idx − q_idx only (ALiBi, relative and T5 biases) with no bias tensor, under no mask or a
# mask of kv_idx − q_idx only (causal, sliding windows): the additive mask of a run, term(h, d) or −inf, is constant
# along its diagonals. With the run's rows in reverse order it is constant along anti-diagonals instead, so it is a
# view with strides (1, 1) into one vector per head over every distance of the call, A[t] = term(d_lo + t): nothing
# is built per run, and the kernel reads the same few kilobytes for every row. The rows are reversed (copies of
# rows x D) around each kernel call.


def _banded(call: AttentionCall) -> bool:
    return (call.bias is None and call.score_mod is not None and call.score_mod.additive
            and (call.mask is None or _shift_invariant(call.mask.spec)))


def _band(plan: _Plan, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(A (B or 1, H_q or 1, L) with A[t] = the term at distance d_lo + t, −inf where the mask hides it;
    seen (L + 1,) int64, the number of visible distances below t), L = N_q + N_k − 1, once per plan."""
    key = ("band", dtype)
    if key not in plan.cache:
        c = plan.call
        d_lo = c.k_pos0 - (c.q_start + c.N_q - 1)  # the last query to the first key
        L = c.N_q + c.N_k - 1
        q_at = max(0, -d_lo)  # a query position that keeps every key index >= 0
        b, h, _, _ = masks.grid(c.B, c.H_q, 1, 1, c.device)
        qi = torch.full((1, 1, 1, 1), q_at, device=c.device)
        ki = torch.arange(q_at + d_lo, q_at + d_lo + L, device=c.device).view(1, 1, 1, L)
        term = score_mods.additive_term(c.score_mod, b, h, qi, ki, dtype)  # (B or 1, H_q or 1, 1, L)
        visible = torch.ones(L, dtype=torch.bool) if c.mask is None else c.mask.mask_mod(b, h, qi, ki).reshape(L)
        band = term.masked_fill(~visible, -math.inf)[:, :, 0].contiguous()
        seen = torch.nn.functional.pad(visible.cumsum(0), (1, 0))
        plan.cache[key] = band, seen
    return plan.cache[key]


def _band_mask(plan: _Plan, q0: int, q1: int, k0: int, k1: int, dtype: torch.dtype):
    """The additive mask of the run rows q0:q1 x keys k0:k1 with its rows reversed, as a view of the band:
    (B or 1, H_q or 1, rows, keys), and the rows (in their own order) that see no key of the run, (1, 1, rows) or
    None."""
    band, seen = _band(plan, dtype)
    R, K = q1 - q0, k1 - k0
    t0 = k0 + plan.call.N_q - q1  # reversed row r' and key c: distance d_lo + t0 + r' + c
    add = band.as_strided((*band.shape[:2], R, K), (band.stride(0), band.stride(1), 1, 1), band.storage_offset() + t0)
    lo = t0 + torch.arange(R - 1, -1, -1)  # row r is reversed row R − 1 − r
    dead = (seen[lo + K] - seen[lo]) == 0
    return add, (dead.view(1, 1, R) if bool(dead.any()) else None)


def _kernel_runs(plan: _Plan, i: int) -> list[tuple[int, int, bool]]:
    """The runs of query block i for the fused kernel; adjacent ones joined when the mask is a band view (a masked
    tile then costs nothing extra to describe)."""
    runs = plan.runs(i)
    if not _banded(plan.call) or len(runs) < 2:
        return runs
    joined = [runs[0]]
    for j0, j1, masked in runs[1:]:
        if joined[-1][1] == j0:
            joined[-1] = (joined[-1][0], j1, True)
        else:
            joined.append((j0, j1, masked))
    return joined


def _run_mask(plan: _Plan, q0: int, q1: int, k0: int, k1: int, masked: bool, dtype: torch.dtype):
    """How the fused kernel runs rows q0:q1 x keys k0:k1: (additive mask or None, rows that see no key or None,
    the kernel's own causal mask, rows reversed)."""
    if masked and _kernel_causal(plan, q0, q1, k0, k1):
        return None, None, True, False
    if _banded(plan.call):
        return (*_band_mask(plan, q0, q1, k0, k1, dtype), False, True)
    with _one_thread():
        add, dead = _additive_mask(plan, q0, q1, k0, k1, masked, dtype)
    return add, dead, False, False


def _with_dead(add: Tensor):
    dead = torch.isneginf(add).all(-1)  # (B', H', R): rows with no visible key in this run
    return add, (dead if bool(dead.any()) else None)


def _bias4(bias: Tensor) -> Tensor:
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    return bias


def _kernel_causal(plan: _Plan, q0: int, q1: int, k0: int, k1: int) -> bool:
    """True when this run is exactly the fused kernel's own top-left causal mask (row r sees keys c <= r): a plain
    causal mask, query q0 at the position of key k0, and no more rows than keys."""
    c = plan.call
    return (c.mask.spec == ("causal",) and c.bias is None and c.score_mod is None and plan.offset(q0, k0) == 0
            and q1 - q0 <= k1 - k0)


# Grouped-query attention on the fused kernel, in one of two layouts; neither copies K or V:
# * by heads (prefill): the kernel's batch axis runs over key/value heads and its head axis over the g query heads
#   of a group, K and V expanded along it with stride 0. Every query head keeps its own rows, so plain causal stays
#   the kernel's own causal mask and the work splits over all H_q heads.
# * folded (decoding, few rows): the g query heads stacked along the rows of their key/value head, so each key and
#   value is read once per group — the cost of a decoding step is reading the cache.
FOLD_MAX_ROWS = 128
# A run this long for few rows is cut into chunks of keys that become extra kernel heads (flash-decoding), merged by
# log-sum-exp, until every core has SPLIT_ITEMS_PER_CORE heads x chunks to work on.
SPLIT_MIN_KEYS = 16384  # measured: below it the chunks' merge costs more than the second core gains
SPLIT_MIN_CHUNK = 4096
SPLIT_ITEMS_PER_CORE = 4


def _fused_run(q: Tensor, k: Tensor, v: Tensor, scale: float, add: Tensor | None, causal: bool = False):
    """PyTorch's fused CPU flash kernel on one run of keys. q (B, H_q, R, D), k (B, H_kv, n, D), v (B, H_kv, n, D_v),
    add None or (B or 1, H_q or 1, R, n). Returns (out (B, H_q, R, D_v), lse (B, H_q, R))."""
    B, H_q, R, D = q.shape
    D_v = v.shape[-1]
    if D_v != D:
        if D_v < D:  # the kernel wants one head size: zero columns of V add zero columns to the output
            v = torch.nn.functional.pad(v, (0, D - D_v))
        else:  # zero columns of q and k add nothing to the scores
            q, k = (torch.nn.functional.pad(t, (0, D_v - D)) for t in (q, k))
    g = H_q // k.shape[1]
    if g == 1:
        out, lse = _kernel(q, k, v, scale, add, causal)
    elif R * g <= FOLD_MAX_ROWS and not causal:
        out, lse = _kernel(_fold(q, g), k, v, scale, None if add is None else _fold(add, g), False)
        out, lse = out.reshape(B, H_q, R, -1), lse.reshape(B, H_q, R)  # unfolded: (B, H_kv, g·R, ·) is (B, H_q, R, ·)
    else:
        out, lse = _by_heads(q, k, v, scale, add, causal, g)
    return (out if D_v == out.shape[-1] else out[..., :D_v]), lse


def _grouped(b: int, H_kv: int, g: int, *, queries, keys, add):
    """Batch element b in the by-heads layout, views only: each of ``queries`` (B, H_q, ·, ·) as (H_kv, g, ·, ·), each
    of ``keys`` (B, H_kv, n, ·) expanded with stride 0 to (H_kv, g, n, ·), and ``add`` (B or 1, H_q or 1, R, n) as
    (H_kv, g, R, n) or (1, 1, R, n); returns them in that order (add last, None if None)."""
    ab = None
    if add is not None:
        ab = add[b if add.shape[0] > 1 else 0]  # (H_q or 1, R, n)
        ab = ab.unsqueeze(0) if ab.shape[0] == 1 else ab.unflatten(0, (H_kv, g))
    return (*(t[b].unflatten(0, (H_kv, g)) for t in queries),
            *(t[b].unsqueeze(1).expand(H_kv, g, *t.shape[2:]) for t in keys), ab)


def _by_heads(q, k, v, scale, add, causal, g):
    """The fused kernel with the g query heads of each group on its head axis and K, V expanded (stride 0) to them,
    one call per batch element."""
    B, H_q = q.shape[:2]
    H_kv = k.shape[1]
    outs, lses = [], []
    for b in range(B):
        qb, kb, vb, ab = _grouped(b, H_kv, g, queries=(q,), keys=(k, v), add=add)
        o, l_ = _kernel(qb, kb, vb, scale, ab, causal)
        outs.append(o.flatten(0, 1))  # (H_q, R, D_v)
        lses.append(l_.flatten(0, 1))  # (H_q, R)
    if B == 1:
        return outs[0][None], lses[0][None]
    return torch.stack(outs), torch.stack(lses)


def _kernel(q, k, v, scale, add, causal):
    """One call of the fused kernel, (B', H', R, ·) in and out; few rows against many keys are split first."""
    Z, R, n = q.shape[0] * q.shape[1], q.shape[2], k.shape[2]
    if add is None and not causal and R <= FOLD_MAX_ROWS and n >= SPLIT_MIN_KEYS and k.shape[1] == q.shape[1]:
        chunks = _chunks(Z, n)
        if chunks > 1:
            return _split_keys(q, k, v, scale, chunks)
    return _FLASH(q, k, v, 0.0, causal, attn_mask=add, scale=scale)


def _chunks(Z: int, n: int) -> int:
    """Key chunks per head for flash-decoding: enough that Z·chunks items keep every core busy
    (SPLIT_ITEMS_PER_CORE each) and divide evenly among the cores, none shorter than SPLIT_MIN_CHUNK keys."""
    workers = _workers()
    chunks = -(-SPLIT_ITEMS_PER_CORE * workers // Z)
    while (Z * chunks) % workers:
        chunks += 1
    return max(1, min(chunks, n // SPLIT_MIN_CHUNK))


def _split_keys(q, k, v, scale, chunks):
    """Flash-decoding: the keys of every head cut into ``chunks`` runs of C = n // chunks that the kernel sees as
    extra heads (views, no copy), and the last n − chunks·C keys (fewer than ``chunks``) as one more small call;
    merged by log-sum-exp. q (B, H, R, D), k (B, H, n, D), v (B, H, n, D_v) -> (out (B, H, R, D_v) float32,
    lse (B, H, R))."""
    B, H, R, D = q.shape
    n = k.shape[2]
    C = n // chunks
    main = chunks * C
    acc = _acc_dtype(q.dtype)
    outs, lses = [], []
    for b in range(B):
        kb = k[b, :, :main].unflatten(1, (chunks, C))  # (H, chunks, C, D): chunks on the kernel's head axis
        vb = v[b, :, :main].unflatten(1, (chunks, C))
        o, l_ = _FLASH(q[b].unsqueeze(1).expand(H, chunks, R, D), kb, vb, scale=scale)  # (H, chunks, R, ·)
        if main < n:  # the few keys left over: one more call, as one more chunk
            o_t, l_t = _FLASH(q[b:b + 1], k[b:b + 1, :, main:], v[b:b + 1, :, main:], scale=scale)  # (1, H, R, ·)
            o, l_ = torch.cat([o, o_t.transpose(0, 1)], 1), torch.cat([l_, l_t.transpose(0, 1)], 1)
        outs.append(o)
        lses.append(l_)
    o, l_ = (torch.stack(outs), torch.stack(lses)) if B > 1 else (outs[0][None], lses[0][None])
    with _one_thread():  # (B, H, P, R, D_v), (B, H, P, R): no mask here, so every part saw keys (no −inf)
        lse = torch.logsumexp(l_, 2)
        out = torch.einsum("bhprd,bhpr->bhrd", o.to(acc), (l_ - lse[:, :, None]).exp_())
    return out, lse


def kernel_block_q(call: AttentionCall) -> int:
    """Query rows per fused-kernel call. No mask: all rows in one call (blocking the queries would gain nothing).
    Plain causal with queries and keys aligned: also one call, on the kernel's own causal mask. Other causal calls:
    large blocks. Any other mask: one tile's worth, to skip as much as possible.
    An additive score modifier (ALiBi) is handed to the kernel as an additive mask per run: a view of the band
    (BAND_BLOCK_Q) where the mask is shift-invariant, else ADDITIVE_BLOCK_Q rows, so that mask stays O(N) in memory."""
    if call.score_mod is not None:
        if _banded(call):
            low, high = BAND_BLOCK_Q
            return min(high, max(low, 1 << (max(1, call.N_q // 8).bit_length() - 1)))  # a power of two
        return ADDITIVE_BLOCK_Q if call.mask is None or call.mask.spec == ("causal",) else BLOCK_Q
    if call.mask is None:
        return max(call.N_q, 1)
    if call.mask.spec == ("causal",):
        aligned = call.q_start == call.k_pos0 and call.N_q <= call.N_k
        sees_all = call.q_start >= call.k_pos0 + call.N_k - 1  # decoding: every query sees every key
        return max(call.N_q, 1) if aligned or sees_all else DENSE_BLOCK_Q
    return BLOCK_Q


def _whole_call(call: AttentionCall) -> bool | None:
    """For a call that is one kernel call on all of q, k, v: whether it is the kernel's own causal mask; None for any
    other call (those are planned tile by tile). Called on every decoding step: kept to a few comparisons."""
    mask = call.mask
    if (call.bias is not None or call.score_mod is not None or call.dropout_p or call.q.dtype == torch.float64
            or kernel_block_q(call) < call.q.shape[2]):
        return None
    if mask is None:
        return False
    if mask.spec != ("causal",):
        return None
    N_q, N_k = call.q.shape[2], call.k.shape[2]
    q_start = N_k - N_q if call.q_pos0 is None else call.q_pos0
    if q_start >= call.k_pos0 + N_k - 1:
        return False  # every query sees every key: no mask at all
    return True if q_start == call.k_pos0 and N_q <= N_k else None


def _forward(call: AttentionCall, *, block_q: int | None = None, block_k: int = BLOCK_K, out_dtype=None):
    """(out (B, H_q, N_q, D_v) in ``out_dtype`` (default: the accumulation dtype), lse (B, H_q, N_q) accumulation
    dtype, −inf for rows that see no key)."""
    acc = _acc_dtype(call.dtype)
    out_dtype = acc if out_dtype is None else out_dtype
    call = _upcast_if_slow(call, "forward")
    causal = _whole_call(call) if block_q is None else None
    if causal is not None:  # no plan needed: the shortest path (decoding steps, no mask, plain causal)
        out, lse = _fused_run(call.q, call.k, call.v, call.scale, None, causal)
        _count("forward", -(-call.k.shape[2] // block_k))
        return (out if out.dtype == out_dtype else out.to(out_dtype)), (lse if lse.dtype == acc else lse.to(acc))
    bounds = _document_bounds(call) if block_q is None else None
    if bounds is not None:
        return _forward_by_document(call, bounds, out_dtype)
    by_tiles = call.dtype == torch.float64 or _torch_tiles(call)
    block_q = (BLOCK_Q if by_tiles else kernel_block_q(call)) if block_q is None else block_q
    plan = _plan(call, block_q, block_k)
    mask_dtype = call.dtype if call.dtype in (torch.float32, torch.float64) else torch.float32
    out = torch.empty(call.B, call.H_q, call.N_q, call.D_v, dtype=out_dtype, device=call.device)
    lse = torch.empty(call.B, call.H_q, call.N_q, dtype=acc, device=call.device)
    if by_tiles:
        _count("forward", _forward_tiles(plan, out, lse))
        return out, lse
    n_tiles = 0
    for i in range(plan.states.shape[0]):
        q0, q1 = plan.q_range(i)
        parts = []
        for j0, j1, masked in _kernel_runs(plan, i):
            k0, k1 = j0 * block_k, plan.k_range(j1 - 1)[1]
            add, dead, causal, reverse = _run_mask(plan, q0, q1, k0, k1, masked, mask_dtype)
            qr = call.q[:, :, q0:q1].flip(2) if reverse else call.q[:, :, q0:q1]
            o, l_ = _fused_run(qr, call.k[:, :, k0:k1], call.v[:, :, k0:k1], call.scale, add, causal)
            o, l_ = (o.flip(2), l_.flip(2)) if reverse else (o, l_)
            l_ = l_.to(acc)
            if dead is not None:
                l_ = l_.masked_fill(dead.expand_as(l_), -math.inf)
            parts.append((o, l_))
            n_tiles += j1 - j0
        rows_o, rows_l = out[:, :, q0:q1], lse[:, :, q0:q1]  # (B, H_q, rows, D_v), (B, H_q, rows)
        if not parts:
            rows_o.zero_()
            rows_l.fill_(-math.inf)
            continue
        with _one_thread():
            o, l_ = parts[0] if len(parts) == 1 else merge_by_lse(*zip(*parts, strict=True), dtype=acc)
            rows_o.copy_(o)
            rows_l.copy_(l_)
    _count("forward", n_tiles)
    return out, lse


def _forward_tiles(plan: _Plan, out: Tensor, lse: Tensor) -> int:
    """The forward in torch operations (float64; score modifiers and dropout the kernel cannot take) into ``out``
    and ``lse``. Query blocks are independent: they are shared among the cores, one thread each, by tile counts (a
    thread of its own runs the small operations of a tile without waking another). Returns the tiles computed."""
    c = plan.call
    acc, g, Z = lse.dtype, plan.group, c.B * c.H_kv
    k3, v3 = c.k.reshape(Z, c.N_k, c.D).to(acc), c.v.reshape(Z, c.N_k, c.D_v).to(acc)  # (Z, N_k, ·)
    costs = [int((plan.states[i] != masks.EMPTY).sum()) for i in range(plan.states.shape[0])]
    if c.dropout_p:
        _dropout_halves(plan)  # made once, before the threads share them

    def block(i: int) -> None:
        q0, q1 = plan.q_range(i)
        rows_o, rows_l = out[:, :, q0:q1], lse[:, :, q0:q1]  # (B, H_q, rows, D_v), (B, H_q, rows)
        if not costs[i]:
            rows_o.zero_()
            rows_l.fill_(-math.inf)
            return
        R = g * (q1 - q0)
        qf = _fold(c.q[:, :, q0:q1], g).reshape(Z, R, c.D).to(acc)
        o, l_ = _online_softmax_rows(plan, i, qf, k3, v3)  # folded: (Z, R, D_v), (Z, R)
        rows_o.copy_(_unfold(o.view(c.B, c.H_kv, R, -1), g))
        rows_l.copy_(_unfold(l_.view(c.B, c.H_kv, R, 1), g)[..., 0])

    shares = _balance(costs, min(_workers(), len(costs)))

    def work(share: list[int]) -> None:
        with torch.no_grad(), _one_thread():
            for i in share:
                block(i)

    if len(shares) == 1:
        work(shares[0])
    else:
        with ThreadPoolExecutor(len(shares)) as pool:
            list(pool.map(work, shares))
    return sum(costs)


def _document_bounds(call: AttentionCall) -> list[tuple[int, int]] | None:
    """[(start, end)] of each document when the call is packed self-attention that can run document by document:
    the mask is one ``document`` mask with sorted ids (so each document is one run of positions) joined only with
    ``causal`` / ``sliding_window`` (which look at q_idx − kv_idx alone, so they mean the same inside a document
    cut out), no bias, queries at the keys' positions; the documents average DOCUMENT_SPLIT_MIN_MEAN tokens or more.
    float64 keeps the tile path (its backward recomputes the forward's scores bit for bit, tile by tile)."""
    c = call
    if (c.mask is None or c.mask.spec is None or c.bias is not None or c.dtype == torch.float64
            or c.score_mod is not None or c.dropout_p or c.N_q != c.N_k or c.q_start != 0 or c.k_pos0 != 0):
        return None
    leaves = _leaves(c.mask.spec)
    docs = [leaf for leaf in leaves if leaf[0] == "document"]
    if len(docs) != 1 or any(leaf[0] not in ("document", "causal", "sliding_window") for leaf in leaves):
        return None
    ids = docs[0][1]
    ids = ids if ids.dim() == 1 else ids[0] if ids.shape[0] == 1 else None
    if ids is None or ids.shape[0] != c.N_k:
        return None
    step = ids[1:] - ids[:-1]
    if bool((step < 0).any()):
        return None
    cuts = torch.nonzero(step).flatten().add_(1).tolist()  # where a new document starts
    if c.N_k < DOCUMENT_SPLIT_MIN_MEAN * (len(cuts) + 1):
        return None
    edges = [0, *cuts, c.N_k]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _leaves(spec: tuple) -> list[tuple]:
    if spec[0] == "and":
        return _leaves(spec[1]) + _leaves(spec[2])
    return [spec]


def _forward_by_document(call: AttentionCall, bounds: list[tuple[int, int]], out_dtype):
    """``_forward`` of each document on its own, written into one (out, lse): a document sees only itself."""
    within = [masks.from_spec(leaf) for leaf in _leaves(call.mask.spec) if leaf[0] != "document"]
    mask = within[0] if within else None
    for m in within[1:]:
        mask = mask & m
    out = torch.empty(call.B, call.H_q, call.N_q, call.D_v, dtype=out_dtype, device=call.device)
    lse = torch.empty(call.B, call.H_q, call.N_q, dtype=_acc_dtype(call.dtype), device=call.device)
    for a, b in bounds:
        doc = AttentionCall(call.q[:, :, a:b], call.k[:, :, a:b], call.v[:, :, a:b], call.scale, mask)
        out[:, :, a:b], lse[:, :, a:b] = _forward(doc, out_dtype=out_dtype)
    return out, lse


def _tile_scores(plan: _Plan, i: int, j: int, qi: Tensor, kj: Tensor, neg_lse: Tensor | None,
                 partial: bool) -> Tensor:
    """S·scale + bias (− lse) of tile (i, j), −inf where masked: (Z, R, bk) in the accumulation dtype.

    −lse enters as the matrix product's addend, which saves a pass over the tile. Without it (float64), the scores
    are bit-identical to those of the float64 forward, so that exp(S − lse) reproduces its probabilities to the ulp.
    """
    c = plan.call
    if c.score_mod is not None:  # S·scale → score_mod → + bias → mask → − lse
        cap = _softcap(c)
        if cap is not None:
            s = _tanh_scores(qi, kj, c.scale, cap).mul_(cap)
        else:
            s = _modified(plan, i, j, torch.bmm(qi, kj.transpose(1, 2)).mul_(c.scale))
        s = _bias_and_mask(plan, i, j, s, partial)
        return s if neg_lse is None else s.add_(neg_lse)
    if neg_lse is None:
        s = torch.bmm(qi, kj.transpose(1, 2)).mul_(plan.call.scale)
    else:
        s = torch.baddbmm(neg_lse, qi, kj.transpose(1, 2), alpha=plan.call.scale)
    return _bias_and_mask(plan, i, j, s, partial)


def _bias_and_mask(plan: _Plan, i: int, j: int, s: Tensor, partial: bool) -> Tensor:
    c = plan.call
    if c.bias is not None or partial:
        (q0, q1), (k0, k1) = plan.q_range(i), plan.k_range(j)
        s4 = s.view(c.B, c.H_kv, -1, k1 - k0)
        if c.bias is not None:
            s4.add_(_fold(_bias4(c.bias)[:, :, q0:q1, k0:k1], plan.group))
        if partial:
            s4.masked_fill_(plan.hidden(q0, q1, k0, k1), -math.inf)
    return s


# ----------------------------------------------------------------- score modifiers and dropout on one tile (Z, R, bk)


def _torch_tiles(call: AttentionCall) -> bool:
    """Calls the fused kernel cannot compute: a score modifier that is not additive (soft-capping, a custom one) or
    dropout (the tiles then run in torch operations, and their backward recomputes the modified scores and
    regenerates the dropout mask tile by tile)."""
    return (call.score_mod is not None and not call.score_mod.additive) or call.dropout_p > 0


def _softcap(call: AttentionCall) -> float | None:
    """The cap when the score modifier is a soft-cap alone (Gemma-2), computed in place without the modifier's
    generic machinery; else None."""
    spec = None if call.score_mod is None else call.score_mod.spec
    return spec[1] if spec is not None and spec[0] == "softcap" else None


def _tanh_scores(qi: Tensor, kj: Tensor, scale: float, cap: float) -> Tensor:
    """tanh(S·scale / cap) of a tile: the soft-capped scores over cap. The backward keeps it for dS·(1 − tanh²)."""
    return torch.bmm(qi, kj.transpose(1, 2)).mul_(scale / cap).tanh_()


def _capture_grads(call: AttentionCall) -> bool:
    return any(t.requires_grad for t in call.captures)


def _tile_grid(plan: _Plan, i: int, j: int):
    c = plan.call
    (q0, q1), (k0, k1) = plan.q_range(i), plan.k_range(j)
    return masks.grid(c.B, c.H_q, q1 - q0, k1 - k0, c.device, q_pos0=c.q_start + q0, k_pos0=c.k_pos0 + k0)


def _unfolded(plan: _Plan, s: Tensor) -> Tensor:
    """A folded tile (Z, g·rows, bk) viewed per query head: (B, H_q, rows, bk)."""
    c = plan.call
    return s.view(c.B, c.H_q, -1, s.shape[-1])


def _modified(plan: _Plan, i: int, j: int, s: Tensor) -> Tensor:
    """score_mod on a folded tile of scaled scores, evaluated at the tile's positions."""
    return score_mods.apply(plan.call.score_mod, _unfolded(plan, s), *_tile_grid(plan, i, j)).reshape(s.shape)


def _keep(plan: _Plan, i: int, j: int) -> Tensor:
    """The dropout's keep mask of tile (i, j), folded: int32 bits, −1 where kept and 0 where dropped, (Z, R, bk),
    for ``_drop``. The hash's per-row and per-key halves are made once per call (O(rows + keys)); a tile costs its
    per-score round only. The weights kept are scaled by 1 / (1 − p) where the tile's products are summed
    (``_kept_scale``)."""
    c = plan.call
    rows, cols = _dropout_halves(plan)
    (q0, q1), (k0, k1) = plan.q_range(i), plan.k_range(j)
    keep = score_mods.dropout_kept(rows[:, :, q0:q1], cols[..., k0:k1], c.dropout_p)  # (B, H_q, rows, bk)
    return keep.reshape(c.B * c.H_kv, -1, k1 - k0)


def _drop(t: Tensor, keep: Tensor, inplace: bool = True) -> Tensor:
    """``t`` (float32 or float64) with the dropped entries zeroed: its bits ANDed with the keep mask."""
    bits = t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)
    keep = keep if bits.dtype == torch.int32 else keep.to(torch.int64)  # −1 stays every bit set
    return (bits.bitwise_and_(keep) if inplace else torch.bitwise_and(bits, keep)).view(t.dtype)


def _dropout_halves(plan: _Plan) -> tuple[Tensor, Tensor]:
    """The dropout hash's halves of the call: per row (B, H_q, N_q, 1) and per key (1, 1, 1, N_k), int32."""
    if "dropout" not in plan.cache:
        c = plan.call
        b, h, qi, ki = masks.grid(c.B, c.H_q, c.N_q, c.N_k, c.device, q_pos0=c.q_start, k_pos0=c.k_pos0)
        plan.cache["dropout"] = (score_mods.dropout_rows(c.dropout_seed, b, h, qi),
                                 score_mods.dropout_cols(c.dropout_seed, ki))
    return plan.cache["dropout"]


def _kept_scale(call: AttentionCall) -> float:
    return 1.0 / (1.0 - call.dropout_p)


def _mod_backward(plan: _Plan, i: int, j: int, qi: Tensor, kj: Tensor, ds: Tensor, cap_grads: list) -> Tensor:
    """dS before the score modifier, ∂L/∂s = dS · ∂score_mod/∂s, by autograd on this tile (recomputed); adds the
    gradients of the modifier's captured tensors to ``cap_grads`` (one slot per capture)."""
    c = plan.call
    caps = [t for t in c.captures if t.requires_grad]

    def grad():
        x = torch.bmm(qi, kj.transpose(1, 2)).mul_(c.scale).requires_grad_(True)
        return torch.autograd.grad(_modified(plan, i, j, x), [x, *caps], ds, allow_unused=True)

    grads = score_mods.with_autograd(grad)
    for n, g in enumerate(grads[1:]):
        if g is not None:
            cap_grads[n] = g if cap_grads[n] is None else cap_grads[n] + g
    return grads[0]


def _online_softmax_rows(plan: _Plan, i: int, qi: Tensor, k3: Tensor, v3: Tensor):
    """Query block i in plain torch operations (the float64 path, whose backward must see the very same scores):
    FlashAttention-2's running maximum m, sum l and output o over the row's non-empty tiles.
    Returns (out (Z, R, D_v), lse (Z, R))."""
    Z, R = qi.shape[:2]
    m = torch.full((Z, R, 1), -math.inf, dtype=qi.dtype)
    l_ = torch.zeros(Z, R, 1, dtype=qi.dtype)
    o = torch.zeros(Z, R, v3.shape[-1], dtype=qi.dtype)
    tiles = [(j, st) for j, st in enumerate(plan.states[i].tolist()) if st != masks.EMPTY]
    for j, state in tiles:
        k0, k1 = plan.k_range(j)
        s = _tile_scores(plan, i, j, qi, k3[:, k0:k1], None, state == masks.PARTIAL)
        keep = _keep(plan, i, j) if plan.call.dropout_p else None
        if len(tiles) == 1:  # the whole row in one tile: the textbook order (normalise P, then multiply by V)
            m = s.amax(-1, keepdim=True)
            e = s.sub_(torch.where(torch.isneginf(m), 0.0, m)).exp_()
            l_ = e.sum(-1, keepdim=True)
            p = torch.where(l_ > 0, e / torch.where(l_ > 0, l_, 1.0), 0.0)
            lse = (torch.where(torch.isneginf(m), 0.0, m) + torch.log(l_))[..., 0]
            if keep is None:
                return torch.bmm(p, v3[:, k0:k1]), lse
            return torch.bmm(_drop(p, keep), v3[:, k0:k1]).mul_(_kept_scale(plan.call)), lse
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = torch.where(torch.isneginf(m_new), 0.0, m_new)  # rows that have seen no key yet
        alpha = torch.exp(m - m_safe)
        p = s.sub_(m_safe).exp_()
        l_ = l_ * alpha + p.sum(-1, keepdim=True)
        o = o * alpha + torch.bmm(p if keep is None else _drop(p, keep), v3[:, k0:k1])
        m = m_new
    lse = (torch.where(torch.isneginf(m), 0.0, m) + torch.log(l_))[..., 0]  # log 0 = −inf: rows that see nothing
    if plan.call.dropout_p:
        l_ = l_ * (1.0 - plan.call.dropout_p)  # the kept weights' 1 / (1 − p)
    out = torch.where(l_ > 0, o / torch.where(l_ > 0, l_, 1.0), 0.0)
    return out, lse


# ------------------------------------------------------------------------------------------------------ backward


def _workers() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _backward(call: AttentionCall, out: Tensor, lse: Tensor, d_out: Tensor, *, block_q: int = BLOCK_Q,
              block_k: int = BLOCK_K, bias_grad: bool = False, capture_grads: list | None = None):
    """(dq, dk, dv) in the accumulation dtype, given the final ``out`` and ``lse`` of every query row; with
    ``bias_grad`` also dS, the gradient of the bias, as (B, H_q, N_q, N_k) (O(N_q·N_k), like the bias). The
    gradients of the score modifier's captured tensors that require grad are written into ``capture_grads``."""
    acc = _acc_dtype(call.dtype)
    call = _upcast_if_slow(call, "backward")
    plan = _plan(call, block_q, block_k)
    g, scale = plan.group, call.scale
    B, H_kv, N_q, D, D_v = call.B, call.H_kv, call.N_q, call.D, call.D_v
    Z = B * H_kv
    # Rows that see no key have lse −inf; +inf there makes exp(S − lse) = 0 instead of NaN.
    lse_b = torch.where(torch.isneginf(lse), math.inf, lse.to(acc))  # (B, H_q, N_q)
    heads = B * call.H_q  # the kernel runs grouped-query attention by query heads
    if (acc == torch.float32 and heads >= KERNEL_BACKWARD_MIN_HEADS * _workers()
            and (kernel_block_q(call) > BLOCK_Q or _banded(call)) and not bias_grad and not _torch_tiles(call)
            and not (capture_grads and _capture_grads(call))):  # the fused kernel does not hand out dS
        # in the inputs' dtype: the kernel accumulates half precision in float32 itself (and torch 2.13's is fast)
        out, d_out = out.to(call.dtype), d_out.to(call.dtype)
        return _kernel_backward(_plan(call, kernel_block_q(call), block_k), call.q, call.k, call.v, out, lse_b,
                                d_out)
    q, k, v = (t.to(acc) for t in (call.q, call.k, call.v))
    d_out, out = d_out.to(acc), out.to(acc)
    lse_b = lse_b[..., None]  # (B, H_q, N_q, 1)
    neg_lse = lse_b.neg()

    n_qb, n_kb = plan.states.shape
    rows = []  # per query block: q, dO, −lse, δ = rowsum(dO∘O) folded to (Z, R, ·); views where possible
    for i in range(n_qb):
        q0, q1 = plan.q_range(i)
        delta = (d_out[:, :, q0:q1] * out[:, :, q0:q1]).sum(-1, keepdim=True)  # block by block: no N x D temporary
        rows.append(tuple(_fold(t, g).reshape(Z, g * (q1 - q0), -1)
                          for t in (q[:, :, q0:q1], d_out[:, :, q0:q1], neg_lse[:, :, q0:q1], delta)))
    k3, v3 = k.reshape(Z, call.N_k, D), v.reshape(Z, call.N_k, D_v)  # (Z, N_k, ·)
    dk = torch.zeros(B, H_kv, call.N_k, D, dtype=acc, device=call.device)
    dv = torch.zeros(B, H_kv, call.N_k, D_v, dtype=acc, device=call.device)
    dk3, dv3 = dk.view(Z, call.N_k, D), dv.view(Z, call.N_k, D_v)
    # dS of every tile visited; each (query block, key block) tile belongs to one worker, so no two write one place
    dbias = torch.zeros(B, H_kv, g, N_q, call.N_k, dtype=acc, device=call.device) if bias_grad else None
    states = plan.states.tolist()
    exact = acc == torch.float64
    columns = [[i for i in range(n_qb) if states[i][j] != masks.EMPTY] for j in range(n_kb)]
    if call.dropout_p:
        _dropout_halves(plan)  # made once, before the threads share them
    cap = _softcap(call)

    def key_block(j: int, dq_rows: list, cap_grads: list) -> int:
        k0, k1 = plan.k_range(j)
        kj, vj = k3[:, k0:k1], v3[:, k0:k1]
        dkj, dvj = dk3[:, k0:k1], dv3[:, k0:k1]
        for i in columns[j]:
            qi, doi, neg_lse, di = rows[i]
            if cap is not None:  # the tile's tanh is kept for the soft-cap's derivative
                t = _tanh_scores(qi, kj, scale, cap)
                s = _bias_and_mask(plan, i, j, t * cap, states[i][j] == masks.PARTIAL).add_(neg_lse)
            elif exact or call.score_mod is not None:  # float64: the forward's scores bit for bit, then − lse
                s = _tile_scores(plan, i, j, qi, kj, None, states[i][j] == masks.PARTIAL).add_(neg_lse)
            else:
                s = _tile_scores(plan, i, j, qi, kj, neg_lse, states[i][j] == masks.PARTIAL)  # (Z, R, bk)
            p = s.exp_()  # P = exp(S − lse), the forward's probabilities
            if call.dropout_p:  # the forward multiplied P by keep·c, c = 1/(1 − p), before V: so do dV and dP
                keep, c = _keep(plan, i, j), _kept_scale(call)
                dvj.baddbmm_(_drop(p, keep, inplace=False).transpose(1, 2), doi, alpha=c)
                # dS = P∘(c·keep∘dP − δ) = c·P∘(keep∘dP − δ/c): c joins the products that take dS
                ds = _drop(torch.bmm(doi, vj.transpose(1, 2)), keep).sub_(di * (1.0 - call.dropout_p)).mul_(p)
            else:
                c = 1.0
                dvj.baddbmm_(p.transpose(1, 2), doi)
                ds = torch.bmm(doi, vj.transpose(1, 2)).sub_(di).mul_(p)  # dS = P∘(dP − δ)
            if c != 1.0 and (dbias is not None or call.score_mod is not None):  # those need dS itself
                ds, c = ds.mul_(c), 1.0
            if dbias is not None:
                q0, q1 = plan.q_range(i)
                dbias[:, :, :, q0:q1, k0:k1] = ds.view(B, H_kv, g, q1 - q0, k1 - k0)  # (Z, g·rows, bk) unfolded
            if cap is not None:  # d(cap·tanh(x/cap))/dx = 1 − tanh²: dS − dS·tanh²
                ds.addcmul_(ds, t.mul_(t), value=-1.0)
            elif call.score_mod is not None:
                ds = _mod_backward(plan, i, j, qi, kj, ds, cap_grads)
            dkj.baddbmm_(ds.transpose(1, 2), qi, alpha=scale * c)
            if dq_rows[i] is None:
                dq_rows[i] = torch.zeros_like(qi)
            dq_rows[i].baddbmm_(ds, kj, alpha=scale * c)
        return len(columns[j])

    n_workers = min(_workers(), n_kb)
    shares = _balance([len(c) for c in columns], n_workers)
    dq = torch.zeros(B, H_kv, g, N_q, D, dtype=acc, device=call.device)  # (B, H_kv, g, N_q, D) = (B, H_q, N_q, D)
    dq_parts = [[None] * n_qb for _ in shares]  # per worker, per query block, allocated when first touched
    cap_parts = [[None] * len([t for t in call.captures if t.requires_grad]) for _ in shares]  # per worker
    # Each query block's first worker accumulates straight into dq (with g == 1 its folded block is a view of dq);
    # only the other workers that touch the block need a buffer of their own (for a band such as a sliding window,
    # just the blocks where two workers' key ranges meet).
    owner = [None] * n_qb
    for w, share in enumerate(shares):
        for j in share:
            for i in columns[j]:
                owner[i] = w if owner[i] is None else owner[i]
    if g == 1:
        for i, w in enumerate(owner):
            if w is not None:
                q0, q1 = plan.q_range(i)
                dq_parts[w][i] = dq[:, :, 0, q0:q1].view(Z, q1 - q0, D)
    if n_workers == 1:
        n_tiles = sum(key_block(j, dq_parts[0], cap_parts[0]) for j in shares[0])
    else:
        def work(w):
            # grad mode is per thread (the workers must not record history), and so is the intra-op thread count:
            # one worker per core, each single-threaded
            with torch.no_grad(), _one_thread():
                return sum(key_block(j, dq_parts[w], cap_parts[w]) for j in shares[w])

        with ThreadPoolExecutor(n_workers) as pool:
            n_tiles = sum(pool.map(work, range(len(shares))))
    _count("backward", n_tiles)

    for i in range(n_qb):
        q0, q1 = plan.q_range(i)
        for w, part in enumerate(dq_parts):
            if part[i] is not None and not (g == 1 and w == owner[i]):
                dq[:, :, :, q0:q1] += part[i].view(B, H_kv, g, q1 - q0, D)
    if capture_grads is not None:  # summed over the workers in a fixed order: deterministic
        for n in range(len(capture_grads)):
            parts = [part[n] for part in cap_parts if part[n] is not None]
            capture_grads[n] = sum(parts[1:], parts[0]) if parts else None
    if bias_grad:
        return dq.view(B, call.H_q, N_q, D), dk, dv, dbias.view(B, call.H_q, N_q, call.N_k)
    return dq.view(B, call.H_q, N_q, D), dk, dv


def _kernel_backward(plan: _Plan, q, k, v, out, lse_b, d_out):
    """The backward on PyTorch's fused CPU kernel, run by run (the same runs as the forward), in the inputs' dtype
    (it accumulates half precision in float32; partial results of several runs are summed in float32). The kernel
    parallelises over heads only, so this path serves calls with enough heads to keep every core busy. It takes the
    *final* out and lse of the rows, so each run yields its exact share of dQ and the dK, dV of its keys.
    Grouped-query attention runs by heads (K, V expanded with stride 0), and dK, dV are summed over each group."""
    c = plan.call
    B, N_q, D, D_v = c.B, c.N_q, c.D, c.D_v
    width = max(D, D_v)  # the kernel wants one head size: zero columns change no score and no output
    pad = (lambda t: t) if D == D_v else (lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1])))
    q, k, v, out, d_out = (pad(t) for t in (q, k, v, out, d_out))
    dq = dk = dv = None  # allocated at the first run that does not cover the whole call
    n_tiles = 0
    for i in range(plan.states.shape[0]):
        q0, q1 = plan.q_range(i)
        qb, ob, dob, lb = (t[:, :, q0:q1] for t in (q, out, d_out, lse_b))  # (B, H_q, rows, ·), lb (B, H_q, rows)
        for j0, j1, masked in _kernel_runs(plan, i):
            k0, k1 = j0 * plan.block_k, plan.k_range(j1 - 1)[1]
            add, _, causal, reverse = _run_mask(plan, q0, q1, k0, k1, masked, torch.float32)
            rows = [t.flip(2) for t in (dob, qb, ob, lb)] if reverse else (dob, qb, ob, lb)
            dqr, dkr, dvr = _fused_backward(*rows[:2], k[:, :, k0:k1], v[:, :, k0:k1], *rows[2:], c.scale, add, causal)
            dqr = dqr.flip(2) if reverse else dqr
            if plan.states.shape[0] == 1 and (k0, k1) == (0, c.N_k):  # one call did it all: no accumulators
                _count("backward", j1 - j0)
                return dqr[..., :D], dkr[..., :D], dvr[..., :D_v]
            if dq is None:
                acc = _acc_dtype(q.dtype)
                dq = torch.zeros(B, c.H_q, N_q, width, dtype=acc)
                dk, dv = (torch.zeros(B, c.H_kv, c.N_k, width, dtype=acc) for _ in range(2))
            with _one_thread():  # memory-bound: a second thread gains little and costs a wake-up
                dq[:, :, q0:q1] += dqr
                dk[:, :, k0:k1] += dkr
                dv[:, :, k0:k1] += dvr
            n_tiles += j1 - j0
    _count("backward", n_tiles)
    if dq is None:  # every row sees nothing
        dq = torch.zeros(B, c.H_q, N_q, width, dtype=_acc_dtype(q.dtype))
        dk, dv = (torch.zeros(B, c.H_kv, c.N_k, width, dtype=_acc_dtype(q.dtype)) for _ in range(2))
    return dq[..., :D], dk[..., :D], dv[..., :D_v]


def _fused_backward(do, q, k, v, out, lse, scale, add, causal):
    """The fused kernel's backward on one run: do, q, out (B, H_q, R, ·), lse (B, H_q, R), k, v (B, H_kv, n, ·),
    add None or (B or 1, H_q or 1, R, n) -> (dq (B, H_q, R, ·), dk, dv (B, H_kv, n, ·)); with grouped-query
    attention by heads, dK and dV summed over each group (in float32 for half precision)."""
    bwd = _FLASH_BACKWARD
    H_q, H_kv = q.shape[1], k.shape[1]
    g = H_q // H_kv
    if g == 1:
        return bwd(do, q, k, v, out, lse, 0.0, causal, attn_mask=add, scale=scale)
    sum_dtype = _acc_dtype(q.dtype)
    dqs, dks, dvs = [], [], []
    for b in range(q.shape[0]):
        dob, qb, ob, lb, kb, vb, ab = _grouped(b, H_kv, g, queries=(do, q, out, lse), keys=(k, v), add=add)
        dq, dk, dv = bwd(dob, qb, kb, vb, ob, lb, 0.0, causal, attn_mask=ab, scale=scale)
        dqs.append(dq.flatten(0, 1))
        dks.append(dk.sum(1, dtype=sum_dtype))
        dvs.append(dv.sum(1, dtype=sum_dtype))
    return torch.stack(dqs), torch.stack(dks), torch.stack(dvs)


def _balance(costs: list[int], n: int) -> list[list[int]]:
    """Split key blocks 0..len(costs)-1 into n contiguous shares of about equal cost (tiles to compute)."""
    total = max(1, sum(costs))
    shares: list[list[int]] = [[] for _ in range(n)]
    run = 0
    for j, c in enumerate(costs):
        shares[min(n - 1, int((run + c / 2) * n / total))].append(j)  # by where the block's middle falls
        run += c
    return [s for s in shares if s]


# ------------------------------------------------------------------------------------------ autograd and backend


class _TiledAttention(torch.autograd.Function):
    """One autograd Function for every variant: the call (mask, bias, positions, scale) is an argument."""

    @staticmethod
    def forward(ctx, q, k, v, bias, sinks, call: AttentionCall, *captures):
        if sinks is None:
            out, lse = _forward(call, out_dtype=q.dtype)
        else:  # the sink joins each row's softmax (score_mods.add_sinks); the backward sees the final out and lse
            out, lse = score_mods.add_sinks(*_forward(call), sinks)
            out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, bias, sinks, out, lse)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, bias, sinks, out, lse = ctx.saved_tensors
        call = dataclasses.replace(ctx.call, q=q, k=k, v=v, bias=bias)
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        wanted = [n for n, t in enumerate(call.captures) if ctx.needs_input_grad[6 + n]]
        cap_grads = [None] * len([t for t in call.captures if t.requires_grad])
        dq, dk, dv, *dbias = _backward(call, out, lse, d_out, bias_grad=bias_grad, capture_grads=cap_grads)
        dbias = sum_to_bias(dbias[0], bias) if bias_grad else None
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[4]:
            dsinks = score_mods.sinks_grad(out, lse, d_out, sinks)
        by_capture = [None] * len(call.captures)
        grads_of_requiring = iter(cap_grads)
        for n, t in enumerate(call.captures):
            if t.requires_grad:
                g = next(grads_of_requiring)
                if n in wanted:  # no tile visited (every key masked): the capture did not matter
                    by_capture[n] = torch.zeros_like(t) if g is None else g.to(t.dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, dsinks, None, *by_capture)


@dataclass(frozen=True)
class TiledBackend(Backend):
    def forward(self, call: AttentionCall):
        call = dense_rows(call)
        if call.needs_grad:
            out, lse = _TiledAttention.apply(call.q, call.k, call.v, call.bias, call.sinks, call, *call.captures)
        elif call.sinks is not None:
            out, lse = score_mods.add_sinks(*_forward(call), call.sinks)
            out = out.to(call.dtype)
        else:
            out, lse = _forward(call, out_dtype=call.dtype)
        return out, (lse if lse.dtype == torch.float32 else lse.to(torch.float32))

    def forward_block(self, call: AttentionCall):
        with torch.no_grad():
            return _forward(dense_rows(call))

    def backward_block(self, call: AttentionCall, out, lse, d_out):
        call = dense_rows(call)
        with torch.no_grad():
            return tuple(t.to(_acc_dtype(call.dtype)) for t in _backward(call, out, lse, d_out))


BACKEND = TiledBackend(
    name="tiled",
    description="blocks of queries x keys with an online softmax (FlashAttention-2's algorithm) on PyTorch's fused "
                "CPU kernel, masked blocks skipped, threaded backward; O(N) memory",
    devices=frozenset({"cpu"}),
    supports_blocks=True,
    supports_score_mods=True,
    supports_sinks=True,
    supports_dropout=True,
)
