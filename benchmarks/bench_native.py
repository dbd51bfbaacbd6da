"""The native C++ kernel against torch's SDPA and against itself: the targets of issue 19, measured in one run.

Not a test: a script. Every group runs its variants in interleaved rounds (each round times every variant once)
and keeps the median, so ratios compare like with like on a loaded machine. Groups:

  plain     causal and full attention, forward and forward + backward, B = 1, D = 64, H = 8 (MHA), H = 1, GQA 9/3
            and 32/8, N = 1k .. 16k: native's time / SDPA's (target <= 1.0, aim 0.87 for fwd + bwd)
  mods      causal, H = 8, N = 4k and 8k: soft-cap, ALiBi, relative bias, sinks, dropout 0.1 against plain native
            (targets <= 1.15x, dropout <= 1.3x), forward and forward + backward
  decode    1 query, GQA 9/3 and 32/8, D = 64 and 128, N_k = 16 .. 32k: native / SDPA through selfattn.attention
            (target <= 0.8); N_k = 16 measures the fixed cost of a call; with ALiBi against plain native
  half      bf16 and fp16 forward + backward against native float32 (target <= 1.1x)
  memory    peak RSS above the inputs at N = 65,536, forward, in a fresh process (target <= 1.25x of q, k, v, out)

Every result file records the CPU model, torch.backends.cpu.get_cpu_capability() and the thread count. To check an
AVX2 machine on an AVX-512 one: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (selfattn then loads its AVX2
build, torch its AVX2 kernels).

    python benchmarks/bench_native.py                     # every group -> results/native_<capability>.json + .png
    python benchmarks/bench_native.py --groups decode mods --rounds 5
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_native.py --tag avx2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> dict:
    from selfattn.backends import choice, native

    return {**choice.machine(), "native": native.describe()}


def medians(variants: dict, rounds: int) -> dict:
    """{name: median seconds} of the callables, interleaved round by round after one warm-up call each."""
    for f in variants.values():
        f()
    times = {name: [] for name in variants}
    order = list(variants.items())
    for r in range(rounds):  # every other round backwards: no variant always follows the same one
        for name, f in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _qkv(B, H_q, H_kv, N_q, N_k, D, dtype=None, grad=False):
    import torch

    g = torch.Generator().manual_seed(0)
    dtype = dtype or torch.float32
    q = torch.randn(B, H_q, N_q, D, generator=g).to(dtype).requires_grad_(grad)
    k, v = (torch.randn(B, H_kv, N_k, D, generator=g).to(dtype).requires_grad_(grad) for _ in range(2))
    return q, k, v


def _ours(q, k, v, backward, **kw):
    import torch

    import selfattn

    def f():
        out = selfattn.attention(q, k, v, backend="native", **kw)
        if backward:
            out.backward(torch.ones_like(out))
    return f


def _sdpa(q, k, v, backward, causal):
    import torch

    F = torch.nn.functional

    def f():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
        if backward:
            out.backward(torch.ones_like(out))
    return f


def group_plain(rounds, sizes):
    rows = []
    for heads in ((8, 8), (1, 1), (9, 3), (32, 8)):
        for N in sizes:
            for causal in (True, False):
                for backward in (False, True):
                    flops = 4 * heads[0] * N * N * 64 * (0.5 if causal else 1) * (3.5 if backward else 1)
                    if flops > 6e12:  # keeps the group within minutes on 2 cores (16k fwd+bwd, 32 heads)
                        continue
                    q, k, v = _qkv(1, heads[0], heads[1], N, N, 64, grad=backward)
                    t = medians({"native": _ours(q, k, v, backward, causal=causal),
                                 "sdpa": _sdpa(q, k, v, backward, causal)}, rounds)
                    rows.append({"H_q": heads[0], "H_kv": heads[1], "N": N, "causal": causal, "backward": backward,
                                 **t, "ratio": t["native"] / t["sdpa"]})
                    print(rows[-1], flush=True)
    return rows


def group_mods(rounds, sizes):
    import torch

    from selfattn import score_mods

    H = 8
    rows = []
    variants = {
        "plain": {},
        "softcap": dict(score_mod=score_mods.softcap(30.0)),
        # scores ~N(0, 1) against a cap of 1: nearly every vector has a lane beyond 0.75 * cap, so the kernel's tanh
        # takes SLEEF's path instead of its polynomial (the worst case for a soft-capped model)
        "softcap_tight": dict(score_mod=score_mods.softcap(1.0)),
        "alibi": dict(score_mod=score_mods.alibi(score_mods.alibi_slopes(H))),
        "relative": dict(score_mod=score_mods.relative_bias(torch.randn(H, 257))),
        "t5": dict(score_mod=score_mods.relative_bias(torch.randn(H, 32), buckets=32, bidirectional=False)),
        "sinks": dict(sinks=torch.zeros(H)),
        "dropout": dict(dropout_p=0.1, dropout_seed=0),
    }
    for N in sizes:
        for backward in (False, True):
            q, k, v = _qkv(1, H, H, N, N, 64, grad=backward)
            fs = {name: _ours(q, k, v, backward, causal=True, **kw) for name, kw in variants.items()}
            fs["sdpa"] = _sdpa(q, k, v, backward, True)
            t = medians(fs, rounds)
            row = {"N": N, "backward": backward, **t}
            row["x_plain"] = {name: t[name] / t["plain"] for name in variants}
            rows.append(row)
            print(row, flush=True)
    return rows


def group_decode(rounds, lengths):
    import torch

    import selfattn

    from selfattn import score_mods

    rows = []
    F = torch.nn.functional
    for heads in ((9, 3), (32, 8)):
        alibi = score_mods.alibi(score_mods.alibi_slopes(heads[0]))  # one object per model, as a model keeps it
        for D in (64, 128):
            for N_k in lengths:
                q, k, v = _qkv(1, heads[0], heads[1], 1, N_k, D)
                fs = {
                    "native": lambda q=q, k=k, v=v: selfattn.attention(q, k, v, causal=True, backend="native"),
                    "auto": lambda q=q, k=k, v=v: selfattn.attention(q, k, v, causal=True),
                    "sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                    # a decoding step with ALiBi (BLOOM, MPT): its table by distance is kept between steps
                    "alibi": lambda q=q, k=k, v=v, a=alibi: selfattn.attention(q, k, v, causal=True, score_mod=a,
                                                                             backend="native"),
                }
                t = medians({n: (lambda f=f: [f() for _ in range(20)]) for n, f in fs.items()}, rounds)
                t = {n: s / 20 for n, s in t.items()}
                rows.append({"H_q": heads[0], "H_kv": heads[1], "D": D, "N_k": N_k, **t,
                             "ratio": t["native"] / t["sdpa"], "auto_ratio": t["auto"] / t["sdpa"],
                             "alibi_x_native": t["alibi"] / t["native"]})
                print(rows[-1], flush=True)
            _fixed_cost([r for r in rows if (r["H_q"], r["D"]) == (heads[0], D)])
    return rows


def _fixed_cost(rows: list) -> None:
    """The call's cost above its arithmetic, on the row with the fewest keys: its time less those keys' share of the
    per-key cost, the slope between the two shortest longer caches (both on the kernel's serial path)."""
    rows = sorted(rows, key=lambda r: r["N_k"])
    if len(rows) < 3:
        return
    (a, b, c) = rows[:3]
    per_key = (c["native"] - b["native"]) / (c["N_k"] - b["N_k"])
    a["fixed_us"] = (a["native"] - a["N_k"] * per_key) * 1e6
    print(f"fixed cost H_q={a['H_q']} D={a['D']}: {a['fixed_us']:.1f} µs above {a['N_k']} keys' arithmetic", flush=True)


def group_half(rounds, N):
    import torch

    rows = []
    for backward in (False, True):
        fs = {}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            q, k, v = _qkv(1, 8, 8, N, N, 64, dtype=dtype, grad=backward)
            fs[str(dtype).replace("torch.", "")] = _ours(q, k, v, backward, causal=True)
        t = medians(fs, rounds)
        rows.append({"N": N, "backward": backward, **t, "x_float32": {n: s / t["float32"] for n, s in t.items()}})
        print(rows[-1], flush=True)
    return rows


def _peak_child(N: int, backend: str) -> None:
    import torch

    import selfattn

    q, k, v = _qkv(1, 8, 8, N, N, 64)
    out = torch.empty_like(q)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        out.copy_(selfattn.attention(q, k, v, causal=True, backend=backend))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_bytes": (after - before) * 1024, "io_bytes": 4 * q.numel() * 4}))


def group_memory(N):
    rows = []
    for backend in ("native",):
        cmd = [sys.executable, __file__, "--peak-child", str(N), backend]
        printed = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res = json.loads(printed.strip().splitlines()[-1])
        rows.append({"N": N, "backend": backend, **res, "x_io": res["extra_bytes"] / res["io_bytes"]})
        print(rows[-1], flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    panels = [g for g in ("plain", "mods", "decode") if result.get(g)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, g in zip(axes[0], panels, strict=True):
        rows = result[g]
        if g == "plain":
            for r in rows:
                label = f"{r['H_q']}/{r['H_kv']} {'causal' if r['causal'] else 'full'} {'fb' if r['backward'] else 'f'}"
                ax.scatter(r["N"], r["ratio"], s=12)
                ax.annotate(label, (r["N"], r["ratio"]), fontsize=5)
            ax.set_xscale("log", base=2)
            ax.set_ylabel("native time / SDPA time")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_title("plain attention vs SDPA")
        elif g == "mods":
            names = list(rows[0]["x_plain"])
            for r in rows:
                ax.plot(names, [r["x_plain"][n] for n in names], marker="o",
                        label=f"N={r['N']} {'fwd+bwd' if r['backward'] else 'fwd'}")
            ax.axhline(1.15, color="k", lw=0.8, ls="--")
            ax.set_ylabel("time / plain causal (native)")
            ax.set_title("modifiers, sinks, dropout")
            ax.legend(fontsize=6)
            ax.tick_params(axis="x", labelsize=7)
        else:
            for key in sorted({(r["H_q"], r["H_kv"], r["D"]) for r in rows}):
                sub = [r for r in rows if (r["H_q"], r["H_kv"], r["D"]) == key]
                ax.plot([r["N_k"] for r in sub], [r["ratio"] for r in sub], marker="o",
                        label=f"{key[0]}/{key[1]} heads, D={key[2]}")
            ax.set_xscale("log", base=2)
            ax.axhline(0.8, color="k", lw=0.8, ls="--")
            ax.set_ylabel("native time / SDPA time")
            ax.set_xlabel("cached keys")
            ax.set_title("decoding, 1 query")
            ax.legend(fontsize=6)
    m = result["machine"]
    fig.suptitle(f"{m['cpu']} ({m['capability']}, {m['threads']} threads), torch {m['torch']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", nargs="+", default=["plain", "mods", "decode", "half", "memory"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--mod-sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--decode-lengths", type=int, nargs="+", default=[16, 128, 512, 2048, 8192, 32768])
    ap.add_argument("--tag", default=None, help="result file suffix (default: the CPU capability)")
    ap.add_argument("--peak-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_child:
        return _peak_child(int(args.peak_child[0]), args.peak_child[1])
    result = {"machine": machine(), "rounds": args.rounds}
    print(result["machine"], flush=True)
    runs = {"plain": lambda: group_plain(args.rounds, args.sizes),
            "mods": lambda: group_mods(args.rounds, args.mod_sizes),
            "decode": lambda: group_decode(args.rounds, args.decode_lengths),
            "half": lambda: group_half(args.rounds, 2048), "memory": lambda: group_memory(65536)}
    for g in args.groups:
        result[g] = runs[g]()
    tag = (args.tag or result["machine"]["capability"]).lower()
    out = HERE / "results" / f"native_{tag}.json"
    if out.exists():  # groups run separately accumulate in one file
        old = json.loads(out.read_text())
        result = {**old, **result}
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
