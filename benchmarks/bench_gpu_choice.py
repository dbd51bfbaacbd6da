"""The automatic choice on a GPU against SDPA (FlashAttention-2 / cuDNN inside it) and FlexAttention, in TFLOP/s.

    python benchmarks/bench_gpu_choice.py [--quick] [--out DIR]      # on a CUDA GPU
    python benchmarks/bench_gpu_choice.py --dry-run                  # the plumbing on the CPU, tiny, no timing

Grid: bf16, B·N = 16k tokens, H·D = 2048, D = 64 and 128, N = 1k, 4k, 16k (``--quick``: D = 128, N = 4k and 16k),
workloads causal, documents (4 per sequence, causal), sliding window 1,024, soft-cap 30 (causal), dropout 0.1
(causal); forward and forward + backward. Each case times ``selfattn.attention`` with the backend chosen
automatically (the table in use is recorded), torch SDPA where it expresses the workload (causal: ``is_causal``;
documents and windows as a dense mask up to N = 4k), and FlexAttention compiled with the same mask_mod/score_mod;
the first call of Flex (its compile) is recorded apart. TFLOP/s count the visible part of the matrix products
(forward 4·B·H·N²·D·density, backward 2.5x). Results are written after every case to
gpu-choice-<device>.json and .md, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import selfattn
from selfattn import masks, score_mods
from selfattn.backends import choice

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = ("causal", "documents", "window", "softcap", "dropout")
WINDOW, DOCS, CAP, P_DROP = 1024, 4, 30.0, 0.1


def selfattn_kwargs(name: str, N: int, device: str) -> dict:
    if name == "causal":
        return {"causal": True}
    if name == "documents":
        return {"mask": masks.document(torch.arange(N, device=device) // (N // DOCS)) & masks.causal()}
    if name == "window":
        return {"mask": masks.sliding_window(WINDOW)}
    if name == "softcap":
        return {"causal": True, "score_mod": score_mods.softcap(CAP)}
    return {"causal": True, "dropout_p": P_DROP, "dropout_seed": 0}


def density(name: str, N: int) -> float:
    if name == "documents":
        return 0.5 / DOCS
    if name == "window":
        w = min(WINDOW, N)
        return (w * N - w * (w - 1) / 2) / (N * N)
    return 0.5


def sdpa_kwargs(name: str, N: int, device: str):
    """SDPA's arguments for the workload, or None where it cannot express it (soft-cap; selfattn's dropout bits;
    dense masks above 4k)."""
    if name == "causal":
        return {"is_causal": True}
    if name in ("documents", "window") and N <= 4096:
        m = selfattn_kwargs(name, N, device)["mask"].dense(1, 1, N, N, device)
        return {"attn_mask": m}
    return None


def flex_fn(name: str, N: int, device: str):
    """(compiled call, mask_mod, score_mod) for FlexAttention, or None for dropout (no dropout in Flex)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if name == "dropout":
        return None
    ids = torch.arange(N, device=device) // (N // DOCS)

    def causal(b, h, q, k):
        return k <= q

    mask_mod = {"documents": lambda b, h, q, k: (ids[q] == ids[k]) & (k <= q),
                "window": lambda b, h, q, k: (k <= q) & (k > q - WINDOW)}.get(name, causal)
    score_mod = (lambda s, b, h, q, k: torch.tanh(s / CAP) * CAP) if name == "softcap" else None
    block_mask = create_block_mask(mask_mod, None, None, N, N, device=device)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)


def bench_fn(fn, rounds: int, cuda: bool) -> float:
    times = []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> list[dict]:
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    Ds = [16] if args.dry_run else ([128] if args.quick else [64, 128])
    Ns = [256] if args.dry_run else ([4096, 16384] if args.quick else [1024, 4096, 16384])
    modes = ["fwd"] if args.dry_run else ["fwd", "fwd+bwd"]
    name_of_device = choice.device_name(device)
    rows, out_dir = [], Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu-choice-" + ("dry-run" if args.dry_run else "".join(c if c.isalnum() else "-" for c in name_of_device))
    for D in Ds:
        H = 2048 // D if not args.dry_run else 2
        for N in Ns:
            B = max(1, 16384 // N) if not args.dry_run else 1
            g = torch.Generator().manual_seed(N + D)
            for name in args.workloads:
                for mode in modes:
                    grad = mode == "fwd+bwd"
                    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_(grad)
                               for _ in range(3))
                    d_out = torch.randn(B, H, N, D, generator=g).to(device, dtype)
                    kw = selfattn_kwargs(name, N, device)
                    chosen = selfattn.backends.choose(selfattn.api.make_call(q, k, v, **kw)).name
                    impls = {"selfattn (auto)": lambda q, k, v, kw=kw: selfattn.attention(q, k, v, **kw)}
                    skw = sdpa_kwargs(name, N, device)
                    if skw is not None:
                        impls["sdpa"] = lambda q, k, v, skw=skw: F.scaled_dot_product_attention(q, k, v, **skw)
                    if not args.dry_run:
                        fx = flex_fn(name, N, device)
                        if fx is not None:
                            impls["flex"] = fx
                    row = {"workload": name, "D": D, "N": N, "B": B, "H": H, "mode": mode, "chosen": chosen,
                           "ms": {}, "tflops": {}, "first_call_s": {}, "errors": {}}
                    flop = 4 * B * H * N * N * D * density(name, N) * (3.5 if grad else 1.0)
                    for label, f in impls.items():
                        def once(f=f, q=q, k=k, v=v, grad=grad, d_out=d_out):
                            out = f(q, k, v)
                            if grad:
                                torch.autograd.grad(out, (q, k, v), d_out)
                        try:
                            t0 = time.perf_counter()
                            once()
                            row["first_call_s"][label] = round(time.perf_counter() - t0, 3)
                            if not args.dry_run:
                                t = bench_fn(once, args.rounds, True)
                                row["ms"][label] = round(t * 1e3, 3)
                                row["tflops"][label] = round(flop / t / 1e12, 1)
                        except Exception as e:  # noqa: BLE001 (recorded: a failing implementation is a result)
                            row["errors"][label] = f"{type(e).__name__}: {str(e)[:200]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    _write(out_dir, stem, name_of_device, rows)
    return rows


def _write(out_dir: Path, stem: str, device: str, rows: list[dict]) -> None:
    meta = {"device": device, "torch": torch.__version__, "table": choice.describe("cuda" if "NVIDIA" in device or
                                                                                   "H100" in device else "cpu")}
    (out_dir / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = [f"# the automatic choice vs SDPA and Flex on {device} (torch {torch.__version__})", "",
             "| workload | D | N | mode | chosen | auto TFLOP/s | SDPA | Flex | auto / best other |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        t = r["tflops"]
        others = [t[x] for x in ("sdpa", "flex") if x in t]
        ratio = f"{t['selfattn (auto)'] / max(others):.2f}x" if others and "selfattn (auto)" in t else "—"
        lines.append(f"| {r['workload']} | {r['D']} | {r['N']} | {r['mode']} | {r['chosen']} | "
                     f"{t.get('selfattn (auto)', '—')} | {t.get('sdpa', '—')} | {t.get('flex', '—')} | {ratio} |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="tiny, on the CPU, no timing: checks the plumbing")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_gpu_choice: no CUDA GPU visible; use --dry-run on the CPU")
    rows = run(args)
    print(f"{len(rows)} cases; errors: {sum(bool(r['errors']) for r in rows)}")


if __name__ == "__main__":
    main()
