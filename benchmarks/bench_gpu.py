"""GPU attention throughput: selfattn's Triton kernels against torch SDPA (each of its backends) and FlexAttention.

    python benchmarks/bench_gpu.py                       # the standard grid, bf16, on the current CUDA GPU
    python benchmarks/bench_gpu.py --dtype float16 --n 2048 4096 --d 128
    python benchmarks/bench_gpu.py --quick                 # D=128, N 2k and 8k: the targets, in a few minutes

The standard grid (FlashAttention's benchmark): B·N = 16k tokens, hidden size 2048 (H = 2048 / D), N from 512 to
16k, D 64 and 128, causal and not, forward and backward. Rates in TFLOP/s count the matrix products only:
forward 4·B·H·N²·D (half of it with the causal mask), backward 2.5 × forward (FlashAttention's convention).
Every implementation runs in the same process on the same inputs; each measurement is the median of repeated runs
(triton.testing.do_bench, L2 cache flushed). A failing implementation (missing, out of memory) is recorded with its
error and the run goes on. Results, with the device name, go to benchmarks/results/gpu-<device>-<dtype>.{json,md}.

``--smoke`` runs a tiny grid on the CPU under Triton's interpreter (set TRITON_INTERPRET=1) to check the script's
plumbing on a machine without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import selfattn

RESULTS = Path(__file__).resolve().parent / "results"
SDPA_BACKENDS = ["flash", "cudnn", "efficient", "math"]  # the likely fastest first: a cut-short run keeps them


def flops(B: int, H: int, N: int, D: int, causal: bool, mode: str) -> float:
    f = 4 * B * H * N * N * D / (2 if causal else 1)
    return f if mode == "fwd" else 2.5 * f


def implementations(causal: bool, N: int, device: str, math_max_n: int):
    """name -> f(q, k, v) for every implementation measured (those that cannot run raise when called)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impls = {"selfattn-triton": lambda q, k, v: selfattn.attention(q, k, v, causal=causal, backend="triton")}
    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}

    def sdpa(kind):
        def run(q, k, v):
            if kind == "math" and N > math_max_n:
                raise RuntimeError(f"skipped: math materialises N x N (N={N} > --math-max-n {math_max_n})")
            with sdpa_kernel([kinds[kind]]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run

    for kind in SDPA_BACKENDS:
        impls[f"sdpa-{kind}"] = sdpa(kind)
    impls["flex"] = _flex(causal, N, device)
    return impls


def _flex(causal: bool, N: int, device: str):
    state = {}

    def run(q, k, v):
        if "fn" not in state:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            block_mask = None
            if causal:
                block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, N, N,
                                               device=device)
            compiled = torch.compile(flex_attention, dynamic=False)
            state["fn"] = lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
        return state["fn"](q, k, v)

    return run


def bench(fn, *, mode: str, q, k, v, device: str) -> float:
    """Median milliseconds of one forward, or of one backward (the forward's graph kept and reused)."""
    if device == "cpu":
        do_bench = _cpu_bench
    else:
        from triton.testing import do_bench
    if mode == "fwd":
        with torch.no_grad():
            fn(q, k, v)  # compiles / autotunes outside the timed region
            return do_bench(lambda: fn(q, k, v), warmup=25, rep=100, return_mode="median")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    d_out = torch.randn_like(out)
    out.backward(d_out, retain_graph=True)
    return do_bench(lambda: out.backward(d_out, retain_graph=True), warmup=25, rep=100, grad_to_none=[q, k, v],
                    return_mode="median")


def _cpu_bench(fn, warmup=1, rep=1, grad_to_none=None, return_mode="median"):
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args, save=lambda result: None) -> dict:
    device = "cpu" if args.smoke else "cuda"
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu-interpreter ({platform.processor() or 'cpu'})"
    rows = []
    for D, N, causal in ((d, n, c) for d in args.d for n in args.n for c in args.causal):
        H = args.hidden // D
        B = max(1, args.tokens // N)
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(3))
        impls = implementations(causal, N, device, args.math_max_n)
        reference_out = None
        for mode in args.modes:
            for impl, fn in impls.items():
                if args.only and not any(re.search(p, impl) for p in args.only):
                    continue
                row = dict(impl=impl, mode=mode, B=B, H=H, N=N, D=D, causal=causal)
                t0 = time.perf_counter()
                try:
                    if mode == "fwd":
                        with torch.no_grad():
                            out = fn(q, k, v)
                        if reference_out is None:
                            reference_out = out
                        row["max_diff_vs_first"] = (out.float() - reference_out.float()).abs().max().item()
                    ms = bench(fn, mode=mode, q=q, k=k, v=v, device=device)
                    row.update(ms=ms, tflops=flops(B, H, N, D, causal, mode) / (ms * 1e-3) / 1e12)
                except Exception as e:  # noqa: BLE001  (record and go on: one missing backend must not stop the run)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                row["wall_s"] = round(time.perf_counter() - t0, 1)  # compiling and autotuning included
                rows.append(row)
                shown = f"{row['tflops']:7.1f} TFLOP/s" if "tflops" in row else row["error"]
                print(f"{impl:16} {mode} D={D:<3} N={N:<5} B={B:<3} H={H:<2} causal={causal!s:5} {shown}"
                      f"  ({row['wall_s']} s)", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
            save(_result(args, name, device, rows))  # after every shape: a run stopped by a time limit keeps them
    return _result(args, name, device, rows)


def _result(args, name: str, device: str, rows: list) -> dict:
    return dict(device=name, dtype=args.dtype, autotune=args.autotune, torch=torch.__version__,
                triton=_triton_version(), selfattn=selfattn.__version__, tuned=_tuned_configs(device),
                tokens=args.tokens, hidden=args.hidden, rows=rows,
                when=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


def _tuned_configs(device: str) -> dict:
    """The tiles the autotuner chose, per kernel and tuning key (what the next tuning round starts from)."""
    if device != "cuda" or os.environ.get("SELFATTN_TRITON_AUTOTUNE") == "0":
        return {}
    from selfattn.backends import triton_tuning

    return {name: {str(key): str(config) for key, config in triton_tuning.tuned(name).cache.items()}
            for name in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")}


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def table(result: dict) -> str:
    """Markdown: one line per (D, causal, mode, N), TFLOP/s per implementation, and selfattn / fastest SDPA."""
    rows = result["rows"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = [f"{result['device']}, {result['dtype']}, torch {result['torch']}, triton {result['triton']}, "
             f"selfattn autotune {result.get('autotune', 'on')} "
             f"({result['when']}); TFLOP/s, B·N = {result['tokens']}, hidden {result['hidden']}", "",
             "| mode | D | causal | N | " + " | ".join(impls) + " | selfattn / best SDPA |",
             "|---|---|---|---|" + "---|" * (len(impls) + 1)]
    keys = list(dict.fromkeys((r["mode"], r["D"], r["causal"], r["N"]) for r in rows))
    for key in keys:
        got = {r["impl"]: r for r in rows if (r["mode"], r["D"], r["causal"], r["N"]) == key}
        cells = [f"{got[i]['tflops']:.0f}" if "tflops" in got.get(i, {}) else "–" for i in impls]
        sdpa = [got[i]["tflops"] for i in got if i.startswith("sdpa-") and "tflops" in got[i]]
        ours = got.get("selfattn-triton", {}).get("tflops")
        ratio = f"{ours / max(sdpa):.2f}" if ours and sdpa else "–"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def _save(result: dict, args, *, final: bool) -> str:
    stem = "gpu-" + re.sub(r"[^A-Za-z0-9]+", "-", result["device"]).strip("-").lower() + f"-{result['dtype']}"
    if args.smoke:
        stem = "smoke-" + stem
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(table(result) + "\n")
    if final:
        plot(result, args.out / f"{stem}.png")
    return stem


def plot(result: dict, path: Path) -> None:
    """TFLOP/s against N, one panel per (mode, D, causal), one line per implementation."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'selfattn[viz]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "tflops" in r]
    panels = list(dict.fromkeys((r["mode"], r["D"], r["causal"]) for r in rows))
    if not panels:
        return
    cols = min(4, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(4.2 * cols, 3.6 * -(-len(panels) // cols)),
                             squeeze=False)
    for ax, (mode, D, causal) in zip(axes.flat, panels, strict=False):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["N"], r["tflops"]) for r in rows
                         if (r["impl"], r["mode"], r["D"], r["causal"]) == (impl, mode, D, causal))
            if pts:
                ns, rates = zip(*pts, strict=True)
                ax.plot(ns, rates, marker="o", lw=2.5 if impl == "selfattn-triton" else 1.2, label=impl)
        ax.set(title=f"{mode}, D={D}, {'causal' if causal else 'full'}", xlabel="N", ylabel="TFLOP/s", xscale="log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{result['device']}, {result['dtype']} (torch {result['torch']}, triton {result['triton']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--d", type=int, nargs="+", default=[64, 128])
    p.add_argument("--causal", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="+", default=[False, True])
    p.add_argument("--modes", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    p.add_argument("--tokens", type=int, default=16384, help="B·N (default 16k)")
    p.add_argument("--hidden", type=int, default=2048, help="H·D (default 2048)")
    p.add_argument("--math-max-n", type=int, default=8192, help="skip SDPA's math backend above this N")
    p.add_argument("--only", nargs="*", help="regexes of implementation names to run")
    p.add_argument("--quick", action="store_true", help="D=128, N in 2k and 8k only (fits a short GPU session)")
    p.add_argument("--autotune", choices=["on", "off"], default="on",
                   help="selfattn's Triton autotuning (off: the default tiles, no tuning time)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1 (plumbing only)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    os.environ["SELFATTN_TRITON_AUTOTUNE"] = "1" if args.autotune == "on" else "0"
    if args.quick:
        args.n, args.d = [2048, 8192], [128]
    if args.smoke:
        args.n, args.d, args.tokens, args.hidden, args.dtype = [32], [16], 64, 32, "float32"
        args.only = args.only or ["triton", "sdpa-math"]
    elif not torch.cuda.is_available():
        p.error("no CUDA GPU: this benchmark measures GPU kernels (use --smoke with TRITON_INTERPRET=1 to test it)")
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args, save=lambda result: _save(result, args, final=False))
    stem = _save(result, args, final=True)
    print("\n" + table(result))
    print(f"\nwrote {args.out / stem}.json, .md and .png")
    return 0 if all(math.isfinite(r.get("tflops", 0.0)) for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
