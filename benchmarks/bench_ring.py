"""Ring attention on the CPU: per-rank peak memory and time for P = 1, 2, 4 processes (gloo) at a fixed N.

    PYTHONPATH=src python benchmarks/bench_ring.py                         # N=4096, B=1, H=4, D=64, causal
    PYTHONPATH=src python benchmarks/bench_ring.py --n 8192 --ranks 1 2 4 --json bench_ring.json

Each rank holds N/P rows and runs one thread. Memory is the rise of the rank's resident set above what it held
before the call (its own q, k, v, d_out shards), from the kernel's high-water mark (/proc/self/status VmHWM, reset
through /proc/self/clear_refs after glibc's malloc_trim; tensors of 1 MiB and more get their own mappings), for
one forward and one forward+backward. Time is the median of --repeat runs. With fewer cores than ranks the time
does not scale (the ranks share the cores); memory is the point.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import queue
import socket
import statistics
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def _reset_peak() -> int:
    try:  # hand memory freed earlier back to the kernel, or the next call reuses it unseen
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    return _rss_kib("VmRSS")


def _rank_main(rank, world_size, port, args, results):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import torch
    import torch.distributed as dist

    from selfattn import distributed as sd

    torch.set_num_threads(args.threads_per_rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    g = torch.Generator().manual_seed(0)
    B, H, N, D = args.batch, args.heads, args.n, args.head_dim
    dtype = getattr(torch, args.dtype)
    q, k, v, d_out = (sd.shard(torch.randn(B, H, N, D, generator=g, dtype=dtype), rank, world_size,
                               layout=args.layout) for _ in range(4))  # (B, H, N/P, D)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def forward():
        with torch.no_grad():
            sd.ring_attention(q, k, v, causal=args.causal, layout=args.layout, backend=args.backend,
                              key_block=args.key_block)

    def forward_backward():
        out = sd.ring_attention(q, k, v, causal=args.causal, layout=args.layout, backend=args.backend,
                                key_block=args.key_block)
        out.backward(d_out)
        q.grad = k.grad = v.grad = None

    row = {"rank": rank}
    forward_backward()  # warm-up: thread pools, lazy imports, first-touch of the allocator
    for name, fn in (("forward", forward), ("forward_backward", forward_backward)):
        dist.barrier()
        base = _reset_peak()
        fn()
        row[f"{name}_peak_mib"] = (_rss_kib("VmHWM") - base) / 1024
        times = []
        for _ in range(args.repeat):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        row[f"{name}_s"] = statistics.median(times)
    row["shard_mib"] = 4 * q.numel() * q.element_size() / 2**20
    results.put(row)
    dist.barrier()
    dist.destroy_process_group()


def run(world_size: int, args) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    rows = []
    try:
        while len(rows) < world_size:
            try:
                rows.append(results.get(timeout=5))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"a rank of P={world_size} failed (exit codes "
                                       f"{[p.exitcode for p in procs]})") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return sorted(rows, key=lambda r: r["rank"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--layout", default="zigzag")
    parser.add_argument("--backend", default=None, help="a backend with supports_blocks (default: the first)")
    parser.add_argument("--key-block", type=int, default=256,
                        help="keys per backend call (0: whole shards); bounds what the reference backend holds")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    args.key_block = args.key_block or None
    # glibc serves allocations below a threshold that it raises as it goes from a heap it keeps; a fixed 1 MiB one
    # maps every large tensor on its own and returns it when freed, so the resident set follows the live tensors.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))

    from selfattn import backends
    from selfattn.backends import choice
    from selfattn.distributed import choose_block_backend  # the backend the ring will use, for the record
    from selfattn.api import make_call
    import torch

    probe = torch.zeros(args.batch, args.heads, max(1, args.n // max(args.ranks)), args.head_dim,
                        dtype=getattr(torch, args.dtype), requires_grad=True)
    backend = choose_block_backend(make_call(probe, probe, probe, causal=args.causal), args.backend).name
    print(f"ring attention, N={args.n} B={args.batch} H={args.heads} D={args.head_dim} {args.dtype} "
          f"causal={args.causal} layout={args.layout} backend={backend} key_block={args.key_block}; "
          f"{os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.2f} at start; registered backends {backends.names()}")
    rows = {}
    for P in args.ranks:
        rows[P] = run(P, args)
    base = rows[args.ranks[0]]
    first = max(r["forward_backward_peak_mib"] for r in base)
    print(f"{'P':>3} {'N/P':>6} {'fwd peak MiB':>13} {'fwd+bwd peak MiB':>17} {'vs P=' + str(args.ranks[0]):>8} "
          f"{'fwd s':>8} {'fwd+bwd s':>10}")
    summary = []
    for P, ranks in rows.items():
        peak_f = max(r["forward_peak_mib"] for r in ranks)
        peak_fb = max(r["forward_backward_peak_mib"] for r in ranks)
        t_f = max(r["forward_s"] for r in ranks)
        t_fb = max(r["forward_backward_s"] for r in ranks)
        print(f"{P:>3} {args.n // P:>6} {peak_f:>13.1f} {peak_fb:>17.1f} {peak_fb / first:>8.3f} {t_f:>8.3f} "
              f"{t_fb:>10.3f}")
        summary.append({"P": P, "rows_per_rank": args.n // P, "max_rank_forward_peak_mib": peak_f,
                        "max_rank_forward_backward_peak_mib": peak_fb, "forward_s": t_f, "forward_backward_s": t_fb,
                        "ranks": ranks})
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "backend": backend, "machine": {**choice.machine(),
                       "platform": platform.platform()}, "cpu_count": os.cpu_count(), "load_end": load,
                       "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "results": summary},
                      f, indent=1)


if __name__ == "__main__":
    main()
