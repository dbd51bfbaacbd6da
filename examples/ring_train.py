"""Train the tiny GPT (``selfattn.model.GPT``) with its sequence split over P processes (ring attention), on CPUs.

    GLOO_SOCKET_IFNAME=lo torchrun --nproc-per-node 2 examples/ring_train.py --steps 100   # 2 ranks, gloo
    python examples/ring_train.py --steps 100                                            # one process

Both print the same losses (to float32 rounding). Each rank holds N/P positions of every training window (zigzag
order); its attention layers project their rows, rotate them at their *global* positions, and run
``selfattn.distributed.ring_attention``; everything else in the model works row by row and needs no change. The
gradients of the replicated weights are summed over the ranks before the optimiser step. The data are random
windows of the embedded Python documentation (bytes), drawn from the same seed on every rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from selfattn import distributed as sd
from selfattn.model import GPT, GPTConfig
from selfattn.model.data import VOCAB_SIZE, load_splits
from selfattn.nn import MultiHeadAttention


@dataclass(frozen=True)
class Config:
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    d_model: int = 64
    seq_len: int = 128  # N, split over the ranks
    batch: int = 8
    steps: int = 100
    lr: float = 3e-3
    seed: int = 0
    layout: str = "zigzag"

    def gpt(self) -> GPTConfig:
        return GPTConfig(vocab_size=VOCAB_SIZE, context=self.seq_len, n_layer=self.n_layer, n_head=self.n_head,
                         n_kv_head=self.n_kv_head, d_model=self.d_model)


class RingAttention(nn.Module):
    """Stands in for a GPT block's ``MultiHeadAttention`` (and keeps its weights): this rank's rows attend to the
    whole sequence through the ring."""

    def __init__(self, attn: MultiHeadAttention, positions: Tensor, layout: str):
        super().__init__()
        self.attn, self.layout = attn, layout
        self.register_buffer("positions", positions, persistent=False)  # (n,) global positions of this rank's rows

    def forward(self, x: Tensor, cache=None) -> Tensor:
        if cache is not None:
            raise ValueError("ring attention is for training and prefill over a split sequence, not KV-cache decoding")
        B, n, _ = x.shape
        q, k, v = self.attn.project(x, self.positions)  # (B, H_q, n, D), (B, H_kv, n, D), rotated
        out = sd.ring_attention(q, k, v, causal=True, layout=self.layout)  # (B, H_q, n, D)
        return self.attn.W_O(out.transpose(1, 2).reshape(B, n, -1))  # (B, n, d_model)


def use_ring(model: GPT, positions: Tensor, layout: str) -> GPT:
    """Swap every block's attention for ring attention over this rank's rows (same parameters)."""
    for block in model.blocks:
        block.attn = RingAttention(block.attn, positions, layout)
    return model


def train(cfg: Config, *, distributed: bool = False, log=None) -> list[float]:
    """Train for cfg.steps and return the loss of every step (mean over all tokens of all ranks)."""
    rank, world_size = 0, 1
    if distributed:
        import torch.distributed as dist

        rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.gpt())  # the same initial weights on every rank
    if distributed:
        use_ring(model, sd.positions(cfg.seq_len, rank, world_size, cfg.layout), cfg.layout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    data = load_splits(context=cfg.seq_len)
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for step in range(cfg.steps):
        x, y = data.batch("train", cfg.batch, cfg.seq_len, g)  # (B, N) each, the same on every rank
        if distributed:
            x, y = (sd.shard(t, rank, world_size, layout=cfg.layout, dim=1) for t in (x, y))  # (B, N/P)
        _, loss = model(x, y)  # mean over this rank's tokens; every rank holds as many
        loss = loss / world_size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        total = loss.detach().clone()
        if distributed:
            for p in model.parameters():  # each rank saw N/P of the tokens: the full gradient is the sum
                dist.all_reduce(p.grad)
            dist.all_reduce(total)
        opt.step()
        losses.append(total.item())
        if log is not None:
            log(step, total.item())
    return losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--seq-len", type=int, default=Config.seq_len)
    parser.add_argument("--layout", choices=sd.LAYOUTS, default=Config.layout)
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--json", help="write the losses to this file (rank 0)")
    args = parser.parse_args(argv)
    cfg = Config(steps=args.steps, seq_len=args.seq_len, layout=args.layout, seed=args.seed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed, rank = world > 1, 0
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()

    def log(step, loss):
        if rank == 0 and (step % 10 == 0 or step == cfg.steps - 1):
            print(f"step {step:4d}  loss {loss:.5f}  (log 256 = {math.log(VOCAB_SIZE):.3f}, {world} process(es))",
                  flush=True)

    losses = train(cfg, distributed=distributed, log=log)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "world_size": world, "losses": losses}, f, indent=1)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
