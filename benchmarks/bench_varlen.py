"""Packed variable-length sequences (selfattn.varlen_attention) against the same sequences padded to the longest.

Not a test: a script that times, in one run and on the same inputs, causal attention over a batch of sequences of
random lengths, forward and forward+backward:

    varlen         selfattn.varlen_attention on the packed (T, H, D) tensors and cu_seqlens (tiled backend on CPU)
    padded         selfattn.attention on the (B, H, N_max, D) padded batch, causal=True & masks.key_padding(lengths)
    sdpa-padded    torch SDPA on the padded batch with is_causal=True (exact for the real tokens of a right-padded
                   batch: they see only earlier real tokens; the padding rows are discarded)
    per-sequence   a Python loop of selfattn.attention, one call per sequence

and prints the ratios to varlen, writes benchmarks/results/varlen.json (and varlen.png). The outputs of the real
tokens are compared across implementations (max |difference| in the JSON).

    flock /tmp/selfattn-bench.lock python benchmarks/bench_varlen.py   # 64 sequences of 64..2048 tokens, 3 rounds
    python benchmarks/bench_varlen.py --smoke --out /tmp/x                      # plumbing only (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import selfattn
from selfattn import masks
from selfattn.backends import choice

HERE = Path(__file__).resolve().parent


def packed_inputs(lengths: list[int], H: int, D: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, D, generator=g, dtype=dtype) for _ in range(3))  # (T, H, D)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def pad(t: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(T, H, D) packed -> (B, H, N_max, D) right-padded with zeros."""
    B, N = len(lengths), max(lengths)
    out = t.new_zeros(B, N, *t.shape[1:])  # (B, N_max, H, D)
    out[_real(lengths)] = t
    return out.transpose(1, 2)  # (B, H, N_max, D)


def unpad(t: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(B, H, N_max, D) -> (T, H, D), the real tokens only."""
    return t.transpose(1, 2)[_real(lengths)]


def _real(lengths: list[int]) -> torch.Tensor:
    L = torch.tensor(lengths)
    return torch.arange(max(lengths))[None, :] < L[:, None]  # (B, N_max)


def implementations(lengths: list[int], cu: torch.Tensor):
    """name -> f(q, k, v) with packed (T, H, D) inputs and output; padding inside the timed region is a cost the
    padded path pays in a real model too (it is small next to the attention)."""
    key_lengths = torch.tensor(lengths)

    def varlen(q, k, v):
        return selfattn.varlen_attention(q, k, v, cu, causal=True)

    def padded(q, k, v):
        out = selfattn.attention(*(pad(t, lengths) for t in (q, k, v)), causal=True,
                                 mask=masks.key_padding(key_lengths))
        return unpad(out, lengths)

    def sdpa_padded(q, k, v):
        return unpad(F.scaled_dot_product_attention(*(pad(t, lengths) for t in (q, k, v)), is_causal=True), lengths)

    def per_sequence(q, k, v):
        bounds = zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
        outs = [selfattn.attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), causal=True)[0]
                for a, b in bounds]  # each (H, n, D)
        return torch.cat(outs, dim=1).transpose(0, 1)  # (T, H, D)

    return {"varlen": varlen, "padded": padded, "sdpa-padded": sdpa_padded, "per-sequence": per_sequence}


def timed(f, q, k, v, mode: str) -> tuple[float, torch.Tensor]:
    """Seconds of one run, and its output (fwd) or dQ (fwd+bwd) for the comparison across implementations."""
    if mode == "fwd":
        t0 = time.perf_counter()
        with torch.no_grad():
            out = f(q, k, v)
        return time.perf_counter() - t0, out
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    t0 = time.perf_counter()
    f(qq, kk, vv).sum().backward()
    return time.perf_counter() - t0, qq.grad


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-seqs", type=int, default=64)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds; each round runs every implementation once, in turn, so that a change of the "
                        "machine's load hits them alike. Reported: the best time, and the median of the rounds' ratios")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the plumbing, the numbers mean nothing")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.smoke:
        args.n_seqs, args.min_len, args.max_len, args.heads, args.head_dim = 5, 1, 40, 2, 16

    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.n_seqs,), generator=g).tolist()
    q, k, v, cu = packed_inputs(lengths, args.heads, args.head_dim, torch.float32, args.seed)
    impls = implementations(lengths, cu)
    for f in implementations(lengths[:2], cu[:3]).values():  # warm-up on two sequences (thread pools, allocator)
        timed(f, *(t[: int(cu[2])] for t in (q, k, v)), "fwd+bwd")

    load_before = os.getloadavg()
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        times: dict[str, list[float]] = {name: [] for name in impls}
        diffs: dict[str, float] = {}
        for r in range(args.repeats):
            ref = None
            for name, f in impls.items():
                seconds, out = timed(f, q, k, v, mode)
                ref = out if ref is None else ref
                times[name].append(seconds)
                diffs[name] = (out.double() - ref.double()).abs().max().item()
                print(f"{mode:8s} round {r}  {name:13s} {seconds:8.3f} s", flush=True)
        for name, ts in times.items():
            ratios = sorted(t / t_varlen for t, t_varlen in zip(ts, times["varlen"], strict=True))
            rows.append(dict(impl=name, mode=mode, seconds=min(ts), rounds=ts, ratio_to_varlen=ratios[len(ratios) // 2],
                             max_diff_vs_varlen=diffs[name]))

    T, N_max = sum(lengths), max(lengths)
    pairs_packed = sum(n * (n + 1) // 2 for n in lengths)
    result = dict(
        config=dict(n_seqs=args.n_seqs, lengths=lengths, T=T, N_max=N_max, heads=args.heads,
                    head_dim=args.head_dim, dtype="float32", causal=True, rounds=args.repeats, seed=args.seed,
                    threads=torch.get_num_threads(), torch=torch.__version__, smoke=args.smoke),
        padding_overhead=dict(tokens_padded=len(lengths) * N_max, tokens_packed=T,
                              causal_pairs_padded_batch=len(lengths) * N_max * (N_max + 1) // 2,
                              causal_pairs_packed=pairs_packed),
        load_before=load_before, load_after=os.getloadavg(), machine=choice.machine(), rows=rows,
    )
    print(f"T = {T} packed tokens, padded batch {len(lengths)} x {N_max} = {len(lengths) * N_max} "
          f"({len(lengths) * N_max / T:.2f}x the tokens); load {load_before[0]:.2f} -> {result['load_after'][0]:.2f}")
    for r in rows:
        print(f"{r['mode']:8s} {r['impl']:13s} best {r['seconds']:7.3f} s  {r['ratio_to_varlen']:6.2f}x varlen's time "
              "(median of the rounds)  "
              f"(max |diff| of {'out' if r['mode'] == 'fwd' else 'dq'} vs varlen {r['max_diff_vs_varlen']:.1e})")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "varlen_smoke" if args.smoke else "varlen"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    _plot(rows, args.out / f"{stem}.png", result["config"])
    return result


def _plot(rows, path: Path, config: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ys = [next(r["seconds"] for r in rows if r["impl"] == name and r["mode"] == m) for m in ("fwd", "fwd+bwd")]
        ax.bar([x + i * width for x in (0, 1)], ys, width, label=name)
    ax.set_xticks([0.4 - width / 2, 1.4 - width / 2], ["fwd", "fwd+bwd"])
    ax.set_ylabel("seconds (lower is better)")
    ax.set_title(f"causal, {config['n_seqs']} sequences of {min(config['lengths'])}..{max(config['lengths'])} "
                 f"tokens, H={config['heads']} D={config['head_dim']}, CPU", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
