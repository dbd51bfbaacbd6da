"""Explain Hugging Face transformers models that run on selfattn (``attn_implementation="selfattn"``).

The capture sits at transformers' attention interface: every attention call hands selfattn q (B, H_q, N, D) and
k (B, H_kv, N, D) already rotated by position (RoPE), v (B, H_kv, N, D_v), the mask and the scale. ``HFCapture``
keeps those (detached, in the model's dtype); the model's forward forms no weights. The weights of the layers and
heads you ask for are recomputed afterwards by the float64 oracle (``selfattn.reference.steps``), one head at a time.

    >>> from selfattn import explain
    >>> e = explain.explain_pretrained("path/to/model", "The cat sat on the mat.")     # doctest: +SKIP
    >>> print(e.table()); e.write_html("out/explain.html")                           # doctest: +SKIP

or, with a model and tokenizer you loaded yourself (``import selfattn.integrations.hf`` first)::

    >>> with explain.capture(model) as cap:                                          # doctest: +SKIP
    ...     model(**tokenizer(text, return_tensors="pt"))
    >>> cap.weights(layer=0)            # (B, H_q, N, N) float64
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from selfattn import reference
from selfattn.explain.trace import Capture, Step, Trace, _check_index, _finish, _select
from selfattn.masks import Mask

SWITCH = ("load it with attn_implementation=\"selfattn\" after `import selfattn.integrations.hf` "
          "(AutoModel.from_pretrained(path, attn_implementation=\"selfattn\")), or call "
          "model.set_attn_implementation(\"selfattn\")")


def is_transformers_model(model) -> bool:
    """A transformers model: it has a config that names its attention implementation."""
    return hasattr(getattr(model, "config", None), "_attn_implementation")


@dataclass(frozen=True)
class AttentionCall:
    """One call of the attention interface: q (B, H_q, N_q, D), k (B, H_kv, N_k, D), v (B, H_kv, N_k, D_v), detached,
    as selfattn received them (after rotary positions), and the mask, bias and scale it was given."""

    name: str
    q: Tensor
    k: Tensor
    v: Tensor
    causal: bool
    mask: Mask | Tensor | None
    bias: Tensor | None
    scale: float | None


class HFCapture:
    """Records every attention call of a transformers model running on selfattn while active; recomputes weights and
    traces on demand. Layers are numbered in the order they ran (a model run once: layer l is its l-th layer)."""

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module) or not is_transformers_model(model):
            raise TypeError(f"HFCapture takes a transformers model, got {type(model).__name__}")
        impl = model.config._attn_implementation
        if impl != "selfattn":
            raise ValueError(f"{type(model).__name__} runs its attention with attn_implementation={impl!r}, not on "
                             f"selfattn, so explain cannot capture it: {SWITCH}")
        self.model = model
        self.calls: list[AttentionCall] = []
        self._names = {id(m): n for n, m in model.named_modules()}
        self._active = False

    def __enter__(self) -> HFCapture:
        from selfattn.integrations import hf

        self.calls.clear()
        hf.recorders.append(self._record)
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        from selfattn.integrations import hf

        if self._active:
            hf.recorders.remove(self._record)
            self._active = False

    def _record(self, module, q, k, v, *, causal, mask, bias, scale) -> None:
        if id(module) not in self._names:
            return  # another model running on selfattn at the same time
        self.calls.append(AttentionCall(self._names[id(module)] or type(module).__name__, q.detach(), k.detach(),
                                        v.detach(), bool(causal), mask,
                                        None if bias is None else bias.detach(), scale))

    # ------------------------------------------------------------------------------------------------- reading

    @property
    def n_layers(self) -> int:
        return len(self.calls)

    def layer(self, layer: int) -> AttentionCall:
        if not self.calls:
            raise ValueError("nothing was captured: run the model inside `with capture(model) as cap:`; a model "
                             f"that is not on selfattn calls no selfattn attention ({SWITCH})")
        call = self.calls[_check_index("layer", layer, len(self.calls), "attention layers that ran")]
        if call.q.shape[2] != call.k.shape[2]:
            raise ValueError(f"layer {layer} ({call.name}) ran with a KV cache (N_q={call.q.shape[2]}, "
                             f"N_k={call.k.shape[2]}): run the whole text through the model at once, use_cache=False")
        return call

    def n_heads(self, layer: int = 0) -> int:
        return self.layer(layer).q.shape[1]

    def n_tokens(self) -> int:
        return self.layer(0).q.shape[2]

    def head_inputs(self, layer: int, head: int, batch: int = 0):
        """(q, k, v, mask, bias, scale, causal) of one head of one sequence: q, k, v (1, 1, N, D) and a mask and bias
        re-indexed to batch 0, head 0, ready for ``reference.steps``."""
        call = self.layer(layer)
        B, H_q, N = call.q.shape[:3]
        head = _check_index("head", head, H_q, f"query heads in layer {layer % len(self.calls)}")
        batch = _check_index("batch", batch, B, "sequences in the batch")
        kv = head // (H_q // call.k.shape[1])
        q = call.q[batch:batch + 1, head:head + 1]  # (1, 1, N, D)
        k, v = call.k[batch:batch + 1, kv:kv + 1], call.v[batch:batch + 1, kv:kv + 1]
        mask = call.mask
        if isinstance(mask, Tensor):  # (B or 1, H or 1, N, N) bool
            mask = mask.expand(B, H_q, N, N)[batch:batch + 1, head:head + 1]
        elif mask is not None:
            mask = _select(mask, batch, head)
        bias = call.bias
        if bias is not None:
            bias = bias.expand(B, H_q, N, N)[batch:batch + 1, head:head + 1]
        return q, k, v, mask, bias, call.scale, call.causal

    def weights(self, layer: int, *, batch: int | None = None) -> Tensor:
        """The attention weights of one layer, float64, recomputed by the oracle head by head: (B, H_q, N, N), or
        (H_q, N, N) for one sequence ``batch``."""
        call = self.layer(layer)
        B, H_q = call.q.shape[:2]
        batches = range(B) if batch is None else [_check_index("batch", batch, B, "sequences in the batch")]
        out = torch.stack([torch.stack([self._weights(layer, h, b) for h in range(H_q)]) for b in batches])
        return out if batch is None else out[0]

    def _weights(self, layer: int, head: int, batch: int) -> Tensor:
        q, k, v, mask, bias, scale, causal = self.head_inputs(layer, head, batch)
        with torch.no_grad():
            return reference.steps(q, k, v[..., :0], scale=scale, mask=mask, bias=bias, causal=causal).weights[0, 0]

    def hidden(self, layer: int, head: int, *, batch: int = 0) -> Tensor:
        """(N, N) bool: True where query i may not see key j (its score is −∞)."""
        q, k, _, mask, _, _, causal = self.head_inputs(layer, head, batch)
        N = q.shape[2]
        visible = reference.dense_visible(mask, causal, 1, 1, N, N, q.device)
        return torch.zeros(N, N, dtype=torch.bool) if visible is None else ~visible[0, 0].cpu()

    def trace(self, layer: int, head: int, token: int = -1, *, batch: int = 0,
              tokens: Sequence[str] | None = None) -> Trace:
        """The textbook steps of one head from q, k, v on: the projections ran inside the model."""
        q, k, v, mask, bias, scale, causal = self.head_inputs(layer, head, batch)
        call = self.layer(layer)
        layer, H_q, H_kv = layer % len(self.calls), call.q.shape[1], call.k.shape[1]
        head = head % H_q
        kv = head // (H_q // H_kv)
        Q, K, V = (t[0, 0].to(torch.float64) for t in (q, k, v))  # (N, D), (N, D), (N, D_v)
        named = [Step("Q", f"q_i as {call.name} computed it (x_i·W_Q + b_Q, rotated by position if the model "
                      "uses RoPE)", Q),
                 Step("K", f"k_j as {call.name} computed it" + (f" (key/value head {kv})" if H_q != H_kv else ""), K),
                 Step("V", f"v_j as {call.name} computed it", V)]
        where = f"{call.name} (layer {layer}), head {head}" + (f" (key/value head {kv})" if H_q != H_kv else "")
        with torch.no_grad():
            return _finish(named, Q, K, V, token=token, causal=causal, scale=scale, mask=mask, bias=bias,
                           tokens=tokens, N=Q.shape[0], layer=layer, head=head, where=where)


def capture(model: torch.nn.Module):
    """Context manager recording every ``selfattn.nn.MultiHeadAttention`` call of ``model`` (see ``Capture``), or, for
    a Hugging Face transformers model running with ``attn_implementation="selfattn"``, every call of its attention
    interface (see ``selfattn.explain.pretrained.HFCapture``)."""
    from selfattn.nn import MultiHeadAttention

    if is_transformers_model(model) and not any(isinstance(m, MultiHeadAttention) for m in model.modules()):
        return HFCapture(model)
    return Capture(model)


# ------------------------------------------------------------------------------------------- load a model folder


def load(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local Hugging Face model folder (config, weights, tokenizer), running on selfattn.
    Nothing is downloaded: ``path`` must be a folder on disk."""
    try:
        import transformers
    except ImportError:
        raise ImportError("explaining a Hugging Face model needs transformers: pip install 'selfattn[hf]'") from None
    import selfattn.integrations.hf  # noqa: F401  registers "selfattn" with transformers

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"--model {path!r} is not a folder: give a local Hugging Face model folder (config.json, "
                         "weights, tokenizer), e.g. the one save_pretrained() writes; nothing is downloaded")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} has no config.json: it is not a Hugging Face model folder")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                       "spiece.model")
    if not any(os.path.isfile(os.path.join(path, f)) for f in tokenizer_files):
        raise ValueError(f"{path!r} has no tokenizer (none of {', '.join(tokenizer_files)}): save one next to the "
                         "model with tokenizer.save_pretrained(path), or call explain_model_tokens with your own ids")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load the tokenizer in {path!r}: {e}") from None
    try:
        model = transformers.AutoModel.from_pretrained(path, attn_implementation="selfattn", dtype=dtype,
                                                       local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load the model in {path!r} with attn_implementation='selfattn': {e}") from None
    return model.eval(), tokenizer


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The tokenizer's own pieces as labels; byte-level markers made readable (Ġ → space, Ċ → newline, ▁ → space)."""
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    return [p.replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " ") for p in pieces]


def context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        n = getattr(config, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None

