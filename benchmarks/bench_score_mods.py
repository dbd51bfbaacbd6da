"""Cost of score modifiers, sinks and dropout on the tiled CPU backend, against plain attention in the same run.

Not a test: a script. Forward+backward of causal attention (B = 1, H = 8, D = 64, float32) with no modifier,
soft-capping, ALiBi through ``score_mod``, the same ALiBi as a dense ``bias`` tensor, torch's SDPA with that ALiBi and
the causal mask as one dense float ``attn_mask`` (what selfattn replaces; up to N = 8192), sinks and dropout. The
variants run in interleaved rounds (each round times every variant once) and the median is kept, so the ratios compare
like with like on a loaded machine. Peak memory of the ALiBi pair is measured in fresh processes (ru_maxrss).
Writes benchmarks/results/score_mods.json and score_mods.png.

    flock -x /tmp/selfattn-bench.lock python benchmarks/bench_score_mods.py            # N = 4096, 8192
    flock -x /tmp/selfattn-bench.lock python benchmarks/bench_score_mods.py --n 4096 8192 16384
    flock -x /tmp/selfattn-bench.lock python benchmarks/bench_score_mods.py --n 4096 --rounds 2

The issue's targets: soft-capping and ALiBi within 1.3x of no modifier, dropout within 1.5x of none, ALiBi through
score_mod at least 2x faster than (and O(N) memory against) the dense bias.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ["none", "softcap", "alibi", "alibi-bias", "alibi-sdpa", "sinks", "dropout"]
DENSE_MAX_N = 8192  # the dense (1, H, N, N) float32 bias: 2 GiB at N = 8192
DENSE = ("alibi-bias", "alibi-sdpa")


def inputs(N, H=8, D=64, grad=True):
    import torch

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, generator=g).requires_grad_(grad) for _ in range(3))
    return q, k, v, torch.randn(1, H, N, D, generator=g)


def kwargs_for(variant, N, H=8):
    import torch

    from selfattn import score_mods

    slopes = score_mods.alibi_slopes(H)
    if variant == "softcap":
        return dict(score_mod=score_mods.softcap(30.0))
    if variant == "alibi":
        return dict(score_mod=score_mods.alibi(slopes))
    if variant == "alibi-bias":
        pos = torch.arange(N)
        return dict(bias=(slopes.view(1, H, 1, 1) * (pos[None, :] - pos[:, None]).float()))  # (1, H, N, N)
    if variant == "alibi-sdpa":  # what selfattn replaces: torch's SDPA with ALiBi and causal as one dense float mask
        pos = torch.arange(N)
        dist = (pos[None, :] - pos[:, None]).float()
        return dict(sdpa_mask=(slopes.view(1, H, 1, 1) * dist).masked_fill(dist > 0, float("-inf")))
    if variant == "sinks":
        return dict(sinks=torch.zeros(H, requires_grad=True))
    if variant == "dropout":
        return dict(dropout_p=0.1, dropout_seed=0)
    return {}


def run_once(q, k, v, d_out, kw) -> float:
    import selfattn

    t0 = time.perf_counter()
    if "sdpa_mask" in kw:
        import torch

        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=kw["sdpa_mask"])
    else:
        out = selfattn.attention(q, k, v, causal=True, backend="tiled", **kw)
    out.backward(d_out)
    return time.perf_counter() - t0


def peak_rss(N: int, variant: str) -> float:
    """Peak resident memory (MiB) above the inputs of building the variant's arguments (the dense bias counts) and
    one forward+backward, in a fresh process (Linux: VmHWM, reset through /proc/self/clear_refs)."""
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_score_mods as b; "
            f"q, k, v, d = b.inputs({N}); b.run_once(q, k, v, d, {{}}); base = b.vm('VmRSS'); "
            "open('/proc/self/clear_refs', 'w').write('5'); "
            f"kw = b.kwargs_for({variant!r}, {N}); b.run_once(q, k, v, d, kw); print((b.vm('VmHWM') - base) / 1024)")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def vm(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS: resident now, VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "score_mods.json"))
    args = ap.parse_args(argv)

    from selfattn.backends import choice

    info = choice.machine()
    print(f"{info['cpu']}, ISA {info['capability']}, {info['threads']} threads, torch {info['torch']}")
    rows = []
    for N in args.n:
        variants = [v for v in VARIANTS if v not in DENSE or N <= DENSE_MAX_N]
        q, k, v, d_out = inputs(N)
        kws = {name: kwargs_for(name, N) for name in variants}
        run_once(q, k, v, d_out, kws["none"])  # warm-up
        times = {name: [] for name in variants}
        for _ in range(args.rounds):  # interleaved: every variant once per round
            for name in variants:
                q.grad = k.grad = v.grad = None
                times[name].append(run_once(q, k, v, d_out, kws[name]))
        base = statistics.median(times["none"])
        for name in variants:
            t = statistics.median(times[name])
            row = {"N": N, "variant": name, "seconds": t, "all_seconds": times[name], "ratio_to_none": t / base}
            if name == "alibi" and "alibi-bias" in times:
                row["speedup_vs_dense_bias"] = statistics.median(times["alibi-bias"]) / t
                row["speedup_vs_sdpa_dense_mask"] = statistics.median(times["alibi-sdpa"]) / t
            if not args.no_memory and name in ("alibi", *DENSE, "none"):  # extra over no modifier's run
                row["peak_mib"] = peak_rss(N, name)
            rows.append(row)
            extra = "".join(f"  {key}={row[key]:.2f}" for key in ("speedup_vs_dense_bias", "speedup_vs_sdpa_dense_mask",
                                                                    "peak_mib") if key in row)
            print(f"N={N:6d} {name:11s} {t:8.3f} s  x{t / base:5.2f} of none{extra}", flush=True)
    info["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "case": "causal fwd+bwd, B=1, H=8, D=64, float32, tiled",
                               "rounds": args.rounds, "rows": rows}, indent=1))
    print(f"wrote {out}")
    plot(rows, out.with_suffix(".png"), info)


def plot(rows, path: Path, info: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in VARIANTS:
        pts = [(r["N"], r["ratio_to_none"]) for r in rows if r["variant"] == name]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.axhline(1.3, ls=":", c="gray")
    ax.axhline(1.5, ls="--", c="gray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N")
    ax.set_ylabel("fwd+bwd time / no modifier")
    ax.set_title(f"score modifiers, causal H=8 D=64 fp32 — {info['cpu'][:40]} ({info['capability']})", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
