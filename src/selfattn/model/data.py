"""Bytes in, bytes out: the tokenizer is UTF-8 itself (vocabulary of 256), and the default corpus is the
documentation text that ships inside every CPython (``pydoc_data.topics``, about 465 KB of English), so nothing is
downloaded. Any UTF-8 text file can be used instead. The last ``held_out`` fraction of the bytes is the validation
split (a contiguous tail, so no training window overlaps it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

VOCAB_SIZE = 256  # one token per byte value
HELD_OUT = 0.1


def encode(text: str) -> Tensor:
    """str -> int64 tensor of UTF-8 byte values (N,)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens) -> str:
    """Byte values -> str; bytes that do not form valid UTF-8 (a sample cut mid-character) become U+FFFD."""
    if isinstance(tokens, Tensor):
        tokens = tokens.tolist()
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def default_corpus() -> str:
    """CPython's pydoc topics (the text ``help('assert')`` shows), joined in their stored order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def load_text(path: str | os.PathLike | None = None) -> str:
    """The text of ``path`` (UTF-8), or the embedded default corpus when ``path`` is None."""
    if path is None:
        return default_corpus()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path!r}: no such file; give a UTF-8 text file, or leave --data out to "
                                "train on the embedded Python documentation")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path!r} is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); convert it "
                         "first, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`") from None


@dataclass(frozen=True)
class Splits:
    train: Tensor  # (N_train,) int64 bytes
    val: Tensor  # (N_val,)
    source: str

    def batch(self, split: str, batch_size: int, context: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows: x (B, T) and the next-byte targets y (B, T)."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(len(data) - context, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(context + 1)  # (B, T + 1)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]


def load_splits(path: str | os.PathLike | None = None, *, held_out: float = HELD_OUT, context: int = 1) -> Splits:
    """Tokenise the corpus and cut off the last ``held_out`` fraction for validation; both parts must hold more
    than ``context`` bytes."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    data = encode(load_text(path))
    n_val = int(len(data) * held_out)
    train, val = data[: len(data) - n_val], data[len(data) - n_val:]
    name = "the embedded Python documentation (pydoc_data.topics)" if path is None else os.fspath(path)
    for split, part in (("training", train), ("held-out", val)):
        if len(part) <= context:
            raise ValueError(f"{name}: the {split} split has {len(part)} bytes, not more than the context of "
                             f"{context}; use a shorter --context (at most {len(part) - 1}) or a larger file "
                             f"(it needs more than {int((context + 1) / min(held_out, 1 - held_out)) + 1} bytes)")
    return Splits(train, val, name)
