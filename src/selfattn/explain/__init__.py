"""See the computation: trace the textbook steps of attention, draw the weights, write an offline HTML page.

    trace.py    the steps of one head (X, W_Q/W_K/W_V, Q/K/V, scores, scaled, masked, weights, Y) from matrices you
                give, a JSON file, or any model built on ``selfattn.nn.MultiHeadAttention`` (``capture``)
    plots.py    heatmap PNGs per head and a layers × heads grid (matplotlib, imported only there)
    html.py     one self-contained page: hover a token to see where it attends, pick layer and head, read the trace
    pretrained.py  Hugging Face transformers models on selfattn: capture q, k, v at the attention interface, load a
                local model folder and its tokenizer
    lessons.py  why 1/√d_k; why an orthogonal x_j still gets weight; the steps in order; why W_Q, W_K, W_V

From Python::

    >>> from selfattn import explain
    >>> e = explain.explain_text("The cat sat on the mat.")      # the tiny GPT, random weights
    >>> print(e.table())                                          # the steps for one token
    >>> e.write_pngs("out"); e.write_html("out/explain.html")

or any model of yours: ``explain.explain_model(model, inputs, tokens)``; a Hugging Face model folder:
``explain.explain_pretrained(path, text)``. From the shell: ``selfattn explain [--model PATH]``. In Jupyter an
``Explanation`` displays as the same page as ``write_html`` writes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from selfattn.explain.pretrained import capture
from selfattn.explain.pretrained import load as load_pretrained
from selfattn.explain.trace import Capture, Step, Trace, load_json, trace_json, trace_vectors

__all__ = ["Capture", "Step", "Trace", "Explanation", "TraceGrid", "capture", "load_json", "trace_json",
           "trace_vectors", "explain_model", "explain_text", "explain_hf", "explain_pretrained", "load_pretrained",
           "token_labels", "DEFAULT_TEXT"]

DEFAULT_TEXT = "The cat sat on the mat because it was warm."


@dataclass(frozen=True)
class Explanation:
    """Every head of every layer traced over one text; ``layer``, ``head``, ``token`` pick what the table shows."""

    tokens: tuple[str, ...]
    traces: Sequence[Sequence[Trace]]  # [layer][head]: a tuple of tuples, or a TraceGrid computing them on demand
    layer: int = 0
    head: int = 0
    title: str = ""

    @property
    def trace(self) -> Trace:
        return self.traces[self.layer][self.head]

    @property
    def weights(self) -> torch.Tensor:
        """(L, H, N, N) float64: the softmax weights of every layer and head (queries are rows)."""
        if isinstance(self.traces, TraceGrid):
            return self.traces.weights()
        return torch.stack([torch.stack([t["weights"] for t in row]) for row in self.traces])

    def _hidden(self) -> torch.Tensor:
        """(L, H, N, N) bool: True where the score is −∞ (masked)."""
        if isinstance(self.traces, TraceGrid):
            return self.traces.hidden()
        return torch.stack([torch.stack([torch.isinf(t["masked"]) for t in row]) for row in self.traces])

    def table(self, width: int = 8) -> str:
        return self.trace.table(width)

    def write_pngs(self, out_dir: str | os.PathLike) -> list[str]:
        """``layer{l}_head{h}.png`` per head and ``grid.png`` in out_dir; needs matplotlib."""
        from selfattn.explain import plots

        weights = self.traces.weights(torch.float32) if isinstance(self.traces, TraceGrid) else self.weights
        return plots.save_all(weights, self.tokens, out_dir, title=self.title, hidden=self._hidden())

    def write_html(self, path: str | os.PathLike) -> str:
        from selfattn.explain import html

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return html.write(self.traces, path, title=self.title or "selfattn explain", layer=self.layer, head=self.head)

    def _repr_html_(self) -> str:
        """Jupyter: the same page, in an iframe of its own (its script and ids stay apart from the notebook's)."""
        from selfattn.explain import html

        return html.iframe(self.traces, title=self.title or "selfattn explain", layer=self.layer, head=self.head)


class TraceGrid(Sequence):
    """``traces[layer][head]`` of a capture, computed when read (a few kept): a long text's N × N steps for every head
    of every layer would not fit in memory at once."""

    def __init__(self, cap, tokens: Sequence[str], token: int = -1, batch: int = 0):
        self.cap, self.tokens, self.token, self.batch = cap, tuple(tokens), token, batch
        self._trace = lru_cache(maxsize=4)(self._compute)

    def _compute(self, layer: int, head: int) -> Trace:
        return self.cap.trace(layer, head, self.token, batch=self.batch, tokens=self.tokens)

    def __len__(self) -> int:
        return self.cap.n_layers

    def __getitem__(self, layer):
        if isinstance(layer, slice):
            return [self[i] for i in range(len(self))[layer]]
        layer = range(len(self))[layer]
        return _LazyRow(self, layer, self.cap.n_heads(layer))

    def weights(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(L, H, N, N), straight from the capture (no trace formed), filled head by head: the oracle computes each
        in float64, ``dtype`` is what is kept (float32 halves the memory for pictures)."""
        return self._fill(lambda li, h: self.cap._weights(li, h, self.batch), dtype)

    def hidden(self) -> torch.Tensor:
        """(L, H, N, N) bool: True where the score is −∞."""
        return self._fill(lambda li, h: self.cap.hidden(li, h, batch=self.batch), torch.bool)

    def _fill(self, head_fn, dtype) -> torch.Tensor:
        L, N = len(self), len(self.tokens)
        H = {self.cap.n_heads(li) for li in range(L)}
        if len(H) != 1:
            raise ValueError(f"layers have different numbers of heads {sorted(H)}; read traces[layer][head] instead")
        out = torch.empty(L, H.pop(), N, N, dtype=dtype)
        for li in range(L):
            for h in range(out.shape[1]):
                out[li, h] = head_fn(li, h)
        return out


class _LazyRow(Sequence):
    def __init__(self, grid: TraceGrid, layer: int, n: int):
        self.grid, self.layer, self.n = grid, layer, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, head):
        if isinstance(head, slice):
            return [self[i] for i in range(self.n)[head]]
        return self.grid._trace(self.layer, range(self.n)[head])


def explain_model(model: torch.nn.Module, inputs, tokens: Sequence[str], *, layer: int = 0, head: int = 0,
                  token: int = -1, batch: int = 0, **kwargs) -> Explanation:
    """Run ``model(inputs, **kwargs)`` once with its ``MultiHeadAttention`` layers hooked, then trace every head.

    The model runs on whatever backend it uses; the weights are recomputed afterwards by the oracle from each layer's
    recorded input. ``tokens`` labels the positions of sequence ``batch``.
    """
    tokens = tuple(tokens)
    was_training = model.training
    model.eval()
    try:
        with capture(model) as cap, torch.no_grad():
            model(inputs, **kwargs)
    finally:
        model.train(was_training)
    if cap.n_layers == 0:
        raise ValueError(f"{type(model).__name__} ran without calling any of its MultiHeadAttention layers")
    cap.trace(layer, head, token, batch=batch, tokens=tokens)  # validates layer, head, token first
    traces = tuple(tuple(cap.trace(li, h, token, batch=batch, tokens=tokens) for h in range(cap.n_heads(li)))
                   for li in range(cap.n_layers))
    return Explanation(tokens, traces, layer % cap.n_layers, head % cap.n_heads(layer), title=type(model).__name__)


def explain_hf(model: torch.nn.Module, tokenizer, text: str, *, layer: int = 0, head: int = 0, token: int = -1,
               title: str = "") -> Explanation:
    """Explain a Hugging Face transformers model running with ``attn_implementation="selfattn"`` on ``text``: one
    forward pass with its attention calls recorded, tokens labelled with the tokenizer's pieces; the weights and steps
    are recomputed by the float64 oracle when read."""
    from selfattn.explain import pretrained

    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("the text is empty: give at least one word to explain")
    cap = capture(model)  # refuses a model that is not on selfattn, with the fix
    ids = tokenizer(text, return_tensors="pt")["input_ids"]  # (1, N)
    n, context = ids.shape[1], pretrained.context_length(model.config)
    if context is not None and n > context:
        raise ValueError(f"the text is {n} tokens long but the model's context is {context} tokens; give a shorter "
                         "text")
    was_training = model.training
    model.eval()
    try:
        with cap, torch.no_grad():
            model(input_ids=ids.to(model.device))
    finally:
        model.train(was_training)
    tokens = pretrained.token_pieces(tokenizer, ids[0].tolist())
    grid = TraceGrid(cap, tokens, token)
    cap.trace(layer, head, token, tokens=tokens)  # validates layer, head, token
    name = getattr(model.config, "_name_or_path", "") or ""
    title = title or f"{type(model).__name__}" + (f" ({os.path.basename(os.path.normpath(name))})" if name else "")
    return Explanation(grid.tokens, grid, layer % cap.n_layers, head % cap.n_heads(layer), title=title)


def explain_pretrained(path: str | os.PathLike, text: str, *, layer: int = 0, head: int = 0,
                       token: int = -1) -> Explanation:
    """``explain_hf`` on the model and tokenizer of a local Hugging Face model folder (nothing is downloaded)."""
    from selfattn.explain import pretrained

    model, tokenizer = pretrained.load(path)
    return explain_hf(model, tokenizer, text, layer=layer, head=head, token=token)


def token_labels(ids: Sequence[int]) -> list[str]:
    """Byte-level tokens as text: printable ASCII as itself, other bytes as \\xNN."""
    return [chr(b) if 32 <= b < 127 or b in (9, 10) else f"\\x{b:02x}" for b in ids]


def explain_text(text: str = DEFAULT_TEXT, *, checkpoint: str | os.PathLike | None = None, layer: int = 0,
                 head: int = 0, token: int = -1, seed: int = 0) -> Explanation:
    """Explain the tiny byte-level GPT (``selfattn.model``) on ``text``: a checkpoint from ``selfattn train``, or
    random weights of the default ``GPTConfig`` (seeded) when ``checkpoint`` is None."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError("the text is empty: give at least one character to explain, e.g. "
                         f"selfattn explain {DEFAULT_TEXT!r}")
    model, config = load_model(checkpoint, seed=seed)
    from selfattn.model.data import encode

    ids = encode(text)  # (T,) bytes
    if ids.numel() > config.context:
        raise ValueError(f"the text is {ids.numel()} bytes long but the model's context is {config.context} tokens; "
                         "give a shorter text")
    ids = ids.to(next(model.parameters()).device)
    what = f"checkpoint {os.fspath(checkpoint)}" if checkpoint is not None else "random weights (no checkpoint)"
    e = explain_model(model, ids[None], token_labels(ids.tolist()), layer=layer, head=head, token=token)
    return Explanation(e.tokens, e.traces, e.layer, e.head, title=f"GPT, {what}")


def load_model(checkpoint=None, *, seed: int = 0):
    """(model, config): from a ``selfattn train`` checkpoint, or the default GPTConfig with seeded random weights."""
    try:
        from selfattn.model.gpt import GPT, GPTConfig
    except ImportError as e:
        raise ImportError(f"explain_text needs selfattn.model (the tiny GPT): {e}") from None
    if checkpoint is not None:
        if not os.path.exists(checkpoint):
            raise ValueError(f"checkpoint {os.fspath(checkpoint)!r} does not exist; train one with `selfattn train` "
                             "or leave --checkpoint out for random weights")
        from selfattn.model.train import load_checkpoint

        model, config = load_checkpoint(checkpoint)
    else:
        config = GPTConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GPT(config)
    return model.eval(), config
