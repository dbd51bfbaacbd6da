"""selfattn against torch SDPA on the shapes real models use: grouped-query prefill, decoding, half precision.

Not a test: a script that prints tables of ratios measured in the same run and writes
benchmarks/results/gqa_decode.json and gqa_decode.png. Every point runs ``--rounds`` rounds; each round times every
implementation in turn (median of its repetitions), and the reported ratio is the median over rounds of
SDPA time / selfattn time (> 1: selfattn is faster), so a shift of the machine's load hits both alike.

    python benchmarks/bench_gqa_decode.py              # the default grid (~15 min on 2 cores)
    python benchmarks/bench_gqa_decode.py --quick      # a smoke run
    python benchmarks/bench_gqa_decode.py --only decode,overhead
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_gqa_decode.py --only half
                                                       # see an AVX2 machine's half precision on a newer CPU

Sections:
  prefill   attention alone, B = 1: (H_q, H_kv) in {(9, 3), (32, 8), (8, 1), (8, 8)}, causal and no mask, forward
            and forward+backward, float32 and bfloat16, D = 64 and 128 (SDPA: ``enable_gqa=True``, ``is_causal``)
  decode    one query (selfattn ``causal=True``, bottom-right: it sees the whole cache; SDPA: no mask) against
            N_k = 512 ... 32,768 cached keys
  overhead  the fixed cost of one ``selfattn.attention`` call on 16 keys above the backend's own compute
  half      bfloat16 / float16 forward+backward, causal, H = 1 and 8: selfattn half vs selfattn float32 vs SDPA half

The machine (CPU model, ``torch.backends.cpu.get_cpu_capability()``, torch version, threads, load) is recorded with
the numbers: a ratio holds for the machine it was measured on. Run it alone (flock /tmp/selfattn-bench.lock ...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import selfattn
from selfattn.backends import tiled

HERE = Path(__file__).resolve().parent
HEADS = [(9, 3), (32, 8), (8, 1), (8, 8)]


def machine() -> dict:
    from selfattn.backends import choice

    halves = (torch.bfloat16, torch.float16)
    return {**choice.machine(), "half_schedule": {str(dt): tiled.half_schedule(dt) for dt in halves}}


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def interleaved(impls: dict, rounds: int, reps: int) -> dict:
    """Per implementation: the best round's time; per non-first implementation: the median over rounds of its time
    divided by the first one's (``ratio``: how many times slower the other is than the first)."""
    times = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            times[name].append(timed(fn, reps))
    first = next(iter(impls))
    res = {name: {"best_s": min(ts), "median_s": statistics.median(ts)} for name, ts in times.items()}
    for name in list(impls)[1:]:
        res[name]["ratio"] = statistics.median(o / s for o, s in zip(times[name], times[first], strict=True))
    return res


def inputs(H_q, H_kv, N_q, N_k, D, dtype, grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H_q, N_q, D, generator=g).to(dtype).requires_grad_(grad)
    k, v = (torch.randn(1, H_kv, N_k, D, generator=g).to(dtype).requires_grad_(grad) for _ in range(2))
    return q, k, v


def fwd_bwd(fn, q, k, v):
    d_out = torch.randn(q.shape, dtype=q.dtype)

    def run():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), d_out)
    return run


def prefill_point(H_q, H_kv, N, D, dtype, causal, mode, rounds):
    grad = mode == "fwd+bwd"
    q, k, v = inputs(H_q, H_kv, N, N, D, dtype, grad)
    ours = lambda q, k, v: selfattn.attention(q, k, v, causal=causal)  # noqa: E731
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H_q != H_kv)  # noqa
    if grad:
        impls = {"selfattn": fwd_bwd(ours, q, k, v), "sdpa": fwd_bwd(sdpa, q, k, v)}
    else:
        impls = {"selfattn": lambda: ours(q, k, v), "sdpa": lambda: sdpa(q, k, v)}
    reps = 3 if N * N * H_q <= 9 * 4096 * 4096 else 1
    with torch.no_grad() if not grad else torch.enable_grad():
        return interleaved(impls, rounds, reps)


def decode_point(H_q, H_kv, N_k, D, dtype, rounds):
    q, k, v = inputs(H_q, H_kv, 1, N_k, D, dtype, False)
    impls = {"selfattn": lambda: selfattn.attention(q, k, v, causal=True),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=H_q != H_kv)}
    with torch.no_grad():
        return interleaved(impls, rounds, reps=200 if N_k <= 8192 else 30)


def overhead_point(rounds):
    """selfattn.attention on 16 keys against the backend's own compute (``tiled._fused_run``: the fused kernel on
    the same layout) and SDPA; the difference is the fixed cost of validation, choosing the backend and dispatch."""
    q, k, v = inputs(9, 3, 1, 16, 64, torch.float32, False)
    impls = {"selfattn": lambda: selfattn.attention(q, k, v, causal=True),
             "backend compute": lambda: tiled._fused_run(q, k, v, 0.125, None),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
    with torch.no_grad():
        res = interleaved(impls, rounds, reps=2000)
    res["overhead_us"] = (res["selfattn"]["median_s"] - res["backend compute"]["median_s"]) * 1e6
    return res


def half_point(H, N, dtype, rounds):
    q, k, v = inputs(H, H, N, N, 64, dtype, True)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ours = lambda q, k, v: selfattn.attention(q, k, v, causal=True)  # noqa: E731
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    impls = {f"selfattn {dtype}": fwd_bwd(ours, q, k, v), "selfattn float32": fwd_bwd(ours, q32, k32, v32),
             f"sdpa {dtype}": fwd_bwd(sdpa, q, k, v)}
    res = interleaved(impls, rounds, reps=1)
    with torch.no_grad():
        fwd = interleaved({f"selfattn {dtype}": lambda: ours(q, k, v),
                           "selfattn float32": lambda: ours(q32, k32, v32)}, rounds, reps=1)
    res["forward"] = fwd
    return res


def sections(args):
    quick = args.quick
    if "prefill" in args.only:
        ns = [512, 4096] if quick else args.n
        for dtype in ([torch.float32] if quick else args.dtypes):
            for D in ([64] if quick or dtype != torch.float32 else args.d):
                for H_q, H_kv in (HEADS[:1] if quick else HEADS):
                    if D != 64 and (H_q, H_kv) not in HEADS[:2]:
                        continue
                    for causal in (True, False):
                        for mode in ("fwd", "fwd+bwd"):
                            for N in ns:
                                work = N * N * H_q * D / 64 * (3.5 if mode == "fwd+bwd" else 1)
                                if work > args.max_work * (0.5 if causal else 1):
                                    continue
                                if dtype != torch.float32 and mode == "fwd+bwd" and N > 4096:
                                    continue
                                key = dict(section="prefill", H_q=H_q, H_kv=H_kv, N=N, D=D, dtype=str(dtype),
                                           causal=causal, mode=mode)
                                yield key, lambda k=key, dt=dtype: prefill_point(k["H_q"], k["H_kv"], k["N"], k["D"],
                                                                                 dt, k["causal"], k["mode"],
                                                                                 args.rounds)
    if "decode" in args.only:
        for dtype in [torch.float32] if quick else [torch.float32, torch.bfloat16]:
            for H_q, H_kv in HEADS[:1] if quick else HEADS:
                for N_k in [512, 8192] if quick else [512, 2048, 8192, 32768]:
                    key = dict(section="decode", H_q=H_q, H_kv=H_kv, N_k=N_k, D=64, dtype=str(dtype))
                    yield key, lambda k=key, dt=dtype: decode_point(k["H_q"], k["H_kv"], k["N_k"], 64, dt,
                                                                    args.rounds)
    if "overhead" in args.only:
        yield dict(section="overhead"), lambda: overhead_point(args.rounds)
    if "half" in args.only:
        for dtype in [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]:
            for H in [1, 8]:
                for N in [1024] if quick else [4096, 8192]:
                    if H == 8 and N > 4096:
                        continue
                    key = dict(section="half", H=H, N=N, dtype=str(dtype))
                    yield key, lambda k=key, dt=dtype: half_point(k["H"], k["N"], dt, args.rounds)


def describe(key, res) -> str:
    s = key["section"]
    if s == "overhead":
        return (f"overhead  16 keys: selfattn {res['selfattn']['median_s'] * 1e6:.1f} us, backend compute "
                f"{res['backend compute']['median_s'] * 1e6:.1f} us -> {res['overhead_us']:.1f} us fixed cost; "
                f"sdpa {res['sdpa']['median_s'] * 1e6:.1f} us")
    if s == "half":
        dt = key["dtype"]
        r = res
        return (f"half      {dt:15s} H={key['H']} N={key['N']}: fwd+bwd {r[f'selfattn {dt}']['best_s'] * 1e3:.0f} ms, "
                f"float32/half {r['selfattn float32']['ratio']:.2f}x, sdpa/selfattn {r[f'sdpa {dt}']['ratio']:.2f}x; "
                f"fwd half/float32 {1 / r['forward']['selfattn float32']['ratio']:.2f}x")
    name = "decode   " if s == "decode" else "prefill  "
    shape = (f"N_k={key['N_k']}" if s == "decode" else
             f"N={key['N']} D={key['D']} {'causal' if key['causal'] else 'none  '} {key['mode']:7s}")
    unit, mul = ("us", 1e6) if s == "decode" else ("ms", 1e3)
    return (f"{name} {key['dtype']:14s} H={key['H_q']}/{key['H_kv']} {shape}: selfattn "
            f"{res['selfattn']['best_s'] * mul:.1f} {unit}, sdpa {res['sdpa']['best_s'] * mul:.1f} {unit}, "
            f"sdpa/selfattn {res['sdpa']['ratio']:.2f}x")


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, section, x in ((axes[0], "prefill", "N"), (axes[1], "decode", "N_k")):
        series = {}
        for key, res in rows:
            if key["section"] != section:
                continue
            label = f"{key['dtype'].split('.')[-1]} {key['H_q']}/{key['H_kv']}"
            if section == "prefill":
                label += f" D{key['D']} {'causal' if key['causal'] else 'none'} {key['mode']}"
            series.setdefault(label, []).append((key[x], res["sdpa"]["ratio"]))
        for label, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1, ms=3, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
        ax.set_ylabel("SDPA time / selfattn time (>1: selfattn faster)")
        ax.set_title(f"{section}, B = 1")
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run")
    p.add_argument("--only", default="prefill,decode,overhead,half", help="comma-separated sections")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, nargs="+", default=[512, 1024, 4096, 16384], help="prefill lengths")
    p.add_argument("--d", type=int, nargs="+", default=[64, 128], help="float32 head dims (D != 64: 9/3 and 32/8)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="prefill dtypes")
    p.add_argument("--max-work", type=float, default=9 * 8192 * 8192,
                   help="skip prefill points whose N²·H_q·D/64 (x3.5 with backward) exceeds this")
    p.add_argument("--out", default=str(HERE / "results" / "gqa_decode.json"))
    args = p.parse_args(argv)
    args.only = set(args.only.split(","))
    args.dtypes = [getattr(torch, d) for d in args.dtypes]
    meta = machine()
    print(json.dumps(meta))
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for key, run in sections(args):
        res = run()
        rows.append((key, res))
        print(describe(key, res), flush=True)
        meta["load_end"] = os.getloadavg()[0]
        out.write_text(json.dumps({"machine": meta, "rows": [{**k, **r} for k, r in rows]}, indent=1, default=str))
    print(f"wrote {out}")
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
