"""A small decoder-only transformer built on ``selfattn.nn.MultiHeadAttention`` (read it top to bottom).

    tokens (B, T) -> embedding (B, T, d) -> n_layer x Block -> RMSNorm -> tied output head -> logits (B, T, vocab)

    Block:  x = x + Attention(RMSNorm(x))      causal, rotary positions, optional grouped-query heads
            x = x + MLP(RMSNorm(x))            d -> mlp_ratio·d -> GELU -> d

The output head shares its weight with the token embedding (weight tying). There are no learned position
embeddings: rotary positions make a model trained on ``context`` tokens runnable (if not wise) on longer inputs, which
is what lets a KV cache keep generating.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfattn.nn import MultiHeadAttention


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # bytes
    context: int = 64  # the longest sequence seen in training (bytes)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: as many as n_head; fewer: grouped-query attention
    d_model: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    rope_base: float = 10000.0

    def __post_init__(self):
        for name in ("vocab_size", "context", "n_layer", "n_head", "d_model", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        n_kv = self.n_head if self.n_kv_head is None else self.n_kv_head
        if isinstance(n_kv, bool) or not isinstance(n_kv, int) or n_kv < 1 or self.n_head % n_kv:
            raise ValueError(f"GPTConfig: n_head={self.n_head} must be a positive multiple of n_kv_head={n_kv}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"GPTConfig: d_model={self.d_model} must split into n_head={self.n_head} heads of an "
                             f"even size (rotary positions rotate pairs); e.g. d_model={self.n_head * 32}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**d)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.up = nn.Linear(config.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm_attn = nn.RMSNorm(config.d_model)
        self.attn = MultiHeadAttention(config.d_model, config.n_head, n_kv_heads=config.n_kv_head, causal=True,
                                       rotary=True, rope_base=config.rope_base)
        self.norm_mlp = nn.RMSNorm(config.d_model)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        x = x + self.dropout(self.attn(self.norm_attn(x), cache=cache))
        return x + self.mlp(self.norm_mlp(x))


class GPT(nn.Module):
    """>>> model = GPT(GPTConfig(n_layer=2, d_model=64))
    >>> model(torch.randint(256, (2, 10))).shape
    torch.Size([2, 10, 256])
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT takes a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_out = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # residual branches start small (GPT-2): 1/sqrt(2·n_layer)
            if name.endswith(("attn.W_O.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied weight counts once

    def forward(self, tokens: Tensor, targets: Tensor | None = None, *, caches=None):
        """tokens (B, T) int -> logits (B, T, vocab); with ``targets`` (B, T) -> (logits, mean cross-entropy).

        ``caches``: one KV cache per layer (``selfattn.decode.new_caches``); the tokens then continue what the
        caches hold, and the caches are updated.
        """
        _check_tokens(tokens, self.config.vocab_size)
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"got {len(caches)} caches for {len(self.blocks)} layers; make them with "
                             "selfattn.decode.new_caches(model, ...)")
        x = self.embed(tokens)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if caches is None else caches[i])
        logits = self.head(self.norm_out(x))  # (B, T, vocab)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss


def _check_tokens(tokens, vocab_size: int) -> None:
    if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.long, torch.int32):
        raise TypeError(f"tokens must be an int64 tensor (B, T), got {getattr(tokens, 'dtype', type(tokens))}")
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must have shape (B, T) with T >= 1, got {tuple(tokens.shape)}; for one sequence "
                         "use tokens[None]")
