"""Trace one attention head in the textbook's order, with every intermediate's shape and values.

    X                  (N, d_model)   the input vectors x_1 … x_N, one row per token
    W_Q, W_K, W_V      (d_model, d_k), (d_model, d_k), (d_model, d_v)
    Q = X·W_Q, K = X·W_K, V = X·W_V                       (rotated by position when the layer uses rotary)
    scores   s_ij = q_i·k_j                               (N_q, N_k)
    scaled   s_ij · scale          scale = 1/√d_k
    masked   −∞ where query i may not see key j            (causal: j > i)
    weights  a_ij = softmax_j(masked_ij)                   each row sums to 1 (0 for a fully masked row)
    Y        y_i = Σ_j a_ij v_j                            (N_q, d_v)

The values from ``scores`` to ``Y`` are the oracle's own (``selfattn.reference.steps``, float64): a trace is the
oracle's computation, cut down to one head and laid out for reading.

Three ways in:

* ``trace_vectors(X, W_Q, W_K, W_V)`` — matrices you give (or ``trace_json(path)`` for the same in a JSON file);
* ``capture(model)`` (``selfattn.explain.capture``, defined in ``pretrained`` so that imports run one way: pretrained →
  trace) — a context manager that hooks every ``selfattn.nn.MultiHeadAttention`` of any model, records
  each layer's input while the model runs on its fast backend (which never forms the weights), and recomputes the
  steps for the layer and head you ask, on demand::

      >>> with capture(model) as cap:
      ...     model(ids)
      >>> t = cap.trace(layer=0, head=1, token=3)
      >>> print(t.table())
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from selfattn import reference
from selfattn.masks import Mask, as_mask


@dataclass(frozen=True)
class Step:
    """One step of the computation: its name, the formula, and its value (float64)."""

    name: str
    formula: str
    value: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)


@dataclass(frozen=True)
class Trace:
    """Every step of one head for all its queries; ``token`` is the query row the tables show.

    ``steps`` are in the textbook's order; look them up by name with ``trace["weights"]`` (names: X, W_Q, W_K, W_V,
    Q, K, V, scores, scaled, masked, weights, Y; plus Q_rot, K_rot when the layer rotates q and k).
    """

    steps: tuple[Step, ...]
    tokens: tuple[str, ...]
    token: int
    scale: float
    causal: bool
    layer: int | None = None
    head: int | None = None
    where: str = ""

    def __getitem__(self, name: str) -> Tensor:
        for s in self.steps:
            if s.name == name:
                return s.value
        raise KeyError(f"no step named {name!r}; steps: {[s.name for s in self.steps]}")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def at(self, token: int) -> Trace:
        """The same trace, showing query row ``token``."""
        _check_index("token", token, len(self.tokens), "a query row of the text")
        return Trace(self.steps, self.tokens, token, self.scale, self.causal, self.layer, self.head, self.where)

    def table(self, width: int = 8) -> str:
        """The steps for query ``token`` as plain-text tables (vectors cut to ``width`` numbers)."""
        return format_table(self, width)


# --------------------------------------------------------------------------------------------------- build a trace


def trace_vectors(
    X,
    W_Q,
    W_K,
    W_V,
    *,
    token: int = -1,
    causal: bool = False,
    scale: float | None = None,
    tokens: Sequence[str] | None = None,
    score_mod=None,
    sink: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> Trace:
    """Trace single-head self-attention on matrices you give: X (N, d_model), W_Q and W_K (d_model, d_k),
    W_V (d_model, d_v). ``token`` picks the query row the tables show (negative counts from the end).
    ``score_mod``, ``sink`` (this head's sink logit) and dropout add their steps (see ``selfattn.score_mods``).

    Examples:
        >>> t = trace_vectors(torch.eye(3), torch.eye(3), torch.eye(3), torch.eye(3), causal=True)
        >>> t["weights"][2]                               # e^(1/√3) for itself, e^0 = 1 for the others
        tensor([0.2645, 0.2645, 0.4711], dtype=torch.float64)
    """
    X, W_Q, W_K, W_V = (_matrix(name, m) for name, m in (("X", X), ("W_Q", W_Q), ("W_K", W_K), ("W_V", W_V)))
    N, d_model = X.shape
    for name, W in (("W_Q", W_Q), ("W_K", W_K), ("W_V", W_V)):
        if W.shape[0] != d_model:
            raise ValueError(f"{name} has shape {tuple(W.shape)} but X has d_model={d_model} columns: {name} must "
                             f"have d_model={d_model} rows (x_i·{name} multiplies a row vector from the left)")
    if W_Q.shape != W_K.shape:
        raise ValueError(f"W_Q {tuple(W_Q.shape)} and W_K {tuple(W_K.shape)} must have the same shape: q_i·k_j "
                         "needs queries and keys of the same length d_k")
    Q, K, V = reference.project(X, W_Q, W_K, W_V)
    named = [Step("X", "the inputs; row i is x_i", X), Step("W_Q", "query projection", W_Q),
             Step("W_K", "key projection", W_K), Step("W_V", "value projection", W_V),
             Step("Q", "q_i = x_i·W_Q", Q), Step("K", "k_j = x_j·W_K", K), Step("V", "v_j = x_j·W_V", V)]
    return _finish(named, Q, K, V, token=token, causal=causal, scale=scale, mask=None, tokens=tokens, N=N,
                   variants=dict(score_mod=score_mod, sink=sink, dropout_p=dropout_p, dropout_seed=dropout_seed))


def _finish(named: list[Step], Q: Tensor, K: Tensor, V: Tensor, *, token, causal, scale, mask, tokens, N,
            layer=None, head=None, where="", bias=None, variants=None) -> Trace:
    """Add the oracle's steps from the scores to Y for one head's Q (N_q, d_k), K (N_k, d_k), V (N_k, d_v)."""
    tokens = _labels(tokens, N)
    token = _check_index("token", token, N, "a query row of the text")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    d_k = Q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(d_k)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}; leave it out for 1/√d_k = "
                         f"{1 / math.sqrt(d_k):.4g}")
    v = variants or {}
    sink = v.get("sink")
    sinks = None if sink is None else torch.tensor([float(sink)], dtype=torch.float64)
    s = reference.steps(Q[None, None], K[None, None], V[None, None], scale=float(scale), mask=mask, causal=causal,
                        score_mod=v.get("score_mod"), sinks=sinks, dropout_p=v.get("dropout_p", 0.0),
                        dropout_seed=v.get("dropout_seed", 0), bias=bias)
    named += [Step("scores", "s_ij = q_i·k_j", s.scores[0, 0]),
              Step("scaled", f"s_ij · {_scale_text(scale, d_k)}", (s.scores * scale)[0, 0])]
    if s.modified is not None:
        name = getattr(v["score_mod"], "name", "score_mod")
        named.append(Step("modified", f"{name}(s_ij, i, j)", s.modified[0, 0]))
    if bias is not None:
        named.append(Step("biased", "+ bias_ij", s.scaled[0, 0]))
    named.append(Step("masked", "−∞ where query i may not see key j" + (" (j > i)" if causal else ""),
                      s.masked[0, 0]))
    if sinks is None:
        named.append(Step("weights", "a_ij = exp(s_ij) / Σ_j' exp(s_ij')", s.weights[0, 0]))
    else:
        named += [Step("weights", f"a_ij = exp(s_ij) / (exp(sink) + Σ_j' exp(s_ij')), sink = {float(sink):.4g}",
                       s.weights[0, 0]),
                  Step("sink share", "exp(sink) / (exp(sink) + Σ_j' exp(s_ij')): the weight no value receives",
                       s.sink_weight[0, 0])]
    if s.dropped is not None:
        p = v["dropout_p"]
        named.append(Step("dropout", f"a_ij · keep_ij / (1 − {p:g}), keep from a hash of (seed, i, j)",
                          s.dropped[0, 0]))
    named.append(Step("Y", "y_i = Σ_j a_ij v_j", s.out[0, 0]))
    return Trace(tuple(named), tokens, token, float(scale), causal, layer, head, where)


def _scale_text(scale: float, d_k: int) -> str:
    return f"1/√{d_k}" if math.isclose(scale, 1 / math.sqrt(d_k), rel_tol=1e-12) else f"{scale:.4g}"


# ---------------------------------------------------------------------------------------------------- JSON input

JSON_KEYS = {"X": "required", "W_Q": "required", "W_K": "required", "W_V": "required",
             "tokens": "optional list of N labels", "causal": "optional bool (default false)",
             "scale": "optional number (default 1/sqrt(d_k))", "token": "optional query row (default the last)"}

JSON_EXAMPLE = """{"tokens": ["the", "cat", "sat"],
 "X":   [[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]],
 "W_Q": [[1, 0], [0, 1], [2, 0], [0, 1]],
 "W_K": [[1, 0], [0, 1], [1, 0], [0, 0]],
 "W_V": [[1, 0], [0, 1], [1, 1], [0, 0]],
 "causal": true}"""


def trace_json(source, *, token: int | None = None) -> Trace:
    """Trace the matrices of a JSON file (a path) or an already parsed dict. Keys: X (N × d_model), W_Q, W_K
    (d_model × d_k), W_V (d_model × d_v), and optionally tokens, causal, scale, token (the query row to show).
    ``JSON_EXAMPLE`` is a small complete file. A malformed file or wrong shapes raise ValueError saying what is wrong
    and where.
    """
    spec = load_json(source)
    return trace_vectors(spec["X"], spec["W_Q"], spec["W_K"], spec["W_V"], causal=spec.get("causal", False),
                         scale=spec.get("scale"), tokens=spec.get("tokens"),
                         token=spec.get("token", -1) if token is None else token)


def load_json(source) -> dict:
    """Read and validate the JSON input of ``trace_json``; returns the dict (matrices still as lists)."""
    where = "the JSON input"
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read {where}: {e.strerror}") from None
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
                             f"Expected an object like:\n{JSON_EXAMPLE}") from None
    else:
        spec = source
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must hold a JSON object with keys {sorted(JSON_KEYS)}, got a "
                         f"{type(spec).__name__}. Example:\n{JSON_EXAMPLE}")
    unknown = sorted(set(spec) - set(JSON_KEYS))
    missing = [k for k, v in JSON_KEYS.items() if v == "required" and k not in spec]
    if unknown or missing:
        raise ValueError(f"{where}: " + "; ".join(
            ([f"missing keys {missing}"] if missing else []) + ([f"unknown keys {unknown}"] if unknown else []))
            + "; the keys are " + ", ".join(f"{k} ({v})" for k, v in JSON_KEYS.items()))
    for name in ("X", "W_Q", "W_K", "W_V"):
        _matrix(f"{name} in {where}", spec[name])
    if "causal" in spec and not isinstance(spec["causal"], bool):
        raise ValueError(f"{where}: causal must be true or false, got {spec['causal']!r}")
    if "tokens" in spec and (not isinstance(spec["tokens"], list)
                             or not all(isinstance(t, str) for t in spec["tokens"])):
        raise ValueError(f"{where}: tokens must be a list of strings, one per row of X, got {spec['tokens']!r}")
    if "token" in spec and (isinstance(spec["token"], bool) or not isinstance(spec["token"], int)):
        raise ValueError(f"{where}: token must be an integer row of X, got {spec['token']!r}")
    return spec


def _matrix(name: str, m) -> Tensor:
    """A 2-D float64 tensor from a tensor or nested lists; the error says which row is wrong."""
    if isinstance(m, Tensor):
        t = m.detach().to(torch.float64)
    else:
        if not isinstance(m, (list, tuple)) or not m or not all(isinstance(r, (list, tuple)) for r in m):
            raise ValueError(f"{name} must be a non-empty matrix (a list of rows, each a list of numbers), "
                             f"got {_short(m)}")
        widths = [len(r) for r in m]
        if len(set(widths)) != 1 or widths[0] == 0:
            bad = next((i for i, w in enumerate(widths) if w != widths[0]), 0)
            raise ValueError(f"{name} must be rectangular and non-empty: row 0 has {widths[0]} numbers but row {bad}"
                             f" has {widths[bad]}")
        for i, r in enumerate(m):
            for j, x in enumerate(r):
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    raise ValueError(f"{name}[{i}][{j}] must be a number, got {x!r}")
        t = torch.tensor(m, dtype=torch.float64)
    if t.dim() != 2 or 0 in t.shape:
        raise ValueError(f"{name} must be a non-empty 2-D matrix, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must hold finite numbers; it has {int((~torch.isfinite(t)).sum())} inf/NaN")
    return t


def _short(x) -> str:
    s = repr(x)
    return s if len(s) < 60 else s[:57] + "..."


def _labels(tokens, N: int) -> tuple[str, ...]:
    if tokens is None:
        return tuple(str(i) for i in range(N))
    tokens = tuple(str(t) for t in tokens)
    if len(tokens) != N:
        raise ValueError(f"got {len(tokens)} token labels for N={N} rows of X; give one label per row")
    return tokens


def _check_index(what: str, i, n: int, meaning: str) -> int:
    if isinstance(i, bool) or not isinstance(i, int):
        raise TypeError(f"{what} must be an int, got {i!r}")
    if not -n <= i < n:
        raise ValueError(f"{what}={i} is out of range: there are {n} ({meaning}); use 0..{n - 1} "
                         f"(or -1 for the last)")
    return i % n


# ------------------------------------------------------------------------------------------ capture from a model


@dataclass(frozen=True)
class LayerCall:
    """One recorded call of a ``MultiHeadAttention``: the module, its name in the model, and its inputs."""

    name: str
    module: torch.nn.Module
    x: Tensor  # (B, N, d_model), detached
    mask: Mask | Tensor | None
    positions: Tensor | None
    cached: bool


class Capture:
    """Records the inputs of every ``MultiHeadAttention`` call while active; recomputes weights and traces on demand.

    Layers are numbered in the order they ran. Nothing is computed while the model runs: the fast path stays fast.
    """

    def __init__(self, model: torch.nn.Module):
        from selfattn.nn import MultiHeadAttention

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"capture() takes a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.calls: list[LayerCall] = []
        self._names = {m: n for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)}
        if not self._names:
            raise ValueError(f"{type(model).__name__} contains no selfattn.nn.MultiHeadAttention: explain can only "
                             "trace models whose attention layers are selfattn.nn.MultiHeadAttention")
        self._handles: list = []

    def __enter__(self) -> Capture:
        self.calls.clear()
        for module in self._names:
            self._handles.append(module.register_forward_pre_hook(self._record, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _record(self, module, args, kwargs) -> None:
        x = args[0] if args else kwargs.get("x")
        self.calls.append(LayerCall(self._names[module], module, x.detach(), kwargs.get("mask"),
                                    kwargs.get("positions"), kwargs.get("cache") is not None))

    @property
    def n_layers(self) -> int:
        return len(self.calls)

    def layer(self, layer: int) -> LayerCall:
        if not self.calls:
            raise ValueError("nothing was captured: run the model inside `with capture(model) as cap:`")
        i = _check_index("layer", layer, len(self.calls), "attention layers that ran")
        call = self.calls[i]
        if call.cached:
            raise ValueError(f"layer {i} ({call.name}) ran with a KV cache; explain recomputes attention from a "
                             "layer's whole input, so run the full text through the model without a cache")
        return call

    def n_heads(self, layer: int = 0) -> int:
        return self.layer(layer).module.n_heads

    def weights(self, layer: int) -> Tensor:
        """The attention weights of one layer, (B, H_q, N, N), float64, recomputed by the oracle."""
        call = self.layer(layer)
        with torch.no_grad():
            q, k, _ = call.module.project(call.x, call.positions)  # (B, H_q, N, D), (B, H_kv, N, D)
            return reference.steps(q, k, k[..., :0], causal=call.module.causal, mask=_as_mask(call.mask)).weights

    def all_weights(self, batch: int = 0) -> Tensor:
        """(L, H, N, N) float64 for one sequence of the batch; every layer must have the same number of heads."""
        ws = [self.weights(i)[batch] for i in range(self.n_layers)]
        if len({w.shape for w in ws}) != 1:
            raise ValueError(f"layers have different shapes {[tuple(w.shape) for w in ws]}; use weights(layer)")
        return torch.stack(ws)

    def trace(self, layer: int, head: int, token: int = -1, *, batch: int = 0,
              tokens: Sequence[str] | None = None) -> Trace:
        """The textbook steps of one head of one layer, for one sequence of the batch."""
        call = self.layer(layer)
        layer = layer % len(self.calls)
        m = call.module
        B, N, _ = call.x.shape
        head = _check_index("head", head, m.n_heads, f"heads in layer {layer}")
        batch = _check_index("batch", batch, B, "sequences in the batch")
        D, group = m.d_head, m.n_heads // m.n_kv_heads
        kv = head // group
        X = call.x[batch].to(torch.float64)  # (N, d_model)
        with torch.no_grad():
            W = {}
            for name, lin, h in (("Q", m.W_Q, head), ("K", m.W_K, kv), ("V", m.W_V, kv)):
                rows = slice(h * D, (h + 1) * D)  # nn.Linear keeps W as (out, in): the head's rows, transposed
                W[name] = (lin.weight[rows].T.to(torch.float64),
                           None if lin.bias is None else lin.bias[rows].to(torch.float64))
            Q, K, V = reference.project(X, W["Q"][0], W["K"][0], W["V"][0])  # (N, D) each
            Q, K, V = (t if W[n][1] is None else t + W[n][1] for n, t in (("Q", Q), ("K", K), ("V", V)))
            b = " + b_Q" if W["Q"][1] is not None else ""
            named = [Step("X", f"input of {call.name}; row i is x_i", X),
                     Step("W_Q", f"rows {head * D}:{(head + 1) * D} of {call.name}.W_Q, transposed", W["Q"][0]),
                     Step("W_K", f"key/value head {kv} of {call.name}.W_K", W["K"][0]),
                     Step("W_V", f"key/value head {kv} of {call.name}.W_V", W["V"][0]),
                     Step("Q", f"q_i = x_i·W_Q{b}", Q), Step("K", f"k_j = x_j·W_K{b.replace('Q', 'K')}", K),
                     Step("V", f"v_j = x_j·W_V{b.replace('Q', 'V')}", V)]
            if m.rotary is not None:
                pos = torch.arange(N, device=X.device) if call.positions is None else call.positions
                pos = pos[batch] if pos.dim() == 2 else pos  # (N,): this sequence's positions
                Q = m.rotary(Q[None, None], pos)[0, 0]
                K = m.rotary(K[None, None], pos)[0, 0]
                named += [Step("Q_rot", "q_i rotated by position i (rotary)", Q),
                          Step("K_rot", "k_j rotated by position j (rotary)", K)]
        mask = _as_mask(call.mask)
        if isinstance(mask, Tensor):
            mask = mask.expand(B, m.n_heads, N, N)[batch:batch + 1, head:head + 1]
        elif mask is not None:
            mask = _select(mask, batch, head)
        where = f"{call.name} (layer {layer}), head {head}" + (f" (key/value head {kv})" if group > 1 else "")
        return _finish(named, Q, K, V, token=token, causal=m.causal, scale=None, mask=mask, tokens=tokens, N=N,
                       layer=layer, head=head, where=where)


def _as_mask(mask):
    return mask if mask is None or isinstance(mask, Tensor) else as_mask(mask)


def _select(mask: Mask, batch: int, head: int) -> Mask:
    """The mask seen by one (batch, head) pair, re-indexed so that batch and head are 0."""
    return Mask(lambda b, h, q, k: mask.mask_mod(b + batch, h + head, q, k), mask.name)


# ---------------------------------------------------------------------------------------------- terminal tables


def format_table(t: Trace, width: int = 8) -> str:
    i = t.token
    d_k, d_v = t["Q"].shape[-1], t["V"].shape[-1]
    head = f"{t.where}: " if t.where else ""
    lines = [f"{head}query token {i} {t.tokens[i]!r}; d_k={d_k}, d_v={d_v}, scale={t.scale:.4g}"
             f"{', causal' if t.causal else ''}", ""]
    lines.append(f"{'step':<10} {'shape':<14} {'formula':<44} values (row {i}, first {width})")
    for s in t.steps:
        if s.name in ("scores", "scaled", "masked", "weights", "Y"):
            continue
        v = s.value
        if s.name.startswith("W_"):
            row = "(matrix)"
        else:
            row = _vec(v[i], width)
        lines.append(f"{s.name:<10} {str(s.shape):<14} {s.formula:<44} {row}")
    lines += ["", f"scores of query {i} {t.tokens[i]!r} against every key j (the rows of the heatmaps):"]
    lines.append(f"{'j':>4} {'key':<12} {'q_i·k_j':>10} {'× scale':>10} {'masked':>10} {'softmax':>9}")
    cols = [t["scores"][i], t["scaled"][i], t["masked"][i], t["weights"][i]]
    for j in range(len(t.tokens)):
        lines.append(f"{j:>4} {_label(t.tokens[j]):<12} {cols[0][j].item():>10.4f} {cols[1][j].item():>10.4f} "
                     f"{cols[2][j].item():>10.4f} {cols[3][j].item():>9.4f}")
    total = t["weights"][i].sum().item()
    lines.append(f"{'':>4} {'':<12} {'':>10} {'':>10} {'sum':>10} {total:>9.4f}")
    lines += ["", f"y_{i} = Σ_j a_{i}j v_j = {_vec(t['Y'][i], width)}"]
    return "\n".join(lines)


def _vec(v: Tensor, width: int) -> str:
    vals = ", ".join(f"{x:.3f}" for x in v[:width].tolist())
    return f"[{vals}{', …' if v.numel() > width else ''}]"


def _label(token: str) -> str:
    r = repr(token)
    return r if len(r) <= 12 else r[:11] + "…"
