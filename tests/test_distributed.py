"""Ring attention over real process groups: 2 and 4 CPU processes with gloo on 127.0.0.1, compared with the
single-process float64 oracle; the failure modes (disagreeing ranks, a dead peer, a stalled peer) raise in time.

Starting processes is slow, so each spawned group runs many checks and reports them all back at once.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import socket
import time
import traceback

import pytest
import torch

import selfattn
from selfattn import distributed as sd
from selfattn import masks, reference, testing
from selfattn.api import make_call

GROUP_TIMEOUT_S = 150  # a hang fails the test after this long instead of blocking the suite


# ------------------------------------------------------------------------------------ sharding, in one process


def test_zigzag_and_contiguous_positions_match_the_docstring():
    assert sd.positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert sd.positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert sd.positions(8, 1, 2, "contiguous").tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("layout", sd.LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_unshard_inverts_shard_and_positions_say_where_rows_went(layout, world_size):
    N = 2 * world_size * 3
    x = torch.randn(2, 3, N, 5)
    pieces = [sd.shard(x, r, world_size, layout=layout) for r in range(world_size)]
    assert torch.equal(sd.unshard(pieces, layout=layout), x)
    for r, piece in enumerate(pieces):
        assert torch.equal(piece, x[:, :, sd.positions(N, r, world_size, layout)])
    tokens = torch.arange(N).repeat(2, 1)  # (B, N): shard along dim 1 as the training example does
    assert torch.equal(sd.shard(tokens, 1 % world_size, world_size, layout=layout, dim=1)[0],
                       sd.positions(N, 1 % world_size, world_size, layout))


def test_zigzag_gives_every_rank_the_same_causal_work():
    """Visible (query, key) pairs per rank under a causal mask: equal for zigzag, 1:3:5:7 for contiguous."""
    N, P = 64, 4
    visible = masks.causal().dense(1, 1, N, N)[0, 0]  # (N, N)
    work = {layout: [int(visible[sd.positions(N, r, P, layout)].sum()) for r in range(P)] for layout in sd.LAYOUTS}
    assert len(set(work["zigzag"])) == 1, work
    assert work["contiguous"] == sorted(work["contiguous"]) and work["contiguous"][-1] > 3 * work["contiguous"][0]


def test_bad_sharding_arguments_say_the_fix():
    with pytest.raises(ValueError, match=r"N=10 is not a multiple of 4; pad the sequence to 12"):
        sd.shard(torch.zeros(1, 1, 10, 2), 0, 2)
    with pytest.raises(ValueError, match="layout must be one of"):
        sd.shard(torch.zeros(1, 1, 8, 2), 0, 2, layout="striped")
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        sd.shard(torch.zeros(1, 1, 8, 2), 2, 2)
    with pytest.raises(ValueError, match="shard 1 has 3 rows"):
        sd.unshard([torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 3, 2)])


def test_ring_attention_without_a_process_group_says_how_to_start_one():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.fail("a process group is initialised in the test process; the spawned groups must stay in children")
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sd.ring_attention(q, q, q)


# ---------------------------------------------------------------------------------------------------- the harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, pg_timeout_s, worker, args, results):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # never leave the machine
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        results.put((rank, "ok", worker(rank, world_size, *args)))
    except BaseException:  # noqa: B036 - the parent must hear about every failure
        results.put((rank, "error", traceback.format_exc()))
    results.close()
    results.join_thread()  # flush the report before leaving
    os._exit(0)  # skip destroy_process_group: a broken group (the failure tests) would hang in it


def run_group(worker, world_size: int, *args, pg_timeout_s: float = 60, wait_for=None) -> dict:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` spawned processes; {rank: its return value} for
    the ranks in ``wait_for`` (default all; the others are killed once those have answered)."""
    wait_for = set(range(world_size) if wait_for is None else wait_for)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, pg_timeout_s, worker, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    got, deadline = {}, time.monotonic() + GROUP_TIMEOUT_S
    try:
        while not wait_for <= set(got):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"ranks {sorted(wait_for - set(got))} did not finish within "
                                     f"{GROUP_TIMEOUT_S} s (a hang); finished: {sorted(got)}")
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    raise AssertionError(f"ranks {sorted(wait_for - set(got))} died without a report") from None
                continue
            got[rank] = (status, value)
    finally:
        for p in procs:
            p.join(timeout=5 if wait_for == set(range(world_size)) else 0.1)
            if p.is_alive():
                p.kill()
    failed = {rank: value for rank, (status, value) in got.items() if status == "error"}
    if failed:  # the first cause first: a rank that failed on its own makes its peers fail with RingError
        order = sorted(failed, key=lambda r: ("RingError" in failed[r], r))
        raise AssertionError("\n".join(f"rank {r} of {world_size} failed:\n{failed[r]}" for r in order))
    return {rank: value for rank, (_, value) in got.items()}


# ---------------------------------------------------------------------------------------- equality with the oracle


def _half_rows_blind(b, h, q, k):
    """Causal, and every query at a position ≡ 3 (mod 5) sees nothing (fully masked rows; no block classifier)."""
    return (k <= q) & (q % 5 != 3)


CASES = [  # (name, dtype, layout, causal, mask, H_q, H_kv, D, D_v)
    ("f64-zigzag-causal-gqa", torch.float64, "zigzag", True, None, 4, 2, 5, 7),
    ("f64-contiguous-causal", torch.float64, "contiguous", True, None, 2, 2, 8, 8),
    ("f64-zigzag-full", torch.float64, "zigzag", False, None, 3, 1, 6, 4),
    ("f64-contiguous-full-gqa", torch.float64, "contiguous", False, None, 4, 2, 5, 5),
    ("f64-zigzag-window5", torch.float64, "zigzag", False, "window", 2, 1, 4, 6),
    ("f64-contiguous-window5-gqa", torch.float64, "contiguous", True, "window", 4, 2, 4, 4),
    ("f64-zigzag-document-causal", torch.float64, "zigzag", True, "document", 2, 2, 4, 4),
    ("f64-contiguous-window1", torch.float64, "contiguous", False, "window1", 2, 2, 4, 4),  # no ring step at all
    ("f64-zigzag-blind-rows", torch.float64, "zigzag", False, "blind", 2, 1, 3, 5),
    ("f32-zigzag-causal-gqa", torch.float32, "zigzag", True, None, 4, 2, 8, 8),
    ("f32-contiguous-full", torch.float32, "contiguous", False, None, 2, 2, 7, 9),
    ("f32-zigzag-window5-gqa", torch.float32, "zigzag", True, "window", 4, 1, 8, 8),
    ("f32-contiguous-causal-gqa", torch.float32, "contiguous", True, None, 6, 3, 5, 5),
]
# max |ring − oracle| / max |oracle|, fixed, why: P ranks merge by lse in a different order than one process; float64:
# ~1e-14 measured, 1e-10 leaves any CPU room; float32: 2e-5 ~ 170 ulps, a wrong block position gives > 1e-2
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


def _mask_for(kind, N, g):
    if kind is None:
        return None
    if kind == "window":
        return masks.sliding_window(5)  # contiguous: one ring step, then dK/dV go straight home
    if kind == "window1":
        return masks.sliding_window(1)
    if kind == "document":
        return masks.document(torch.sort(torch.randint(0, 4, (N,), generator=g)).values)
    return masks.Mask(_half_rows_blind, "half_rows_blind")


def _out_and_grads(fn, q, k, v, d_out, **kwargs):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kwargs)
    return (out.detach(), *torch.autograd.grad(out, leaves, d_out))


def _check_cases(rank, world_size, cases, seed):
    """Every rank builds the same global problem, runs its shard through the ring, and compares its rows of the
    output and of dq, dk, dv with the float64 oracle on the whole sequence."""
    report = []
    messages = []  # one entry per point-to-point exchange the ring starts
    pass_on = sd._pass_on
    sd._pass_on = lambda *args, **kwargs: messages.append(1) or pass_on(*args, **kwargs)
    for i, (name, dtype, layout, causal, mask_kind, H_q, H_kv, D, D_v) in enumerate(cases):
        messages.clear()
        g = torch.Generator().manual_seed(seed + i)
        B, N = 2, 2 * world_size * 5 + (0 if layout == "zigzag" else world_size)  # odd chunks, odd N/P
        q, k, v = (torch.randn(B, h, N, d, generator=g, dtype=torch.float64).to(dtype)
                   for h, d in ((H_q, D), (H_kv, D), (H_kv, D_v)))
        d_out = torch.randn(B, H_q, N, D_v, generator=g, dtype=torch.float64).to(dtype)
        mask = _mask_for(mask_kind, N, g)

        def mine(t, layout=layout):
            return sd.shard(t, rank, world_size, layout=layout)

        q_l, k_l, v_l = (mine(t).clone().requires_grad_() for t in (q, k, v))
        testing.poison_allocator()
        key_block = 3 if i % 3 == 1 else None  # 3 does not divide the shards: uneven key blocks
        name = f"{name}-key_block{key_block}" if key_block else name
        out, lse = sd.ring_attention(q_l, k_l, v_l, causal=causal, mask=mask, layout=layout, key_block=key_block,
                                     return_lse=True)
        assert out.requires_grad and not lse.requires_grad, f"{name}: lse must be returned non-differentiable"
        out.backward(mine(d_out))

        leaves = [t.double().requires_grad_() for t in (q, k, v)]
        ref, lse_ref = reference.attention(*leaves, causal=causal, mask=mask, return_lse=True)
        grads_ref = torch.autograd.grad(ref, leaves, d_out.double())
        got = {"out": out, "dq": q_l.grad, "dk": k_l.grad, "dv": v_l.grad}
        want = {"out": ref, "dq": grads_ref[0], "dk": grads_ref[1], "dv": grads_ref[2]}
        errors = {}
        for what in got:
            a, b = got[what], mine(want[what])
            assert a.dtype == dtype and torch.isfinite(a).all(), f"{name} {what}: dtype {a.dtype} or non-finite"
            errors[what] = testing.max_error(a, b) / max(b.abs().max().item(), 1.0)  # inputs are O(1)
        lse_want = mine(lse_ref[..., None], layout)[..., 0]
        same_inf = torch.equal(torch.isneginf(lse), torch.isneginf(lse_want))
        finite = ~torch.isneginf(lse_want)
        errors["lse"] = testing.max_error(lse[finite], lse_want[finite]) if same_inf else math.inf
        if dtype == torch.float32:
            # FlashAttention's rule too: at most 2x (3x for grads) the error of the float32 computation the ring is
            # made of — the naive one, or the local backend on the whole sequence if that one rounds more.
            backend = sd.choose_block_backend(make_call(q, k, v, causal=causal, mask=mask)).name
            yardsticks = [_out_and_grads(testing.naive, q, k, v, d_out, causal=causal, mask=mask),
                          _out_and_grads(selfattn.attention, q, k, v, d_out, causal=causal, mask=mask, backend=backend)]
            for j, (what, factor) in enumerate(zip(got, (2, 3, 3, 3), strict=True)):
                worst = max((y[j] for y in yardsticks), key=lambda t: testing.max_error(t, want[what]))
                testing.check_against_oracle(got[what], mine(worst), mine(want[what]), factor=factor,
                                             what=f"{name} {what} (P={world_size}, backend {backend})")
        report.append((name, dtype, errors, len(messages)))
    return report


@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_equals_the_oracle(world_size):
    on_four = ("f64-zigzag", "f32", "f64-contiguous-w")
    cases = CASES if world_size == 2 else [c for c in CASES if c[0].startswith(on_four)]
    results = run_group(_check_cases, world_size, cases, 100 * world_size)
    full_ring = (world_size - 1) + 2 * (world_size - 1) + 1  # forward; backward K/V and dK/dV, then dK/dV home
    for rank, report in results.items():
        for name, dtype, errors, messages in report:
            case = name.split("-key_block")[0]
            expected = {"f64-contiguous-window5-gqa": 1 + 2 + 1, "f64-contiguous-window1": 0}.get(case, full_ring)
            assert messages == expected, f"P={world_size} rank {rank} {name}: {messages} exchanges, not {expected}"
            bad = {w: e for w, e in errors.items() if not e <= (TOLERANCE[dtype] if w != "lse" else 1e-5)}
            assert not bad, f"P={world_size} rank {rank} {name}: relative errors {bad} > {TOLERANCE[dtype]}"


# ------------------------------------------------------------------------------- sharding helpers and agreement


def _agreement_and_gather(rank, world_size):
    seen = {}
    x = torch.arange(2 * 3 * 8 * world_size, dtype=torch.float64).view(2, 3, 8 * world_size, 1)
    for layout in sd.LAYOUTS:
        seen[f"gather-{layout}"] = torch.equal(sd.gather(sd.shard(x, rank, world_size, layout=layout),
                                                         layout=layout), x)
    good = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    attempts = {
        # rank 1 holds more rows than rank 0
        "shapes differ": dict(q=torch.randn(1, 2, 6 + 2 * rank, 4, dtype=torch.float64)),
        # every rank holds 5 rows: zigzag needs an even number
        "odd rows": dict(q=torch.randn(1, 2, 5, 4, dtype=torch.float64)),
        # only the last rank passes integers
        "bad dtype on one rank": dict(q=good.long() if rank == world_size - 1 else good),
        # causal on rank 0 only
        "options differ": dict(q=good, causal=rank == 0),
        # only rank 0 would run a backward: the others would never answer it
        "grad on one rank": dict(q=good.clone().requires_grad_(rank == 0)),
    }
    for what, kw in attempts.items():
        q = kw.pop("q")
        try:
            sd.ring_attention(q, q, q, **kw)
            seen[what] = "no error"
        except (ValueError, TypeError) as e:
            seen[what] = (type(e).__name__, str(e))
    return seen


def test_ranks_that_disagree_all_raise_and_gather_inverts_shard():
    results = run_group(_agreement_and_gather, 2)
    for rank, seen in results.items():
        assert seen["gather-zigzag"] and seen["gather-contiguous"], f"rank {rank}: gather(shard(x)) != x"
        for what, expect in (("shapes differ", "q shape: rank 0: (1, 2, 6, 4), rank 1: (1, 2, 8, 4)"),
                             ("odd rows", "the rows per rank must be even"),
                             ("bad dtype on one rank", "rank 1: TypeError: q must be a floating-point tensor"),
                             ("options differ", "causal: rank 0: True, rank 1: False"),
                             ("grad on one rank", "inputs require grad (so every rank must run the backward): "
                                                  "rank 0: True, rank 1: False")):
            assert seen[what] != "no error", f"rank {rank}: {what}: no error raised"
            assert expect in seen[what][1], f"rank {rank}: {what}: message {seen[what][1]!r} lacks {expect!r}"
        assert seen["bad dtype on one rank"][0] == ("TypeError" if rank == 1 else "ValueError")


# ---------------------------------------------------------------------------------------------- peers that fail

STALL_S = 20.0  # the stalled peer sleeps this long; the others must give up after RING_TIMEOUT_S
RING_TIMEOUT_S = 2.0


def _dies_after_forward(rank, world_size):
    x = torch.randn(1, 2, 8, 4, dtype=torch.float64, requires_grad=True)
    out = sd.ring_attention(x, x, x, causal=True)
    if rank == 1:
        os._exit(0)
    try:
        out.sum().backward()
    except sd.RingError as e:
        return "RingError", str(e)
    return "no error", ""


def _stalled(rank, world_size):
    x = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    if rank == 1:
        time.sleep(STALL_S)
        os._exit(0)
    t0 = time.monotonic()
    try:
        sd.ring_attention(x, x, x, timeout=RING_TIMEOUT_S)
    except sd.RingError as e:
        return "RingError", str(e), time.monotonic() - t0
    return "no error", "", time.monotonic() - t0


def test_a_dead_peer_makes_the_others_fail():
    """Rank 1 dies after its forward; rank 0's backward must raise RingError (not hang)."""
    results = run_group(_dies_after_forward, 2, pg_timeout_s=10, wait_for=[0])
    kind, message = results[0]
    assert kind == "RingError" and "rank 0: waiting for" in message, (kind, message)


def test_a_stalled_peer_times_out_after_the_given_timeout():
    """Rank 1 never calls; rank 0 gives up after timeout=2 s, long before the peer wakes up (20 s)."""
    results = run_group(_stalled, 2, pg_timeout_s=60, wait_for=[0])
    kind, message, elapsed = results[0]
    assert kind == "RingError" and "other ranks' shapes" in message, (kind, message)
    assert elapsed < STALL_S / 2, f"rank 0 waited {elapsed:.1f} s although timeout={RING_TIMEOUT_S} s"


# ------------------------------------------------------------------------------------------- the training example


def _load_example():
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "ring_train.py"
    spec = importlib.util.spec_from_file_location("ring_train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _train_on_ranks(rank, world_size, cfg_kwargs):
    example = _load_example()
    return {layout: example.train(example.Config(**cfg_kwargs, layout=layout), distributed=True)
            for layout in sd.LAYOUTS}


def test_training_over_two_processes_matches_one_process():
    """examples/ring_train.py (the tiny GPT): the same seed gives the same losses with the sequence split over 2
    ranks."""
    example = _load_example()
    cfg_kwargs = dict(n_layer=1, d_model=16, seq_len=32, batch=2, steps=4)
    single = example.train(example.Config(**cfg_kwargs))
    ring = run_group(_train_on_ranks, 2, cfg_kwargs)
    assert ring[0] == ring[1], f"the ranks report different losses: {ring}"
    for layout, losses in ring[0].items():
        for step, (a, b) in enumerate(zip(single, losses, strict=True)):
            assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: one process {a:.7f}, two ranks ({layout}) {b:.7f}"


def _check_variants(rank, world_size):
    """Soft-capping then ALiBi at global positions, sinks and dropout through the ring, against the oracle on the
    whole sequence (float64: to 1e-10); the sinks' gradient summed over the ranks."""
    from selfattn import score_mods

    g = torch.Generator().manual_seed(11)
    B, H, N, D = 2, 4, 2 * world_size * 5, 8
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    d_out = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    sinks = torch.randn(H, generator=g, dtype=torch.float64)
    mod = score_mods.softcap(2.0) >> score_mods.alibi(score_mods.alibi_slopes(H).double())
    kw = dict(causal=True, score_mod=mod, dropout_p=0.2, dropout_seed=5)
    q_l, k_l, v_l = (sd.shard(t, rank, world_size).clone().requires_grad_() for t in (q, k, v))
    s_l = sinks.clone().requires_grad_()
    out = sd.ring_attention(q_l, k_l, v_l, sinks=s_l, **kw)
    out.backward(sd.shard(d_out, rank, world_size))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    ref = reference.attention(*leaves[:3], sinks=leaves[3], **kw)
    grads = torch.autograd.grad(ref, leaves, d_out)
    errors = {what: testing.max_error(a, sd.shard(b, rank, world_size))
              for what, a, b in (("out", out, ref), ("dq", q_l.grad, grads[0]), ("dk", k_l.grad, grads[1]),
                                 ("dv", v_l.grad, grads[2]))}
    return errors, s_l.grad.tolist(), grads[3].tolist()  # plain lists: a tensor would travel as shared memory


def test_ring_takes_score_mods_sinks_and_dropout_at_global_positions():
    results = run_group(_check_variants, 2)
    for rank, (errors, _, _) in results.items():
        assert all(e < 1e-10 for e in errors.values()), f"rank {rank}: {errors}"
    dsinks = sum(torch.tensor(r[1], dtype=torch.float64) for r in results.values())
    torch.testing.assert_close(dsinks, torch.tensor(results[0][2], dtype=torch.float64), rtol=1e-10, atol=1e-12)
