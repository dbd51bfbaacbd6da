"""One self-contained HTML page of attention, with bertviz's three views and no network: the CSS, the script and the
data are inline; the file opens from disk in any browser (and inside Jupyter, see ``iframe``).

    head view    the tokens twice, queries left and keys right; a line from the selected query to each key, as dark
                 as its weight (hover or click a token)
    heatmap      the selected head's N × N weights, rows are queries, columns keys (hover a row to select it)
    step view    for the selected query i and a key j: q_i and k_j element by element, their products summing to the
                 raw score, then scaled, masked, softmax; the table of every key; y_i = Σ_j a_ij v_j
    model view   every layer × head as a thumbnail (click one to open it)

The page carries each head's q (after rotary positions), k and v (float32, or float64 where float32 would round
them) and its mask as bits, not N × N weights: the script recomputes one head's weights in float64 when it is
selected, the oracle's own steps in the same order, so a 1,024-token text stays a few MB and a head switch stays
quick. Thumbnails are max-pooled weights, 8 bits each.

The page reads its state from the URL fragment — ``page.html#layer=1&head=0&token=3`` — so a link shows one view.
``#selftest`` makes it select every layer and head through its own controls and write what it rendered, with timings,
into ``<pre id="selftest">`` (the tests read it from headless Chromium).
"""

from __future__ import annotations

import base64
import html as _html
import json
import os
from collections.abc import Sequence
from importlib import resources

import numpy as np
import torch

from selfattn.explain.trace import Trace

THUMB = 48  # thumbnail side in cells: longer texts are max-pooled down to it


def _b64(t: torch.Tensor, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype)).tobytes()).decode("ascii")


def _floats(t: torch.Tensor) -> tuple[str, str]:
    """(base64, "f32" or "f64"): float32 when it holds the values exactly (a float32 model's q, k, v), else float64."""
    t = t.detach().double().cpu()
    if torch.equal(t.float().double(), t):
        return _b64(t, "<f4"), "f32"
    return _b64(t, "<f8"), "f64"


def _head(t: Trace, masks: dict) -> dict:
    rot = "Q_rot" in t.names
    q, k, v = t["Q_rot" if rot else "Q"], t["K_rot" if rot else "K"], t["V"]
    N = q.shape[0]
    (qb, qt), (kb, kt), (vb, vt) = _floats(q), _floats(k), _floats(v)
    hidden = torch.isinf(t["masked"])  # (N, N) True where the score is −∞
    mask = -1
    if hidden.any():
        bits = base64.b64encode(np.packbits(~hidden.cpu().numpy(), axis=None, bitorder="little").tobytes()).decode()
        mask = masks.setdefault(bits, len(masks))
    w = t["weights"].to(torch.float32)
    side = min(N, THUMB)
    thumb = torch.nn.functional.adaptive_max_pool2d(w[None, None], side)[0, 0]
    head = {"where": t.where, "scale": t.scale, "causal": t.causal, "d_k": q.shape[-1], "d_v": v.shape[-1],
            "rotary": rot, "q": qb, "k": kb, "v": vb, "types": [qt, kt, vt], "mask": mask,
            "thumb": _b64((thumb * 255).round(), "u1"), "side": side}
    bias = t["scaled"] - t["scores"] * t.scale
    if bias.abs().max().item() > 0:
        head["bias"] = _b64(bias.masked_fill(hidden, 0.0), "<f4")
    return head


def page_data(traces: Sequence[Sequence[Trace]], *, title: str = "", layer: int = 0, head: int = 0) -> dict:
    """The JSON the page embeds, from traces[layer][head] (each a full ``Trace``, all over the same tokens)."""
    if not len(traces) or not all(len(row) for row in traces):
        raise ValueError("page_data needs at least one layer with at least one head of traces")
    first = traces[0][0]
    tokens, masks, layers = first.tokens, {}, []
    for row in traces:
        heads = []
        for t in row:
            if t.tokens != tokens:
                raise ValueError("every trace of one page must be over the same tokens")
            heads.append(_head(t, masks))
        layers.append(heads)
    return {"title": title, "tokens": list(tokens), "token": first.token, "layer": layer, "head": head,
            "masks": list(masks), "layers": layers}


def _asset(name: str) -> str:
    return resources.files("selfattn.explain").joinpath(name).read_text(encoding="utf-8")


def render(traces: Sequence[Sequence[Trace]], *, title: str = "selfattn explain", layer: int = 0,
           head: int = 0) -> str:
    """The page as a string (see ``write``)."""
    data = json.dumps(page_data(traces, title=title, layer=layer, head=head), separators=(",", ":"),
                      ensure_ascii=True)
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # safe inside <script>
    return (_asset("page.html").replace("%%TITLE%%", _html.escape(title)).replace("%%CSS%%", _asset("page.css"))
            .replace("%%JS%%", _asset("page.js")).replace("%%DATA%%", data))


def write(traces: Sequence[Sequence[Trace]], path: str | os.PathLike, *, title: str = "selfattn explain",
          layer: int = 0, head: int = 0) -> str:
    """Write the page for traces[layer][head] to ``path``; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(traces, title=title, layer=layer, head=head))
    return os.fspath(path)


def iframe(traces: Sequence[Sequence[Trace]], *, title: str = "selfattn explain", layer: int = 0, head: int = 0,
           height: int = 900) -> str:
    """The page inside an ``<iframe srcdoc>`` for Jupyter: its script runs in a frame of its own, so two outputs in
    one notebook do not share element ids, and the notebook's styles do not reach it."""
    page = render(traces, title=title, layer=layer, head=head)
    height = int(max(300, min(height, 4000)))
    return (f'<iframe class="selfattn-explain" style="width:100%;height:{height}px;border:1px solid #ddd" '
            f'sandbox="allow-scripts" srcdoc="{_html.escape(page, quote=True)}"></iframe>')
