"""selfattn: exact transformer self-attention on PyTorch, with interchangeable backends.

    >>> import torch, selfattn
    >>> q = k = v = torch.randn(1, 8, 128, 64)          # (B, H, N, D)
    >>> out = selfattn.attention(q, k, v, causal=True)  # (B, H, N, D)

See ``selfattn.api`` for the shape legend and the causal alignment, ``selfattn.masks`` for masks,
``selfattn.score_mods`` for score modifiers (soft-capping, ALiBi, relative biases), sinks and dropout.
"""

from selfattn import masks, score_mods
from selfattn.api import attention, attention_weights
from selfattn.backends import BackendError
from selfattn.nn import MultiHeadAttention, SelfAttention
from selfattn.varlen import varlen_attention

__version__ = "0.1.0"
__all__ = ["attention", "attention_weights", "masks", "score_mods", "BackendError", "SelfAttention",
           "MultiHeadAttention", "varlen_attention"]
