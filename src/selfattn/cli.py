"""The ``selfattn`` command: a thin layer over the library (every subcommand calls a public function)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch


def info() -> str:
    """What this machine can run: the registered backends in priority order, and why any cannot."""
    from selfattn import backends
    from selfattn.backends import choice

    lines = [
        f"selfattn {__import__('selfattn').__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        f"CPU threads: {torch.get_num_threads()}; CUDA available: {torch.cuda.is_available()}",
        "backends (priority order):",
    ]
    for name, backend in backends.REGISTRY.items():
        reasons = backend.unavailable_reasons()
        state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        if name == "native":
            from selfattn.backends import native

            state = native.describe().removeprefix("native: ") if not reasons else "; ".join(reasons)
        lines.append(f"  {name:<12} {state}")
        lines.append(f"  {'':<12} {backend.description}")
        lines.append(f"  {'':<12} devices={sorted(backend.devices)} grad={backend.supports_grad} "
                     f"masks={backend.supports_masks} bias={backend.supports_bias} head_dims={backend.head_dims} "
                     f"score_mods={backend.supports_score_mods} sinks={backend.supports_sinks} "
                     f"dropout={backend.supports_dropout}")
    lines += ["", "automatic choice (docs/design.md; SELFATTN_BACKEND=name pins one"
              + (f", now {os.environ['SELFATTN_BACKEND']!r}" if os.environ.get("SELFATTN_BACKEND") else "") + "):"]
    for device_type in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        lines.append("  " + choice.describe(device_type))
        table = choice.table_for(device_type)
        if table is not None:
            lines.append(f"  {'call kind (device|dtype|mask|score_mod|sinks|dropout|grad|heads|rows|N_k)':<78} "
                         "fastest first")
            for key in sorted(table.entries):
                lines.append(f"    {key:<76} {' > '.join(table.entries[key]) or '-'}")
    return "\n".join(lines)


def tune(args: argparse.Namespace) -> int:
    """``selfattn tune``: time the backends on this machine and write the chooser's table (``selfattn.tune``)."""
    from selfattn import tune as tuning

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("selfattn tune: error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    quick = dict(sizes=[128], rounds=1) if args.quick else {}
    sizes = [int(n) for n in args.sizes.split(",")] if args.sizes else quick.get("sizes")
    table = tuning.tune(device=device, sizes=sizes, rounds=args.rounds or quick.get("rounds", 5),
                        compiled=args.all or None, out=args.out, merge=args.merge, log=print,
                        **({"workloads": args.workloads.split(",")} if args.workloads else {}),
                        **({"dtypes": args.dtypes.split(",")} if args.dtypes else {}))
    print(f"wrote {table['path']}: {len(table['entries'])} call kinds for {table['device']!r}, torch {table['torch']}")
    return 0


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
    from selfattn import __version__

    parser = argparse.ArgumentParser(prog="selfattn", description="Exact transformer self-attention on PyTorch.")
    parser.add_argument("--version", action="version", version=f"selfattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list the backends and whether they can run here")
    sub.add_parser("demo", help="a short offline demonstration")
    t = sub.add_parser("tune", help="time every backend on this machine and write the automatic choice's table")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    t.add_argument("--out", default=None, help="the table file (default: ~/.cache/selfattn/tables/<device>.json)")
    t.add_argument("--sizes", default=None, help="comma-separated N (default 128,512,2048,4096 on the CPU)")
    t.add_argument("--merge", action="store_true",
                   help="add to the table file instead of replacing it: kinds this run does not measure stay")
    t.add_argument("--dtypes", default=None, help="comma-separated (default float32,bfloat16)")
    t.add_argument("--workloads", default=None, help="comma-separated (default: all of selfattn.tune.WORKLOADS)")
    t.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case (default 5)")
    t.add_argument("--all", action="store_true", help="on the CPU also time backends that compile per signature")
    t.add_argument("--quick", action="store_true", help="N = 128 and one round only: checks that tuning runs")
    _add_gpt_commands(sub)
    add_explain_arguments(sub.add_parser("explain", help="trace attention step by step: tables, heatmaps, HTML page"))
    args = parser.parse_args(argv)
    if args.command in GPT_COMMANDS:
        return _run_gpt_command(args)
    if args.command == "tune":
        return tune(args)
    if args.command == "info":
        print(info())
    elif args.command == "demo":
        print(demo())
    elif args.command == "explain":
        return explain(args)
    return 0


def add_explain_arguments(p: argparse.ArgumentParser) -> None:
    from selfattn.explain import DEFAULT_TEXT

    p.description = ("Show attention step by step. With TEXT (default: an embedded sentence) the tiny GPT runs on "
                     "it and every head of every layer is traced; with --json your own X, W_Q, W_K, W_V; with "
                     "--lesson a worked lesson. Prints the steps for one token and writes heatmap PNGs and one "
                     "offline HTML page to --out.")
    p.add_argument("text", nargs="?", default=None, help=f"the text to explain (default {DEFAULT_TEXT!r})")
    p.add_argument("--checkpoint", help="a checkpoint from `selfattn train` (default: random weights)")
    p.add_argument("--model", metavar="PATH", help="a local Hugging Face model folder (config, weights, tokenizer): "
                   "explain that model on TEXT, tokens labelled with its tokenizer's pieces; nothing is downloaded")
    p.add_argument("--json", metavar="PATH", help="trace the matrices in this JSON file instead of a model")
    p.add_argument("--lesson", choices=["scaling", "orthogonal", *TEXT_LESSONS],
                   help="a lesson with numbers: scaling (why 1/√d_k, with a plot), orthogonal (does an orthogonal x_j "
                   "count?), steps (the order of the computation for one token, with shapes), weights (why W_Q, W_K, "
                   "W_V); steps and weights run the tiny GPT or --model on TEXT")
    p.add_argument("--layer", type=int, default=0, help="layer whose steps are printed (default 0)")
    p.add_argument("--head", type=int, default=0, help="head whose steps are printed (default 0)")
    p.add_argument("--token", type=int, default=None, help="query token whose steps are printed (default the last)")
    p.add_argument("--out", default="explain_out", help="folder for the PNGs and the HTML page (default explain_out)")
    p.add_argument("--no-png", action="store_true", help="do not write the heatmap PNGs (no matplotlib needed)")
    p.add_argument("--no-html", action="store_true", help="do not write the HTML page")


def explain(args: argparse.Namespace) -> int:
    """``selfattn explain``: each branch calls public functions of ``selfattn.explain``; bad input exits with 2."""
    from selfattn import explain as ex

    try:
        on_text = args.lesson in TEXT_LESSONS  # lessons that run a model on a text
        given = [name for name, v in (("TEXT", args.text and not on_text), ("--json", args.json),
                                      ("--lesson", args.lesson)) if v]
        if len(given) > 1:
            raise ValueError(f"give one of TEXT, --json, --lesson, not {' and '.join(given)} (TEXT goes with "
                             f"--lesson {' or '.join(TEXT_LESSONS)})")
        if args.checkpoint and (args.json or (args.lesson and not on_text)):
            raise ValueError("--checkpoint goes with TEXT, not with --json or --lesson scaling/orthogonal")
        if args.model and (args.json or (args.lesson and not on_text) or args.checkpoint):
            raise ValueError("--model goes with TEXT, not with --json, --checkpoint or --lesson scaling/orthogonal")
        if args.lesson:
            return _lesson(args)
        if args.json:
            trace = ex.trace_json(args.json, token=args.token)
            result = ex.Explanation(trace.tokens, ((trace,),), title=f"your matrices ({args.json})")
        elif args.model:
            text = ex.DEFAULT_TEXT if args.text is None else args.text
            result = ex.explain_pretrained(args.model, text, layer=args.layer, head=args.head,
                                           token=-1 if args.token is None else args.token)
        else:
            text = ex.DEFAULT_TEXT if args.text is None else args.text
            result = ex.explain_text(text, checkpoint=args.checkpoint, layer=args.layer, head=args.head,
                                     token=-1 if args.token is None else args.token)
        print(result.table())
        written = []
        if not args.no_png:
            written += result.write_pngs(args.out)
        if not args.no_html:
            written.append(result.write_html(os.path.join(args.out, "explain.html")))
    except (ValueError, TypeError, ImportError, KeyError, OSError) as e:
        print(f"selfattn explain: error: {e}", file=sys.stderr)
        return 2
    if written:
        print(f"\nwrote {len(written)} files: " + ", ".join(written))
    return 0


TEXT_LESSONS = ("steps", "weights")


def _lesson(args: argparse.Namespace) -> int:
    from selfattn import explain as ex
    from selfattn.explain import lessons

    if args.lesson in TEXT_LESSONS:
        text = ex.DEFAULT_TEXT if args.text is None else args.text
        token = -1 if args.token is None else args.token
        if args.model:
            from selfattn.explain import pretrained

            model, tokenizer = pretrained.load(args.model)
            heads, width = model.config.num_attention_heads, model.config.hidden_size
            e = ex.explain_hf(model, tokenizer, text, layer=args.layer, head=args.head, token=token)
        else:
            model, config = ex.load_model(args.checkpoint)
            heads, width = config.n_head, config.d_model
            e = ex.explain_text(text, checkpoint=args.checkpoint, layer=args.layer, head=args.head, token=token)
        if args.lesson == "steps":
            rotary = args.model is not None and any("rotary" in n for n, _ in model.named_modules())
            print(lessons.steps_text(e.trace, n_heads=heads, d_model=width, rotary=rotary))
            return 0
        if args.model:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]  # (1, N): the length was checked by explain_hf
        else:
            from selfattn.model.data import encode

            ids = encode(text)[None]  # (1, N) bytes
        X, qk, causal, name = lessons.first_layer(model, ids)
        print(lessons.projections_text(lessons.projections(X, qk, causal=causal), e.tokens, where=name))
        return 0

    if args.lesson == "orthogonal":
        print(lessons.orthogonal_text(lessons.orthogonal()))
        return 0
    rows = lessons.scaling()
    print(lessons.scaling_text(rows))
    if not args.no_png:
        from selfattn.explain import plots

        os.makedirs(args.out, exist_ok=True)
        print("\nwrote " + plots.lesson_plot(rows, os.path.join(args.out, "lesson_scaling.png")))
    return 0


# ------------------------------------------------------------------------------------ the tiny GPT: train, generate

GPT_COMMANDS = ("train", "generate")


def _add_gpt_commands(sub) -> None:
    from selfattn.model.gpt import GPTConfig
    from selfattn.model.train import TrainConfig

    m, t = GPTConfig(), TrainConfig()
    p = sub.add_parser("train", help="train the tiny GPT (default: the embedded Python docs, a few minutes on a CPU)")
    p.add_argument("--data", default=None, help="a UTF-8 text file (default: CPython's pydoc_data.topics)")
    p.add_argument("--out", default=t.out_dir, help=f"checkpoint directory (default {t.out_dir})")
    p.add_argument("--steps", type=int, default=t.steps)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--context", type=int, default=m.context, help="training sequence length in bytes")
    p.add_argument("--layers", type=int, default=m.n_layer)
    p.add_argument("--heads", type=int, default=m.n_head)
    p.add_argument("--kv-heads", type=int, default=None, help="fewer than --heads: grouped-query attention")
    p.add_argument("--d-model", type=int, default=m.d_model)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--min-lr", type=float, default=t.min_lr)
    p.add_argument("--warmup", type=int, default=t.warmup)
    p.add_argument("--eval-every", type=int, default=t.eval_every)
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--dtype", default=t.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=t.device)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="no loss-curve PNG")
    g = sub.add_parser("generate", help="sample text from a trained GPT, streamed as it comes")
    g.add_argument("--checkpoint", default=t.out_dir, help=f"checkpoint directory (default {t.out_dir})")
    g.add_argument("--prompt", default="\n")
    g.add_argument("--tokens", type=int, default=500, help="bytes to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--cache", default="window", choices=["window", "full", "none"],
                   help="window: sliding window + attention sinks, fixed memory (default); full: a KV cache of every "
                        "token; none: recompute everything for each token")
    g.add_argument("--window", type=int, default=None,
                   help="recent tokens kept by --cache window (default: the training context minus --sinks)")
    g.add_argument("--sinks", type=int, default=4, help="first tokens kept by --cache window")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")


def _run_gpt_command(args) -> int:
    try:
        if args.command == "train":
            return _train(args)
        return _generate(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"selfattn {args.command}: error: {e}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from selfattn.model.gpt import GPTConfig
    from selfattn.model.train import TrainConfig, train

    model = GPTConfig(context=args.context, n_layer=args.layers, n_head=args.heads, n_kv_head=args.kv_heads,
                      d_model=args.d_model)
    cfg = TrainConfig(model=model, data=args.data, out_dir=args.out, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, min_lr=min(args.min_lr, args.lr), warmup=args.warmup, eval_every=args.eval_every,
                      seed=args.seed, dtype=args.dtype, device=args.device, threads=args.threads,
                      progress=not args.no_progress, plot=not args.no_plot)
    r = train(cfg, resume=args.resume)
    print(f"{'stopped' if r['interrupted'] else 'done'} at step {r['step']} in {r['seconds']:.0f} s, "
          f"{r['tokens_per_s']:,.0f} tokens/s; held-out loss {r['val_loss']} nats/byte; checkpoint in {r['out_dir']}"
          + (f"; loss curve {r['plot']}" if r.get("plot") else ""))
    return 130 if r["interrupted"] else 0


def _generate(args) -> int:
    from selfattn.model.generate import generate
    from selfattn.model.train import load_checkpoint

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(args.checkpoint, device=args.device)
    print(args.prompt, end="", flush=True)
    t0, text = time.perf_counter(), ""
    try:
        text = generate(model, args.prompt, args.tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, cache=args.cache, window=args.window, sinks=args.sinks,
                        stream=lambda s: print(s, end="", flush=True))
    except KeyboardInterrupt:
        pass
    seconds = time.perf_counter() - t0
    print()
    if text:
        n = len(text.encode("utf-8", errors="replace"))
        print(f"[~{n} bytes in {seconds:.2f} s: {n / seconds:,.0f} tokens/s, cache={args.cache}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
