"""The ``selfattn`` command: a thin layer over the library (every subcommand calls a public function)."""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch


def info() -> str:
    """What this machine can run: the registered backends in priority order, and why any cannot."""
    from selfattn import backends

    lines = [
        f"selfattn {__import__('selfattn').__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        f"CPU threads: {torch.get_num_threads()}; CUDA available: {torch.cuda.is_available()}",
        "backends (priority order):",
    ]
    for name, backend in backends.REGISTRY.items():
        reasons = backend.unavailable_reasons()
        state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        lines.append(f"  {name:<12} {state}")
        lines.append(f"  {'':<12} {backend.description}")
        lines.append(f"  {'':<12} devices={sorted(backend.devices)} grad={backend.supports_grad} "
                     f"masks={backend.supports_masks} bias={backend.supports_bias} head_dims={backend.head_dims}")
    return "\n".join(lines)


def demo() -> str:
    """A small worked example: attention by hand-sized numbers, the causal grid, and agreement with torch."""
    import selfattn
    from selfattn import reference

    out = []
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, dtype=torch.float64)  # (B, N, d_model): 4 tokens
    layer = selfattn.SelfAttention(d_in=8, d_k=4, causal=True).double()
    y, w = layer(x, return_weights=True)
    out.append("A causal self-attention head on 4 tokens: weights (queries are rows, keys are columns)")
    for row in w[0].tolist():
        out.append("   " + "  ".join(f"{p:5.3f}" for p in row))
    t0 = time.perf_counter()
    q, k, v = (torch.randn(2, 4, 257, 32, dtype=torch.float64) for _ in range(3))
    ours = selfattn.attention(q, k, v, causal=True)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    out.append(f"selfattn vs torch SDPA (float64, B=2 H=4 N=257 D=32, causal): relative difference {rel:.1e} "
               f"in {time.perf_counter() - t0:.2f} s")
    lse = reference.attention(q, k, v, causal=True, return_lse=True)[1]
    out.append(f"log-sum-exp per row, first query of head 0: {lse[0, 0, 0].item():.4f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfattn", description="Exact transformer self-attention on PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list the backends and whether they can run here")
    sub.add_parser("demo", help="a short offline demonstration")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    elif args.command == "demo":
        print(demo())
    return 0


if __name__ == "__main__":
    sys.exit(main())
