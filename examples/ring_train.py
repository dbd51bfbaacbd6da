"""Train a tiny GPT with its sequence split over P processes (ring attention), on the CPU.

    GLOO_SOCKET_IFNAME=lo torchrun --nproc-per-node 2 examples/ring_train.py --steps 150  # 2 ranks, gloo
    python examples/ring_train.py --steps 150                                           # one process

Both print the same losses (to float32 rounding): each rank holds N/P positions of every sequence (zigzag order),
embeds them at their global positions (rotary), runs ``selfattn.distributed.ring_attention`` in every layer,
and the gradients of the replicated weights are summed over the ranks before the optimiser step.

The model is a small pre-norm decoder written here from ``selfattn.nn.MultiHeadAttention``; the data are
sequences that repeat a random 8-token motif, which the model learns to copy (the loss falls well below log V).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfattn import distributed as sd
from selfattn.nn import MultiHeadAttention


@dataclass(frozen=True)
class Config:
    vocab: int = 32
    d_model: int = 32
    n_heads: int = 4
    n_kv_heads: int = 2
    n_layers: int = 2
    seq_len: int = 64  # N, split over the ranks
    motif: int = 8
    batch: int = 16
    steps: int = 150
    lr: float = 1e-2
    seed: int = 0
    layout: str = "zigzag"


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, n_kv_heads=cfg.n_kv_heads, causal=True, rotary=True)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model,
                                                                                              cfg.d_model))
        self.layout = cfg.layout

    def forward(self, x: Tensor, positions: Tensor, ring: bool) -> Tensor:
        h = self.ln1(x)  # (B, n, d_model)
        if ring:
            B, n, _ = h.shape
            q, k, v = self.attn.project(h, positions)  # (B, H, n, D), rotated at the global positions
            out = sd.ring_attention(q, k, v, causal=True, layout=self.layout)  # (B, H_q, n, D)
            x = x + self.attn.W_O(out.transpose(1, 2).reshape(B, n, -1))  # (B, n, d_model)
        else:
            x = x + self.attn(h, positions=positions)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, tokens: Tensor, positions: Tensor, ring: bool = False) -> Tensor:
        """tokens (B, n) at global ``positions`` (n,) -> logits (B, n, vocab)."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, positions, ring)
        return self.head(self.ln_f(x))


def batch(cfg: Config, step: int) -> tuple[Tensor, Tensor]:
    """(inputs, targets), each (batch, seq_len): a random motif repeated, the same on every rank."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
    motif = torch.randint(0, cfg.vocab, (cfg.batch, cfg.motif), generator=g)
    tokens = motif.repeat(1, -(-(cfg.seq_len + 1) // cfg.motif))[:, : cfg.seq_len + 1]
    return tokens[:, :-1], tokens[:, 1:]


def train(cfg: Config, *, distributed: bool = False, log=None) -> list[float]:
    """Train for cfg.steps and return the loss of every step (mean over all tokens of all ranks)."""
    rank, world_size = 0, 1
    if distributed:
        import torch.distributed as dist

        rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)
    model = TinyGPT(cfg)  # the same initial weights on every rank
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    positions = sd.positions(cfg.seq_len, rank, world_size, cfg.layout)  # (n,)
    losses = []
    for step in range(cfg.steps):
        x, y = batch(cfg, step)
        if distributed:
            x, y = (sd.shard(t, rank, world_size, layout=cfg.layout, dim=1) for t in (x, y))  # (B, n)
        logits = model(x, positions, ring=distributed)  # (B, n, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / (cfg.batch * cfg.seq_len)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        total = loss.detach().clone()
        if distributed:
            for p in model.parameters():  # every rank saw N/P of the tokens: the full gradient is the sum
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
    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = 0
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
    world = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1

    def log(step, loss):
        if rank == 0 and (step % 5 == 0 or step == cfg.steps - 1):
            print(f"step {step:4d}  loss {loss:.5f}  (log V = {math.log(cfg.vocab):.3f}, {world} process(es))",
                  flush=True)

    losses = train(cfg, distributed=distributed, log=log)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "world_size": world, "losses": losses}, f, indent=1)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
