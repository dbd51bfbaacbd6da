"""Time and peak memory of selfattn on the CPU against torch's SDPA (and the naive computation where it fits).

Not a test: a script that prints one table with the speed ratio to torch's SDPA measured in the same run, and writes
benchmarks/results/cpu.json and cpu.png (time and memory against N, log axes), with the machine (CPU model,
``get_cpu_capability()``, threads). Each (case, implementation) runs in a fresh process so that its peak resident
memory (ru_maxrss) is its own. selfattn's side is the automatic choice (``attention()`` with no backend: what a user
gets; the backend it chose is recorded per case), or one backend named with ``--ours``.

    python benchmarks/bench_cpu.py              # the default grid (about 10-15 minutes on 2 cores)
    python benchmarks/bench_cpu.py --quick      # a smoke run (a minute)
    python benchmarks/bench_cpu.py --full       # also full/causal N = 16,384 fwd+bwd and 32k dense-mask SDPA runs
    python benchmarks/bench_cpu.py --ours tiled # the tiled backend instead of the automatic choice

Run timed measurements alone on the machine (flock /tmp/selfattn-bench.lock ...); the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WINDOW = 1024


def case(kind, N, mode, *, H=8, D=64, dtype="float32", B=1, docs=16, impls=("ours", "sdpa", "naive")):
    return dict(kind=kind, N=N, mode=mode, H=H, D=D, dtype=dtype, B=B, docs=docs, impls=list(impls))


def grid(args) -> list[dict]:
    cases = _grid(args)
    for c in cases:  # "ours": the automatic choice, or the backend --ours names
        c["ours"] = args.ours
    return cases


def _grid(args) -> list[dict]:
    if args.quick:
        return [case("full", 1024, "fwd"), case("causal", 1024, "fwd+bwd"),
                case("window", 4096, "fwd+bwd", impls=("ours", "sdpa")),
                case("documents", 4096, "fwd", docs=4, impls=("ours", "sdpa"))]
    ns = [n for n in (512, 1024, 2048, 4096, 8192, 16384) if n <= args.max_n and (n <= 8192 or args.full)]
    cases = []
    for kind in ("full", "causal"):
        for mode in ("fwd", "fwd+bwd"):
            cases += [case(kind, n, mode, impls=("ours", "sdpa") + (("naive",) if n <= 4096 else ())) for n in ns]
    cases += [case("causal", 4096, "fwd+bwd", dtype="bfloat16", impls=("ours", "sdpa")),
              case("full", 4096, "fwd+bwd", H=1, impls=("ours", "sdpa")),
              case("causal", 8192, "fwd+bwd", H=1, impls=("ours", "sdpa"))]
    if args.max_n >= 16384 and not args.full:  # the causal-vs-full forward target is stated at N = 16,384
        cases += [case(kind, 16384, "fwd", impls=("ours", "sdpa")) for kind in ("full", "causal")]
    dense_max = 32768 if args.full else 16384  # torch SDPA with a dense mask: N² compute and memory
    for n in (4096, 8192, 16384, 32768, 65536):
        if n > args.max_n:
            continue
        for mode in ("fwd", "fwd+bwd"):
            cases.append(case("window", n, mode, impls=("ours",) + (("sdpa",) if n <= dense_max else ())))
    docs_n = 32768 if args.full else 16384
    for mode in ("fwd", "fwd+bwd"):
        cases.append(case("documents", docs_n, mode, impls=("ours", "sdpa")))
    return cases


# ----------------------------------------------------------------------------------------------- one measurement


def measure(spec: dict, impl: str) -> dict:
    """Run in a fresh process: time and peak memory of one implementation on one case."""
    import torch

    import selfattn
    from selfattn import masks

    dtype = getattr(torch, spec["dtype"])
    B, H, N, D, kind = spec["B"], spec["H"], spec["N"], spec["D"], spec["kind"]
    grad = spec["mode"] == "fwd+bwd"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype).requires_grad_(grad) for _ in range(3))
    d_out = torch.randn(B, H, N, D, generator=g).to(dtype)
    doc_len = N // spec["docs"]
    mask = {"full": None, "causal": None, "window": masks.sliding_window(WINDOW),
            "documents": masks.document(torch.arange(N) // doc_len)}[kind]
    causal = kind in ("causal", "documents")

    ours = None if spec.get("ours", "auto") == "auto" else spec["ours"]
    chosen = None
    if impl == "ours":
        from selfattn import backends

        chosen = backends.choose(selfattn.api.make_call(q, k, v, causal=causal, mask=mask), ours).name

        def run():
            return selfattn.attention(q, k, v, causal=causal, mask=mask, backend=ours)
    elif impl == "sdpa":
        dense = None
        if mask is not None:  # the same mask as torch's SDPA needs it: a dense N x N bool tensor
            vis = mask.dense(1, 1, N, N)
            dense = vis & torch.ones(N, N, dtype=torch.bool).tril() if causal else vis

        def run():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense,
                                                                    is_causal=causal and dense is None)
    else:
        from selfattn import testing

        def run():
            return testing.naive(q, k, v, causal=causal, mask=mask)

    def once():
        out = run()
        if grad:
            out.backward(d_out)
            for t in (q, k, v):
                t.grad = None
        return out

    with torch.no_grad() if not grad else torch.enable_grad():
        if N > 256:  # warm the kernels up without paying for a second full-size run
            qs, ks, vs = (t[:, :, :256].detach().requires_grad_(grad) for t in (q, k, v))
            o = (selfattn.attention(qs, ks, vs, causal=causal, backend=chosen) if impl == "ours" else
                 torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal))
            if grad:
                o.sum().backward()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        times = []
        t_end = time.perf_counter() + 3.0
        while not times or (time.perf_counter() < t_end and len(times) < 5):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tensors = 3 + 1 + (1 + 3 if grad else 0)  # q, k, v, out (+ d_out, dq, dk, dv)
    own = tensors * B * H * N * D * q.element_size()
    inputs = (3 + (1 if grad else 0)) * B * H * N * D * q.element_size()  # allocated before ``base``
    return dict(time=min(times), runs=len(times), peak=peak, extra=max(0, peak - base), own=own,
                mem_vs_own=(max(0, peak - base) + inputs) / own, **({"backend": chosen} if chosen else {}))


def run_one(spec: dict, impl: str, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    try:
        p = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec), impl], capture_output=True,
                           text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(error=f"over {timeout:.0f} s")
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["killed"])[-1]
        return dict(error=("does not fit in memory" if p.returncode in (-9, 137) else tail[:80]))
    return json.loads(p.stdout.strip().splitlines()[-1])


def flops(spec: dict) -> float:
    f = 4.0 * spec["B"] * spec["H"] * spec["N"] ** 2 * spec["D"] * (3.5 if spec["mode"] == "fwd+bwd" else 1.0)
    return f / 2 if spec["kind"] == "causal" else f


# ------------------------------------------------------------------------------------------------------ report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run of four small cases")
    ap.add_argument("--full", action="store_true", help="add N = 16,384 full/causal and 32k dense-mask SDPA runs")
    ap.add_argument("--max-n", type=int, default=65536, help="skip cases with a longer sequence")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement before giving up")
    ap.add_argument("--only", default="", help="run only the cases whose 'kind N mode' contains this text")
    ap.add_argument("--ours", default="auto",
                    help="selfattn's side: 'auto' (the automatic choice, default) or a backend's name")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cpu.json")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one[0]), args.one[1])))
        return

    from selfattn.backends import choice

    info = choice.machine()
    print(f"{info['cpu']}, {info['capability']}, {info['threads']} threads, torch {info['torch']}; selfattn: "
          f"{args.ours}")
    load_before = os.getloadavg()
    rows = []
    print(f"{'case':<34}{'N':>7} {'mode':<8}{'ours s':>9}{'sdpa s':>9}{'naive s':>9}{'x sdpa':>8}"
          f"{'GF/s':>7}{'ours MB':>10}{'sdpa MB':>9}{'own MB':>8}{'mem/own':>8}", flush=True)
    for spec in [sp for sp in grid(args) if args.only in f"{sp['kind']} {sp['N']} {sp['mode']}"]:
        res = {impl: run_one(spec, impl, args.timeout) for impl in spec["impls"]}
        t, s = res.get("ours", {}), res.get("sdpa", {})
        ratio = s["time"] / t["time"] if "time" in t and "time" in s else None
        gf = flops(spec) / t["time"] / 1e9 if "time" in t and spec["kind"] in ("full", "causal") else None
        rows.append(dict(spec=spec, results=res, ratio_vs_sdpa=ratio, ours_gflops=gf))
        name = f"{spec['kind']} H={spec['H']} {spec['dtype']}" + (f" [{t['backend']}]" if "backend" in t else "")

        def cell(r, key="time", scale=1.0, fmt="{:9.3f}"):
            if not r:
                return f"{'-':>9}"
            return fmt.format(r[key] * scale) if key in r else f"{r.get('error', '?')[:9]:>9}"

        print(f"{name:<34}{spec['N']:>7} {spec['mode']:<8}{cell(t)}{cell(s)}{cell(res.get('naive'))}"
              f"{(f'{ratio:8.2f}' if ratio else '       -')}{(f'{gf:7.0f}' if gf else '      -')}"
              f"{cell(t, 'extra', 2**-20, '{:10.0f}')}{cell(s, 'extra', 2**-20, '{:9.0f}')}"
              f"{cell(t, 'own', 2**-20, '{:8.0f}')}{cell(t, 'mem_vs_own', 1.0, '{:8.2f}')}", flush=True)
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 cores); 'MB' = peak resident "
          "memory above the inputs, 'own MB' = inputs + output (+ d_out and gradients), 'mem/own' = selfattn's "
          "call's (inputs + peak growth) / own; [name]: the backend selfattn ran")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(rows=rows, load_before=load_before, load_after=load_after, window=WINDOW,
                                        ours=args.ours, machine=info), indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    series: dict[tuple, list] = {}
    for r in rows:
        sp = r["spec"]
        if sp["H"] != 8 or sp["dtype"] != "float32":
            continue
        for impl, res in r["results"].items():
            if "time" in res:
                series.setdefault((sp["kind"], sp["mode"], impl), []).append((sp["N"], res["time"], res["peak"]))
    plotted = 0
    for (kind, mode, impl), pts in sorted(series.items()):
        if len(pts) < 2:
            continue
        plotted += 1
        pts.sort()
        n, t, m = zip(*pts, strict=True)
        style = {"ours": "-", "tiled": "-", "sdpa": "--", "naive": ":"}[impl]  # "tiled": result files before "ours"
        ax_t.plot(n, t, style, marker="o", label=f"{impl} {kind} {mode}")
        ax_m.plot(n, [x / 2**20 for x in m], style, marker="o", label=f"{impl} {kind} {mode}")
    for ax, title, unit in ((ax_t, "time", "seconds"), (ax_m, "peak resident memory", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (B=1, H=8, D=64, float32)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    if plotted:
        ax_t.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
