"""Ring attention (context parallelism): one sequence split over the P ranks of a ``torch.distributed`` group.

Each rank keeps its queries; key/value shards travel around the ring (rank r sends to r + 1, receives from r − 1)
while the rank computes attention of its queries against the shard it holds, and partial results merge by
log-sum-exp — exact, with O(N/P) memory per rank (Liu et al., "Ring Attention with Blockwise Transformers").
The backward sends the key/value shards around once more, and the dK/dV accumulators travel with them, back to the
rank that owns them. Sends of the next shard overlap the computation on this one.

    rank r holds rows (B, H, n, D) with n = N / P;  q, k, v all follow the same sharding (self-attention)

Sharding layouts (``layout=``), shown for N = 8 positions on P = 2 ranks::

    contiguous   rank 0: 0 1 2 3   rank 1: 4 5 6 7       (causal: rank 1 does 3x the work of rank 0)
    zigzag       rank 0: 0 1 6 7   rank 1: 2 3 4 5       (2P chunks; rank r holds chunks r and 2P − 1 − r,
                                                           so under a causal mask every rank does the same work)

Masks are evaluated at global positions (``AttentionCall.q_pos0/k_pos0``), so causal, sliding-window and document
masks (with the *global* ``doc_ids`` on every rank) mean what they mean on one device; blocks a mask hides entirely
are skipped, and the ring stops after the last shard any rank needs (a sliding window of w ≤ N/P over contiguous
shards: one hop instead of P − 1), the dK/dV accumulators then going straight home. Each block runs on a local
backend of the registry that computes blocks (``supports_blocks``); partial outputs are merged in float64 and
gradients accumulated in float32 (float64 for float64 inputs).

No launcher of its own: start the processes with ``torchrun`` and call ``torch.distributed.init_process_group``
("gloo" on CPUs, "nccl" on GPUs — with NCCL, set the CUDA device of each rank first). Every rank must call
``ring_attention`` with the same shapes and options; a mismatch raises ``ValueError`` on every rank, and a peer
that dies or stops calling makes the others raise ``RingError`` within ``timeout`` seconds (default: the process
group's timeout, set by ``init_process_group(timeout=...)``).

Example (run with ``torchrun --nproc-per-node 2 script.py``)::

    import torch, torch.distributed as dist, selfattn.distributed as sd
    dist.init_process_group("gloo")
    x = torch.randn(1, 4, 4096, 64)                                     # (B, H, N, D), the same on every rank
    q = k = v = sd.shard(x, dist.get_rank(), dist.get_world_size())    # (B, H, N/P, D)
    out = sd.ring_attention(q, k, v, causal=True)                       # (B, H, N/P, D), this rank's rows
    full = sd.gather(out)                                               # (B, H, N, D), in sequence order
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
from torch import Tensor

from selfattn import backends, masks, score_mods
from selfattn.api import make_call
from selfattn.backends import AttentionCall, Backend, merge_by_lse

LAYOUTS = ("zigzag", "contiguous")
_TAG_KV, _TAG_DKV = 11, 12  # gloo matches point-to-point messages by tag; NCCL by order (the same on every rank)
_MASK_ROWS_PER_CHECK = 512  # a custom mask is classified in slabs of this many rows to bound its memory


class RingError(RuntimeError):
    """A peer did not answer in time (it died, hangs, or is not calling ring_attention); the group is unusable."""


@dataclass(frozen=True)
class Segment:
    """Rows ``local_start : local_start + length`` of a shard sit at global positions ``pos0 : pos0 + length``."""

    local_start: int
    length: int
    pos0: int

    @property
    def rows(self) -> slice:
        return slice(self.local_start, self.local_start + self.length)


# ------------------------------------------------------------------------------------------------------- sharding


def segments(rank: int, world_size: int, n_local: int, layout: str = "zigzag") -> tuple[Segment, ...]:
    """Where the ``n_local`` rows of ``rank`` sit in the global sequence of N = n_local · world_size positions."""
    _check_layout(layout)
    if layout == "contiguous":
        return (Segment(0, n_local, rank * n_local),)
    if n_local % 2:
        raise ValueError(f"zigzag sharding splits each shard in two: the rows per rank must be even, got "
                         f"n = N/P = {n_local}; make N a multiple of 2·P = {2 * world_size} or use "
                         "layout='contiguous'")
    c = n_local // 2
    return Segment(0, c, rank * c), Segment(c, c, (2 * world_size - 1 - rank) * c)


def positions(n_total: int, rank: int, world_size: int, layout: str = "zigzag", device=None) -> Tensor:
    """The global positions (n_total / world_size,) of the rows ``rank`` holds (e.g. for rotary embeddings)."""
    n_local = _rows_per_rank(n_total, world_size, layout)
    return torch.cat([torch.arange(s.pos0, s.pos0 + s.length, device=device)
                      for s in segments(rank, world_size, n_local, layout)])


def shard(x: Tensor, rank: int, world_size: int, *, layout: str = "zigzag", dim: int = 2) -> Tensor:
    """The rows of ``x`` (whole sequence along ``dim``, default the N of (B, H, N, D)) that ``rank`` holds."""
    _check_rank(rank, world_size)
    n_local = _rows_per_rank(x.shape[dim], world_size, layout)
    return torch.cat([x.narrow(dim, s.pos0, s.length) for s in segments(rank, world_size, n_local, layout)], dim)


def unshard(pieces: list[Tensor], *, layout: str = "zigzag", dim: int = 2) -> Tensor:
    """Inverse of ``shard``: the shards of ranks 0..P−1 (in rank order) back into the whole sequence."""
    world_size = len(pieces)
    if world_size == 0:
        raise ValueError("unshard needs the shards of every rank, got an empty list")
    n_local = pieces[0].shape[dim]
    parts = []
    for rank, piece in enumerate(pieces):
        if piece.shape[dim] != n_local:
            raise ValueError(f"shard {rank} has {piece.shape[dim]} rows along dim {dim}, shard 0 has {n_local}")
        parts += [(s.pos0, piece.narrow(dim, s.local_start, s.length))
                  for s in segments(rank, world_size, n_local, layout)]
    return torch.cat([p for _, p in sorted(parts, key=lambda t: t[0])], dim)


def gather(x: Tensor, *, layout: str = "zigzag", dim: int = 2, group=None) -> Tensor:
    """Collective: every rank passes its shard and gets the whole sequence back (``unshard`` of an all_gather)."""
    dist = _dist()
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return unshard(pieces, layout=layout, dim=dim)


# ------------------------------------------------------------------------------------------------ ring attention


@dataclass(frozen=True)
class _Ring:
    """Everything both passes need: who we are, where our rows sit, and which blocks each ring step computes."""

    group: object
    rank: int
    world_size: int
    template: AttentionCall  # the scale, mask and causal flag of every block call
    backend: Backend
    steps: tuple  # steps[s] = ((q segment, k segment, mask or None), ...) for the shard held at ring step s
    timeout: timedelta

    def call(self, q_seg: Segment, k_seg: Segment, mask, q, k, v) -> AttentionCall:
        return replace(self.template, q=q, k=k, v=v, mask=mask, causal=self.template.causal and mask is not None,
                       q_pos0=q_seg.pos0, k_pos0=k_seg.pos0)


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: masks.Mask | None = None,
    scale: float | None = None,
    layout: str = "zigzag",
    group=None,
    backend: str | None = None,
    key_block: int | None = None,
    timeout: float | None = None,
    return_lse: bool = False,
    score_mod=None,
    sinks: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
):
    """Exact attention of this rank's queries over the keys of every rank of ``group``; differentiable.

    Args:
        q, k, v: this rank's shard, (B, H_q, n, D), (B, H_kv, n, D), (B, H_kv, n, D_v), with n = N/P rows laid
            out as ``layout`` says (use ``shard``); the same shapes on every rank.
        causal: causal over global positions; combined with ``mask`` by "and".
        mask: a ``selfattn.masks.Mask`` (or mask_mod) evaluated at *global* positions; a document mask takes the
            global doc_ids. Bool-tensor masks and additive biases are not supported here.
        scale: multiplies q·kᵀ; default 1/√D.
        layout: "zigzag" (balanced causal work; n must be even) or "contiguous".
        group: the process group (default: the world).
        backend: a registered backend with ``supports_blocks`` or None to choose the first that can serve.
        key_block: hand the backend at most this many keys per call (None: a whole shard, or half a shard for
            zigzag). Bounds the memory of backends that materialise the scores, such as "reference", to
            O(n · key_block); smaller blocks also skip more of what a causal or window mask hides.
        timeout: seconds to wait for a peer before raising ``RingError`` (default: the group's timeout).
        return_lse: also return the per-row log-sum-exp (B, H_q, n) in float32 (−inf for fully masked rows).
        score_mod: as for ``selfattn.attention``, evaluated at *global* positions; the tensors it reads (slopes,
            tables) get no gradient here (the block API has none): pass ones that do not require grad.
        sinks: (H_q,) sink logits, joined after the blocks are merged; their gradient is this rank's rows' share
            (sum it over the ranks, as DDP's all-reduce does).
        dropout_p, dropout_seed: dropout at global positions; give every rank the same int seed.

    Returns:
        out (B, H_q, n, D_v) in the input dtype (this rank's rows), or (out, lse).
    """
    ring = _prepare(q, k, v, causal=causal, mask=mask, scale=scale, layout=layout, group=group, backend=backend,
                    key_block=key_block, timeout=timeout,
                    variants=dict(score_mod=score_mod, sinks=sinks, dropout_p=dropout_p, dropout_seed=dropout_seed))
    out, lse = _RingAttention.apply(q, k, v, ring.template.sinks, ring)
    return (out, lse) if return_lse else out


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, ring: _Ring):
        out, lse = _forward(ring, q, k, v)
        if sinks is not None:  # the sink joins every row's softmax once the blocks are merged
            out, lse = score_mods.add_sinks(out, lse, sinks)
        ctx.ring = ring
        acc = _acc(q.dtype)
        ctx.save_for_backward(q, k, v, out.to(acc), lse.to(acc), sinks)
        lse = lse.to(torch.float32)
        ctx.mark_non_differentiable(lse)  # returned for inspection and merging; gradients flow through out only
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv = _backward(ctx.ring, q, k, v, out, lse, d_out)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            dsinks = score_mods.sinks_grad(out, lse, d_out, sinks)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks, None


def _forward(ring: _Ring, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """out (B, H_q, n, D_v) and lse (B, H_q, n), merged over every visible block in float64: a rounding error of
    the merged lse scales every probability of the backward, and one merge per block would add them up."""
    B, H_q, n, _ = q.shape
    D, acc = k.shape[-1], torch.float64
    out = torch.zeros(B, H_q, n, v.shape[-1], dtype=acc, device=q.device)  # (B, H_q, n, D_v)
    lse = torch.full((B, H_q, n), -math.inf, dtype=acc, device=q.device)
    kv = torch.cat((k, v), dim=-1)  # (B, H_kv, n, D + D_v): one message per step
    for step, blocks in enumerate(ring.steps):
        pending = _pass_on(ring, kv, _TAG_KV) if step < len(ring.steps) - 1 else None
        for q_seg, k_seg, mask in blocks:
            rows, keys = q_seg.rows, k_seg.rows
            call = ring.call(q_seg, k_seg, mask, q[:, :, rows], kv[:, :, keys, :D], kv[:, :, keys, D:])
            o_b, lse_b = ring.backend.forward_block(call)
            out[:, :, rows], lse[:, :, rows] = merge_by_lse([out[:, :, rows], o_b], [lse[:, :, rows], lse_b])
        if pending is not None:
            kv = _arrived(ring, pending, "key/value shard")
    return out, lse


def _backward(ring: _Ring, q, k, v, out, lse, d_out):
    D, acc = k.shape[-1], _acc(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, H_q, n, D)
    kv = torch.cat((k, v), dim=-1)  # (B, H_kv, n, D + D_v)
    incoming = None  # dK|dV of the shard held now, accumulated by the ranks that held it before
    last = len(ring.steps) - 1
    home = ring.world_size - last  # hops forward from the rank holding a shard after the last step to its owner
    for step, blocks in enumerate(ring.steps):
        pending = _pass_on(ring, kv, _TAG_KV) if step < last else None
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # this rank's share of the held shard's gradient
        for q_seg, k_seg, mask in blocks:
            rows, keys = q_seg.rows, k_seg.rows
            call = ring.call(q_seg, k_seg, mask, q[:, :, rows], kv[:, :, keys, :D], kv[:, :, keys, D:])
            dq_b, dk_b, dv_b = ring.backend.backward_block(call, out[:, :, rows], lse[:, :, rows],
                                                           d_out[:, :, rows])
            dq[:, :, rows] += dq_b
            dkv[:, :, keys, :D] += dk_b
            dkv[:, :, keys, D:] += dv_b
        if incoming is not None:
            dkv += _arrived(ring, incoming, "dK/dV accumulator")
        if step < last or home < ring.world_size:  # after the last step, straight home (nothing to do at home)
            incoming = _pass_on(ring, dkv, _TAG_DKV, hops=1 if step < last else home)
        if pending is not None:
            kv = _arrived(ring, pending, "key/value shard")
    if home < ring.world_size:
        dkv = _arrived(ring, incoming, "dK/dV of this rank's keys")
    return dq, dkv[..., :D], dkv[..., D:]


def _pass_on(ring: _Ring, t: Tensor, tag: int, hops: int = 1):
    """Start sending ``t`` to the rank ``hops`` ahead and receiving its counterpart from the one ``hops`` behind."""
    dist = _dist()
    t = t.contiguous()
    buf = torch.empty_like(t)
    nxt, prv = (ring.rank + hops) % ring.world_size, (ring.rank - hops) % ring.world_size
    ops = [dist.P2POp(dist.isend, t, group=ring.group, tag=tag, group_peer=nxt),
           dist.P2POp(dist.irecv, buf, group=ring.group, tag=tag, group_peer=prv)]
    return t, buf, dist.batch_isend_irecv(ops)


def _arrived(ring: _Ring, pending, what: str) -> Tensor:
    _sent, buf, works = pending
    for work in works:
        _wait(ring, work, f"the {what} (sending and receiving)")
    return buf


def _wait(ring: _Ring, work, what: str) -> None:
    try:
        work.wait(ring.timeout)
    except RuntimeError as e:  # DistBackendError and gloo's timeouts / closed connections
        raise RingError(
            f"rank {ring.rank}: waiting for {what} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); a "
            "peer died, hangs, or does not call ring_attention; the process group is unusable now"
        ) from e


# ------------------------------------------------------------------------------------------------ preparation


def _prepare(q, k, v, *, causal, mask, scale, layout, group, backend, key_block, timeout, variants=None) -> _Ring:
    """Validate locally, then agree with every rank (one small all-gather) before any point-to-point message, so
    a mistake on one rank raises on all of them instead of hanging the others."""
    dist = _dist()
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group; call ring_attention only on "
                         "the ranks of `group`")
    local_error, signature, template, chosen, wait = None, None, None, None, timedelta(0)
    try:
        wait = _check_timeout(timeout)
        _check_key_block(key_block)
        template, chosen = _check_local(q, k, v, causal, mask, scale, layout, backend, world_size, variants or {})
        signature = (tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype), causal, layout, template.scale,
                     template.mask.name if template.mask is not None else None, chosen.name, key_block,
                     template.needs_grad, template.score_mod.name if template.score_mod is not None else None,
                     template.sinks is not None, template.dropout_p, template.dropout_seed)
        steps = _plan(template, rank, world_size, layout, key_block)
    except Exception as e:  # noqa: BLE001 - tell the other ranks before raising, or they would wait for us
        local_error, steps = e, ()
    last_needed = max((s for s, blocks in enumerate(steps) if blocks), default=0)
    device = q.device if isinstance(q, Tensor) and _backend_name(group) == "nccl" else torch.device("cpu")
    everyone = _all_gather_objects((None if local_error is None else f"{type(local_error).__name__}: {local_error}",
                                    signature, last_needed), group, device, wait, rank)
    errors = [f"rank {r}: {err}" for r, (err, _, _) in enumerate(everyone) if err is not None]
    if errors:
        message = "ring_attention failed its checks on some ranks:\n  " + "\n  ".join(errors)
        if local_error is not None and not isinstance(local_error, (TypeError, ValueError)):
            raise local_error
        raise (type(local_error) if local_error is not None else ValueError)(message) from local_error
    _check_agreement([sig for _, sig, _ in everyone])
    n_steps = 1 + max(last for _, _, last in everyone)  # e.g. a sliding window reaches only the next shards
    return _Ring(group, rank, world_size, template, chosen, tuple(steps[:n_steps]), wait)


def _plan(template: AttentionCall, rank: int, world_size: int, layout: str, key_block: int | None) -> list:
    """For each ring step s (holding the shard of rank − s), the visible (query segment, key segment, mask) blocks."""
    n = template.N_q
    mine = segments(rank, world_size, n, layout)
    steps = []
    for step in range(world_size):
        theirs = [piece for seg in segments((rank - step) % world_size, world_size, n, layout)
                  for piece in _split(seg, key_block)]
        steps.append(tuple((qs, ks, m) for qs in mine for ks in theirs
                           for visible, m in [_block_mask(template, qs, ks)] if visible))
    return steps


def _check_local(q, k, v, causal, mask, scale, layout, backend, world_size, variants):
    _check_layout(layout)
    if isinstance(mask, Tensor):
        raise TypeError("ring_attention takes a selfattn.masks.Mask evaluated at global positions, not a bool "
                        "tensor; wrap a global (N, N) tensor with masks.from_tensor(mask, N, N)")
    if variants.get("dropout_p") and variants.get("dropout_seed") is None:
        raise ValueError("ring_attention with dropout needs dropout_seed: one int, the same on every rank (each "
                         "rank's generator would draw another)")
    call = make_call(q, k, v, causal=causal, mask=mask, scale=scale, positions=q.shape[2] * world_size, **variants)
    grads = [t for t in call.captures if t.requires_grad]
    if grads and torch.is_grad_enabled():
        raise ValueError(f"ring_attention gives no gradient to the tensors score_mod {call.score_mod.name!r} reads "
                         f"({len(grads)} require grad); pass them detached, or use selfattn.attention")
    if call.N_q != call.N_k:
        raise ValueError(f"ring attention is self-attention over one sharded sequence: q has n={call.N_q} rows and "
                         f"k has n={call.N_k}; shard q, k and v the same way")
    if call.N_q == 0:
        raise ValueError("every rank needs at least one row (got n=0); make N at least P")
    segments(0, world_size, call.N_q, layout)  # zigzag needs an even n
    return call, choose_block_backend(call, backend)


def choose_block_backend(call: AttentionCall, name: str | None = None) -> Backend:
    """The first backend of the registry (or the named one) that computes blocks and can serve this call."""
    if name is not None:
        chosen = backends.choose(call, name)
        if not chosen.supports_blocks:
            able = [n for n, b in backends.REGISTRY.items() if b.supports_blocks]
            raise ValueError(f"backend {name!r} does not compute blocks (supports_blocks=False), which ring "
                             f"attention needs; use one of {able} or backend=None")
        return chosen
    why = {}
    for n, b in backends.REGISTRY.items():
        reasons = (b.not_supported_reasons(call) or b.auto_reasons(call)) if b.supports_blocks else \
            ["does not compute blocks"]
        if not reasons:
            return b
        why[n] = reasons
    raise backends.BackendError(f"no backend can compute the blocks of this call ({call.describe()}):\n"
                                + "\n".join(f"  {n}: {'; '.join(r)}" for n, r in why.items()))


def _check_agreement(signatures: list[tuple]) -> None:
    fields = ("q shape", "k shape", "v shape", "dtype", "causal", "layout", "scale", "mask", "backend", "key_block",
              "inputs require grad (so every rank must run the backward)")
    diffs = [f"{name}: " + ", ".join(f"rank {r}: {sig[i]}" for r, sig in enumerate(signatures))
             for i, name in enumerate(fields) if len({sig[i] for sig in signatures}) > 1]
    if diffs:
        raise ValueError("every rank must call ring_attention with the same shapes and options; they differ in\n  "
                         + "\n  ".join(diffs))


def _block_mask(template: AttentionCall, q_seg: Segment, k_seg: Segment):
    """(visible, mask to pass): skip blocks the mask hides entirely; drop the mask where it hides nothing."""
    mask = template.mask
    if mask is None:
        return True, None
    B, H = template.B, template.H_q
    rows = min(q_seg.length, _MASK_ROWS_PER_CHECK)
    states = mask.block_states(B, H, q_seg.length, k_seg.length, rows, k_seg.length, template.device,
                               q_pos0=q_seg.pos0, k_pos0=k_seg.pos0)
    if bool((states == masks.EMPTY).all()):
        return False, None
    return True, (None if bool((states == masks.FULL).all()) else mask)


def _split(seg: Segment, most: int | None) -> list[Segment]:
    if most is None or seg.length <= most:
        return [seg]
    return [Segment(seg.local_start + a, min(most, seg.length - a), seg.pos0 + a) for a in range(0, seg.length, most)]


def _all_gather_objects(obj, group, device, wait: timedelta, rank: int) -> list:
    """all_gather_object with a timeout: sizes first, then the pickled bytes padded to the longest."""
    dist = _dist()
    world_size = dist.get_world_size(group)
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], dtype=torch.long, device=device)
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    ring = _Ring(group, rank, world_size, None, None, (), wait)  # only for the error message of _wait
    _wait(ring, dist.all_gather(sizes, size, group=group, async_op=True), "the other ranks' shapes")
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    _wait(ring, dist.all_gather(gathered, padded, group=group, async_op=True), "the other ranks' shapes")
    return [pickle.loads(g[: int(s.item())].cpu().numpy().tobytes()) for g, s in zip(gathered, sizes, strict=True)]


# --------------------------------------------------------------------------------------------------- small helpers


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; install a build with distributed support")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: launch with torchrun and call "
                           "torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (GPU) first")
    return dist


def _backend_name(group) -> str:
    return str(_dist().get_backend(group)).lower()


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _check_rank(rank, world_size) -> None:
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _rows_per_rank(n_total: int, world_size: int, layout: str) -> int:
    _check_layout(layout)
    parts = 2 * world_size if layout == "zigzag" else world_size
    if n_total % parts:
        raise ValueError(f"{layout} sharding over {world_size} ranks splits the sequence into {parts} equal parts: "
                         f"N={n_total} is not a multiple of {parts}; pad the sequence to "
                         f"{-(-n_total // parts) * parts}")
    return n_total // world_size


def _check_key_block(key_block) -> None:
    if key_block is not None and (isinstance(key_block, bool) or not isinstance(key_block, int) or key_block < 1):
        raise ValueError(f"key_block must be a positive int (keys per backend call) or None, got {key_block!r}")


def _check_timeout(timeout) -> timedelta:
    if timeout is None:
        return timedelta(0)  # Work.wait's "use the process group's timeout"
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return timedelta(seconds=timeout)


__all__ = ["LAYOUTS", "RingError", "Segment", "segments", "positions", "shard", "unshard", "gather",
           "choose_block_backend", "ring_attention"]
