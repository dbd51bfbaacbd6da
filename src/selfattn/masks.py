"""Masks are functions: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = the query may see the key).

Positions
---------
``q_idx`` is the query's *position in the key sequence*, not its row number. With N_q queries and N_k keys, query
row i sits at position ``i + N_k - N_q`` (bottom-right alignment: the last query is the last key's position, as when
decoding with a KV cache). For N_q = N_k the two are the same. So ``causal`` is simply ``kv_idx <= q_idx``::

    N_q = 2, N_k = 5 (bottom-right, selfattn)     torch's is_causal=True (top-left)
                k0 k1 k2 k3 k4                                k0 k1 k2 k3 k4
    q0 (pos 3)   1  1  1  1  .                      q0         1  .  .  .  .
    q1 (pos 4)   1  1  1  1  1                      q1         1  1  .  .  .

Rows whose position is negative (N_q > N_k) see no key under a causal mask: their output is zero.

A mask_mod is called with broadcastable integer tensors: ``b`` of shape (B, 1, 1, 1), ``h`` (1, H, 1, 1),
``q_idx`` (1, 1, N_q, 1) and ``kv_idx`` (1, 1, 1, N_k) — or any sub-block of them — and must return a bool tensor
that broadcasts to their common shape. Write it with tensor operations (``&``, ``|``, comparisons, indexing).

Masks combine with ``&`` and ``|``. Each ready-made mask also knows which *blocks* of the score matrix it hides
entirely, so the tiled backends skip them without evaluating the mask element by element (FlexAttention's block
mask). A custom mask_mod gets an exact block classification by evaluating it densely, block by block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# Block states: how much of a (query block x key block) tile a mask lets through.
EMPTY, PARTIAL, FULL = 0, 1, 2

# (B_or_1, H_or_1, q_lo, q_hi, k_lo, k_hi) -> int8 state tensor, q_lo/q_hi shaped (nQ, 1), k_lo/k_hi shaped (1, nK)
BlockFn = Callable[[int, int, Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class Mask:
    """A mask function with a name and, optionally, a cheap exact-or-conservative block classifier.

    ``block_fn`` must never call a block EMPTY or FULL unless it is; PARTIAL is always safe.

    ``spec`` describes a ready-made mask (or an and/or of them) as plain data — ("causal",),
    ("sliding_window", w), ("key_padding", lengths), ("key_range", starts, ends_or_None), ("document", doc_ids),
    ("tensor", bool_mask, N_q, N_k),
    ("and", spec, spec), ("or", spec, spec) — so kernels and custom ops can recognise it and ``from_spec`` can rebuild
    it; None for an arbitrary mask_mod, whose result is then checked to be a bool tensor.

    ``key_extent`` is the largest key length the mask was given (``max(lengths)`` of ``key_padding``), read once when
    the mask is built; ``attention`` raises when it exceeds N_k (the lengths were meant for other keys).
    """

    mask_mod: MaskMod
    name: str = "custom"
    block_fn: BlockFn | None = None
    spec: tuple | None = None
    key_extent: int | None = None

    def __post_init__(self):
        if self.spec is None and not getattr(self.mask_mod, "_checks_bool", False):
            object.__setattr__(self, "mask_mod", _returning_bool(self.mask_mod, self.name))

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.mask_mod(b, h, q_idx, kv_idx)

    def __and__(self, other: Mask) -> Mask:
        other = as_mask(other)
        return Mask(
            lambda b, h, q, k: self.mask_mod(b, h, q, k) & other.mask_mod(b, h, q, k),
            f"({self.name} & {other.name})",
            _combine(self, other, torch.minimum),
            _combine_spec("and", self, other),
            _combine_extent(self, other),
        )

    def __or__(self, other: Mask) -> Mask:
        other = as_mask(other)
        return Mask(
            lambda b, h, q, k: self.mask_mod(b, h, q, k) | other.mask_mod(b, h, q, k),
            f"({self.name} | {other.name})",
            _combine(self, other, torch.maximum),
            _combine_spec("or", self, other),
            _combine_extent(self, other),
        )

    def __repr__(self) -> str:
        return f"Mask({self.name})"

    def dense(self, B: int, H: int, N_q: int, N_k: int, device: torch.device | str | None = None, *,
              q_pos0: int | None = None, k_pos0: int = 0) -> Tensor:
        """The mask as a bool tensor of shape (B, H, N_q, N_k) — for tests and the oracle (O(N_q·N_k) memory).

        Query row i sits at position ``q_pos0 + i`` (default ``N_k - N_q``: bottom-right), key j at ``k_pos0 + j``.
        """
        q_pos0 = N_k - N_q if q_pos0 is None else q_pos0
        b, h, q, k = grid(B, H, N_q, N_k, device, q_pos0=q_pos0, k_pos0=k_pos0)
        return self.mask_mod(b, h, q, k).expand(B, H, N_q, N_k)

    def block_states(self, B: int, H: int, N_q: int, N_k: int, block_q: int, block_k: int,
                     device: torch.device | str | None = None, *, q_pos0: int | None = None,
                     k_pos0: int = 0) -> Tensor:
        """int8 tensor (B or 1, H or 1, ceil(N_q/block_q), ceil(N_k/block_k)) of EMPTY / PARTIAL / FULL."""
        q_pos0 = N_k - N_q if q_pos0 is None else q_pos0
        q_lo = torch.arange(0, N_q, block_q, device=device)
        q_hi = torch.clamp(q_lo + block_q, max=N_q)
        k_lo = torch.arange(0, N_k, block_k, device=device)
        k_hi = torch.clamp(k_lo + block_k, max=N_k)
        if self.block_fn is not None:
            args = (q_lo[:, None] + q_pos0, q_hi[:, None] + q_pos0, k_lo[None, :] + k_pos0, k_hi[None, :] + k_pos0)
            states = self.block_fn(B, H, *args)
        else:
            states = _dense_block_states(self, B, H, N_q, N_k, block_q, block_k, device, q_pos0, k_pos0)
        while states.dim() < 4:
            states = states.unsqueeze(0)
        return states.to(torch.int8)


def grid(B: int, H: int, N_q: int, N_k: int, device=None, *, q_pos0: int = 0, k_pos0: int = 0):
    """Broadcastable (b, h, q_idx, kv_idx) index tensors for rows at positions q_pos0.. and keys at k_pos0.."""
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    q = torch.arange(q_pos0, q_pos0 + N_q, device=device).view(1, 1, N_q, 1)
    k = torch.arange(k_pos0, k_pos0 + N_k, device=device).view(1, 1, 1, N_k)
    return b, h, q, k


def _dense_block_states(mask: Mask, B, H, N_q, N_k, block_q, block_k, device, q_pos0, k_pos0) -> Tensor:
    n_qb, n_kb = -(-N_q // block_q), -(-N_k // block_k)
    states = torch.empty(B, H, n_qb, n_kb, dtype=torch.int8, device=device)
    pad = n_kb * block_k - N_k
    for i in range(n_qb):  # one block of query rows at a time keeps the memory at O(block_q * N_k)
        q0, q1 = i * block_q, min(N_q, (i + 1) * block_q)
        b, h, q, k = grid(B, H, q1 - q0, N_k, device, q_pos0=q_pos0 + q0, k_pos0=k_pos0)
        m = mask.mask_mod(b, h, q, k).expand(B, H, q1 - q0, N_k)
        any_ = torch.nn.functional.pad(m, (0, pad), value=False).view(B, H, q1 - q0, n_kb, block_k).any(-1).any(-2)
        all_ = torch.nn.functional.pad(m, (0, pad), value=True).view(B, H, q1 - q0, n_kb, block_k).all(-1).all(-2)
        states[:, :, i] = any_.to(torch.int8) + all_.to(torch.int8)
    return states


def _combine(a: Mask, b: Mask, op) -> BlockFn | None:
    if a.block_fn is None or b.block_fn is None:
        return None  # fall back to exact dense classification of the combined mask

    def block_fn(B, H, q_lo, q_hi, k_lo, k_hi):
        return op(a.block_fn(B, H, q_lo, q_hi, k_lo, k_hi), b.block_fn(B, H, q_lo, q_hi, k_lo, k_hi))

    return block_fn


def _combine_spec(op: str, a: Mask, b: Mask) -> tuple | None:
    return None if a.spec is None or b.spec is None else (op, a.spec, b.spec)


def _combine_extent(a: Mask, b: Mask) -> int | None:
    extents = [e for e in (a.key_extent, b.key_extent) if e is not None]
    return max(extents) if extents else None


def _returning_bool(mask_mod: MaskMod, name: str) -> MaskMod:
    """mask_mod, checked to return a bool tensor (a float or int one would be inverted and indexed wrongly)."""

    def checked(b, h, q_idx, kv_idx):
        m = mask_mod(b, h, q_idx, kv_idx)
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, Tensor) else type(m).__name__
            raise TypeError(f"mask_mod {name!r} returned {got}; a mask_mod must return a bool tensor (True = may "
                            "attend): build it from comparisons such as `kv_idx <= q_idx` (or end with `!= 0`), and "
                            "pass additive float scores as bias= instead")
        return m

    checked._checks_bool = True
    return checked


def _leaves(spec: tuple | None):
    if spec is None:
        return
    if spec[0] in ("and", "or"):
        yield from _leaves(spec[1])
        yield from _leaves(spec[2])
    else:
        yield spec


def check_fits(mask: Mask, B: int, N_k: int, where: str = "attention") -> None:
    """Raise ValueError when a ready-made mask was built for another batch size or sequence length than the call's:
    B batch elements and keys at positions 0 .. N_k - 1 (for a sharded sequence, N_k is the whole sequence's
    length)."""
    if mask.key_extent is not None and mask.key_extent > N_k:
        raise ValueError(f"{where}: mask {mask.name} counts {mask.key_extent} keys as real for some batch element, "
                         f"but there are only N_k = {N_k} keys; key_padding(lengths) needs lengths <= N_k")
    for kind, *args in _leaves(mask.spec):
        if kind == "document":
            ids = args[0]
            if ids.shape[-1] != N_k:
                raise ValueError(f"{where}: document(doc_ids) has ids for {ids.shape[-1]} positions but there are "
                                 f"N_k = {N_k} keys; give one id per key position, shape (N_k,) or (B, N_k)")
            if ids.dim() == 2 and ids.shape[0] not in (1, B):
                raise ValueError(f"{where}: document(doc_ids) of shape {tuple(ids.shape)} has ids for "
                                 f"{ids.shape[0]} batch elements, the call has B = {B}; give (B, N_k) or (N_k,)")
        elif kind in ("key_padding", "key_range") and args[0].numel() != B:
            what = "lengths" if kind == "key_padding" else "starts"
            raise ValueError(f"{where}: {kind}({what}) has {args[0].numel()} entries, the call has B = {B} batch "
                             f"elements; give one per batch element")


def from_spec(spec: tuple) -> Mask:
    """Rebuild a ready-made mask (or an and/or of them) from its ``spec``."""
    kind, *args = spec
    builders = {"causal": causal, "sliding_window": sliding_window, "key_padding": key_padding,
                "key_range": key_range, "document": document, "tensor": from_tensor}
    if kind == "and":
        return from_spec(args[0]) & from_spec(args[1])
    if kind == "or":
        return from_spec(args[0]) | from_spec(args[1])
    if kind not in builders:
        raise ValueError(f"unknown mask spec {kind!r}; known: {sorted(builders) + ['and', 'or']}")
    return builders[kind](*args)


def _state(any_visible: Tensor, all_visible: Tensor) -> Tensor:
    return any_visible.to(torch.int8) + (all_visible & any_visible).to(torch.int8)


# ----------------------------------------------------------------------------------------------- ready-made masks


def _causal_blocks(B, H, q_lo, q_hi, k_lo, k_hi):
    return _state(k_lo <= q_hi - 1, k_hi - 1 <= q_lo)


def _causal_mod(b, h, q, k):
    return k <= q


_CAUSAL = Mask(_causal_mod, "causal", _causal_blocks, ("causal",))


def causal() -> Mask:
    """A query sees its own position and every earlier one: ``kv_idx <= q_idx`` (bottom-right aligned).
    (One shared object: it holds no data, and caches keyed by the mask then hit across calls.)"""
    return _CAUSAL


def sliding_window(window: int) -> Mask:
    """Causal local attention: a query sees the ``window`` most recent positions, itself included
    (``q_idx - window < kv_idx <= q_idx``). Compute grows as N·window instead of N²."""
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"sliding_window(window) takes an int number of positions, got {window!r}")
    if window < 1:
        raise ValueError(f"sliding_window(window={window}): the window must be at least 1 (the query itself)")

    def block_fn(B, H, q_lo, q_hi, k_lo, k_hi):
        any_ = (k_lo <= q_hi - 1) & (k_hi - 1 > q_lo - window)
        all_ = (k_hi - 1 <= q_lo) & (k_lo > q_hi - 1 - window)
        return _state(any_, all_)

    return Mask(lambda b, h, q, k: (k <= q) & (k > q - window), f"sliding_window({window})", block_fn,
                ("sliding_window", window))


def key_padding(lengths: Tensor) -> Mask:
    """Batch element b has ``lengths[b]`` real keys; the rest are padding: ``kv_idx < lengths[b]``."""
    lengths = _int_tensor("key_padding(lengths)", lengths, dim=1)
    lo, extent = _min_max(lengths)
    if lo is not None and lo < 0:
        raise ValueError(f"key_padding(lengths): lengths must be >= 0, got {lengths.tolist()}")

    def mask_mod(b, h, q, k):
        return k < lengths.to(k.device)[b]

    def block_fn(B, H, q_lo, q_hi, k_lo, k_hi):
        L = lengths.to(k_lo.device).view(-1, 1, 1, 1)
        return _state(k_lo < L, k_hi <= L).expand(-1, 1, q_lo.shape[0], -1)

    return Mask(mask_mod, "key_padding", block_fn, ("key_padding", lengths), extent)


def key_range(starts: Tensor, ends: Tensor | None = None) -> Mask:
    """Batch element b has real keys only at ``starts[b] <= kv_idx < ends[b]`` (no end when ``ends`` is None); the
    rest are padding. Left padding (batched generation) is ``key_range(N_k - lengths)``; ``key_range(zeros,
    lengths)`` is ``key_padding(lengths)``. A batch element with ``starts[b] >= ends[b]`` has no key: its rows give
    zeros. ::

        key_range(starts=[2, 0], ends=[5, 3]), N_k = 5      (with causal(): each row also stops at its diagonal)
                   k0 k1 k2 k3 k4
        b = 0:      .  .  1  1  1
        b = 1:      1  1  1  .  .
    """
    starts = _int_tensor("key_range(starts)", starts, dim=1)
    if ends is not None:
        ends = _int_tensor("key_range(ends)", ends, dim=1)
        if ends.shape != starts.shape:
            raise ValueError(f"key_range(starts, ends): one start and one end per batch element, got shapes "
                             f"{tuple(starts.shape)} and {tuple(ends.shape)}")
    for name, t in (("starts", starts), ("ends", ends)):
        lo, _ = _min_max(t) if t is not None else (None, None)
        if lo is not None and lo < 0:
            raise ValueError(f"key_range({name}): positions must be >= 0, got {t.tolist()}")

    def bounds(device):
        s = starts.to(device)
        return s, (ends.to(device) if ends is not None else None)

    def mask_mod(b, h, q, k):
        s, e = bounds(k.device)
        keep = k >= s[b]
        return keep if e is None else keep & (k < e[b])

    def block_fn(B, H, q_lo, q_hi, k_lo, k_hi):
        s, e = bounds(k_lo.device)
        s = s.view(-1, 1, 1, 1)
        any_, all_ = k_hi > s, k_lo >= s
        if e is not None:
            e = e.view(-1, 1, 1, 1)
            any_, all_ = any_ & (k_lo < e) & (s < e), all_ & (k_hi <= e)
        return _state(any_, all_).expand(-1, 1, q_lo.shape[0], -1)

    return Mask(mask_mod, "key_range", block_fn, ("key_range", starts, ends))


def document(doc_ids: Tensor) -> Mask:
    """Packed sequences: ``doc_ids[b, pos]`` (or ``doc_ids[pos]``) names the document of each key position; a query
    sees only keys of its own document: ``doc_ids[q_idx] == doc_ids[kv_idx]``. Combine with ``causal()`` for a
    packed decoder batch. Blocks whose id ranges do not meet are skipped (exact for sorted ids)."""
    doc_ids = _int_tensor("document(doc_ids)", doc_ids, dim=None)
    if doc_ids.dim() not in (1, 2):
        raise ValueError(f"document(doc_ids): expected shape (N_k,) or (B, N_k), got {tuple(doc_ids.shape)}")
    return _document(doc_ids, "document", _range_minmax)


def _document(doc_ids: Tensor, name: str, range_minmax) -> Mask:
    ids = doc_ids if doc_ids.dim() == 2 else doc_ids[None]  # (B or 1, N_k)
    n = ids.shape[-1]

    def mask_mod(b, h, q, k):
        d = ids.to(q.device)
        bb = b if d.shape[0] > 1 else torch.zeros_like(b)
        valid = (q >= 0) & (q < n)
        return valid & (d[bb, q.clamp(0, n - 1)] == d[bb, k])

    def block_fn(B, H, q_lo, q_hi, k_lo, k_hi):
        d = ids.to(q_lo.device)
        big = torch.iinfo(d.dtype).max
        lo_q, hi_q = range_minmax(d, q_lo[:, 0], q_hi[:, 0], big)  # (Bd, nQ)
        lo_k, hi_k = range_minmax(d, k_lo[0], k_hi[0], big)  # (Bd, nK)
        any_ = (lo_q[:, :, None] <= hi_k[:, None, :]) & (lo_k[:, None, :] <= hi_q[:, :, None])
        all_ = (lo_q == hi_q)[:, :, None] & (lo_k == hi_k)[:, None, :] & (lo_q[:, :, None] == lo_k[:, None, :])
        all_ &= ((q_lo >= 0) & (q_hi <= n))[None]  # query positions outside the ids belong to no document
        return _state(any_, all_)[:, None]

    return Mask(mask_mod, name, block_fn, ("document", doc_ids))


def _range_minmax(ids: Tensor, lo: Tensor, hi: Tensor, big: int):
    """min and max of ids[:, lo:hi] for each range; empty or out-of-range parts are ignored."""
    n = ids.shape[-1]
    out_min = torch.full((ids.shape[0], lo.numel()), big, dtype=ids.dtype, device=ids.device)
    out_max = torch.full((ids.shape[0], lo.numel()), -big, dtype=ids.dtype, device=ids.device)
    for j, (a, c) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True)):
        a, c = max(a, 0), min(c, n)
        if c > a:
            seg = ids[:, a:c]
            out_min[:, j] = seg.min(-1).values
            out_max[:, j] = seg.max(-1).values
    return out_min, out_max


def _sorted_range_minmax(ids: Tensor, lo: Tensor, hi: Tensor, big: int):
    """``_range_minmax`` for ids that never decrease along positions: the ends of each range, no loop."""
    n = ids.shape[-1]
    a, c = lo.clamp(0, n), hi.clamp(0, n)
    empty = (c <= a)[None]
    first = ids[:, a.clamp(max=max(n - 1, 0))]  # (Bd, ranges)
    last = ids[:, (c - 1).clamp(min=0)]
    return first.masked_fill(empty, big), last.masked_fill(empty, -big)


def packed(cu_seqlens: Tensor, total: int | None = None) -> Mask:
    """Packed sequences described FlashAttention's way: sequence s holds positions ``cu_seqlens[s]`` to
    ``cu_seqlens[s + 1] - 1``, and a query sees only keys of its own sequence. The same mask as
    ``document(ids)`` with ``ids[pos]`` = the sequence of ``pos`` (so every backend and kernel takes it), built on
    cu_seqlens' device without a loop over sequences; its blocks are classified from the ends of each block alone.

    ``cu_seqlens`` is a 1-D integer tensor (n_seqs + 1,) with ``cu_seqlens[0] == 0``, never decreasing (a sequence
    may be empty); the total length is ``cu_seqlens[-1]``. Combine with ``causal()`` or ``sliding_window(w)`` for
    causal attention within each sequence. ``total`` (the number of packed positions, T) is checked against
    ``cu_seqlens[-1]``; give it to avoid reading that value back from a GPU (and under ``torch.compile``, where the
    values are not checked). ``selfattn.varlen_attention`` builds (and remembers) this mask for you.

        >>> packed(torch.tensor([0, 2, 5])).dense(1, 1, 5, 5)[0, 0].int()
        tensor([[1, 1, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [0, 0, 1, 1, 1],
                [0, 0, 1, 1, 1],
                [0, 0, 1, 1, 1]], dtype=torch.int32)
    """
    cu = _int_tensor("packed(cu_seqlens)", cu_seqlens, dim=1)
    if cu.numel() == 0:
        raise ValueError("packed(cu_seqlens): cu_seqlens is empty; it needs n_seqs + 1 entries, starting with 0 "
                         "(e.g. tensor([0, 5, 12]) for sequences of 5 and 7 tokens)")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
        raise TypeError(f"packed(cu_seqlens, total): total must be an int >= 0 (the packed length T), got {total!r}")
    if not torch.compiler.is_compiling():  # reading the values would break a graph
        check_cu_seqlens(cu, total)
    T = int(cu[-1]) if total is None else total
    pos = torch.arange(T, device=cu.device)  # (T,)
    ids = torch.searchsorted(cu[1:], pos, right=True)  # (T,) sequence of each position; empty sequences get none
    return _document(ids, f"packed({cu.numel() - 1} seqs)", _sorted_range_minmax)


def check_cu_seqlens(cu_seqlens: Tensor, total: int | None = None, where: str = "packed(cu_seqlens)") -> None:
    """Raise ValueError unless cu_seqlens starts at 0, never decreases and (if given) ends at ``total``."""
    cu = cu_seqlens.detach().cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"{where}: cu_seqlens must start at 0, got cu_seqlens[0] = {int(cu[0])}; prepend a 0 "
                         "(cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]))")
    steps = cu[1:] - cu[:-1]
    if (steps < 0).any():
        s = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(f"{where}: cu_seqlens must never decrease (each entry is the previous one plus a sequence "
                         f"length), got cu_seqlens[{s}] = {int(cu[s])} > cu_seqlens[{s + 1}] = {int(cu[s + 1])}")
    if total is not None and int(cu[-1]) != total:
        raise ValueError(f"{where}: cu_seqlens[-1] = {int(cu[-1])} must equal the number of packed positions "
                         f"T = {total}; cu_seqlens has {cu.numel() - 1} sequences covering {int(cu[-1])} tokens")


def from_tensor(mask: Tensor, N_q: int, N_k: int) -> Mask:
    """Wrap a dense bool tensor broadcastable to (B, H, N_q, N_k) (True = visible) as a Mask. It is indexed by
    position with the default alignment: row i at position i + N_k - N_q, key j at position j."""
    if mask.dtype != torch.bool:
        raise TypeError(f"a mask tensor must be torch.bool (True = visible), got {mask.dtype}; pass additive float"
                        " scores as bias=")
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    offset = N_k - N_q

    def mask_mod(b, h, q, k):
        t = m.to(q.device)
        bi = b if t.shape[0] > 1 else torch.zeros_like(b)
        hi = h if t.shape[1] > 1 else torch.zeros_like(h)
        qi = (q - offset) if t.shape[2] > 1 else torch.zeros_like(q)
        ki = k if t.shape[3] > 1 else torch.zeros_like(k)
        return t[bi, hi, qi, ki]

    return Mask(mask_mod, f"tensor{tuple(mask.shape)}", spec=("tensor", mask, N_q, N_k))


def as_mask(mask) -> Mask:
    if isinstance(mask, Mask):
        return mask
    if callable(mask):
        return Mask(mask, getattr(mask, "__name__", "custom"))
    raise TypeError(f"expected a selfattn.masks.Mask or a mask_mod(b, h, q_idx, kv_idx) function, got {type(mask)}")


def _min_max(t: Tensor) -> tuple[int | None, int | None]:
    """(min, max) of t in one read, or (None, None) while torch.compile traces (reading values would break the graph)
    and for an empty t."""
    if torch.compiler.is_compiling() or t.numel() == 0:
        return None, None
    lo, hi = torch.stack(t.aminmax()).tolist()
    return lo, hi


def _int_tensor(where: str, t, dim: int | None) -> Tensor:
    if not isinstance(t, Tensor):
        try:
            t = torch.as_tensor(t)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{where}: expected an integer tensor (or a list of ints), got {t!r}") from None
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{where}: expected an integer tensor, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{where}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    return t.long()
