"""A tiny GPT on selfattn: ``gpt`` (the model), ``data`` (bytes and the embedded corpus), ``train``, ``generate``."""

from selfattn.model.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
