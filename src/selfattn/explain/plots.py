"""Heatmaps of attention weights (PNG, matplotlib — imported only here, only when a picture is asked for).

Every map has the queries as rows and the keys as columns, both labelled with the tokens, and says so in its title.
Figures are built with matplotlib's object API (no pyplot): nothing global changes and no window opens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import Tensor

ROWS_COLS = "rows: queries, columns: keys"
MASKED_GREY = "#d9d9d9"
MAX_LABELS = 48  # more tokens than this and the tick labels would overlap: label every k-th token
GRID_CELLS = 128  # the grid draws at most this many rows and columns per map


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the PNG heatmaps need matplotlib: pip install 'selfattn[viz]' (or pip install "
                          "matplotlib), or ask for the HTML page and the tables only") from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def display_token(token: str) -> str:
    """A token as a tick label: spaces and control characters made visible."""
    return "".join({" ": "␣", "\n": "⏎", "\t": "⇥"}.get(c, c if c.isprintable() else "·") for c in token) or "∅"


def _ticks(ax, tokens: Sequence[str], n_q: int, n_k: int, fontsize: float) -> None:
    labels = [display_token(t) for t in tokens]
    step = max(1, -(-len(labels) // MAX_LABELS))
    kq = list(range(0, n_q, step))
    kk = list(range(0, n_k, step))
    q_labels, k_labels = labels[len(labels) - n_q:], labels[:n_k]
    ax.set_yticks(kq, [q_labels[i] for i in kq], fontsize=fontsize)
    ax.set_xticks(kk, [k_labels[i] for i in kk], fontsize=fontsize, rotation=90)


def _check_weights(w: Tensor, dims: int, what: str) -> None:
    if not isinstance(w, Tensor) or w.dim() != dims:
        raise ValueError(f"{what} expects a {dims}-D tensor of weights, got "
                         f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")


def heatmap(weights: Tensor, tokens: Sequence[str], path: str | os.PathLike, *, title: str = "",
            hidden: Tensor | None = None) -> str:
    """Write one head's weights (N_q, N_k) as a PNG heatmap; ``hidden`` (bool, True = masked) draws grey cells."""
    _check_weights(weights, 2, "heatmap")
    return _heatmaps([weights], tokens, [path], [title], None if hidden is None else [hidden])[0]


def _masked(w: Tensor, hidden: Tensor | None):
    """The weights as a numpy masked array: masked cells (score −∞) are drawn grey, not as weight 0."""
    import numpy as np

    w = w.detach().double().cpu().numpy()
    return np.ma.masked_array(w, mask=None if hidden is None else hidden.detach().cpu().numpy())


def _cmap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad=MASKED_GREY)


def _heatmaps(weights: Sequence[Tensor], tokens: Sequence[str], paths: Sequence, titles: Sequence[str],
              hidden: Sequence[Tensor] | None = None) -> list[str]:
    """Draw several same-shaped heatmaps on one reused figure (laying out a figure costs more than drawing it)."""
    hidden = [None] * len(weights) if hidden is None else hidden
    n_q, n_k = weights[0].shape
    size = min(9.0, 3.0 + 0.14 * max(n_q, n_k))
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot()
    im = ax.imshow(_masked(weights[0], hidden[0]), cmap=_cmap(), vmin=0.0, vmax=1.0, interpolation="nearest")
    _ticks(ax, tokens, n_q, n_k, fontsize=8 if max(n_q, n_k) <= 48 else 6)
    ax.set_ylabel("query (the token that looks)")
    ax.set_xlabel("key (the token looked at)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="softmax weight")
    out, background = [], None
    for w, hid, path, title in zip(weights, hidden, paths, titles, strict=True):
        im.set_data(_masked(w, hid))
        what = f"attention weights — {ROWS_COLS}" + ("" if hid is None else "; grey: masked")
        ax.set_title(f"{title}\n{what}" if title else what, fontsize=10)
        if background is None:
            fig.savefig(path)
            fig.set_layout_engine("none")  # the layout of the first picture holds for the rest: freeze it
            background = _background(fig, [im, ax.title])
        else:  # only the image and the title change: draw those over the frame drawn once (ticks, labels, colour bar)
            canvas = fig.canvas
            canvas.restore_region(background)
            for artist in (im, *ax.spines.values(), ax.title):
                ax.draw_artist(artist)
            _save_rgba(canvas, path)
        out.append(os.fspath(path))
    return out


def _background(fig, changing):
    """The figure drawn without the artists that change from picture to picture."""
    for a in changing:
        a.set_visible(False)
    fig.canvas.draw()
    background = fig.canvas.copy_from_bbox(fig.bbox)
    for a in changing:
        a.set_visible(True)
    return background


def _save_rgba(canvas, path) -> None:
    from PIL import Image

    width, height = canvas.get_width_height()
    Image.frombuffer("RGBA", (width, height), bytes(canvas.buffer_rgba()), "raw", "RGBA", 0, 1).save(
        path, compress_level=1)  # zlib's fastest level: heatmaps compress well anyway


def grid(weights: Tensor, tokens: Sequence[str], path: str | os.PathLike, *, title: str = "",
         hidden: Tensor | None = None) -> str:
    """Write the weights of every layer and head (L, H, N_q, N_k) as one PNG grid, layers down, heads across."""
    _check_weights(weights, 4, "grid")
    L, H, n_q, n_k = weights.shape
    if max(n_q, n_k) > 24:
        return _mosaic(weights, path, title=title, hidden=hidden)
    cell = 2.2
    fig = _figure(0.8 + cell * H, 0.9 + cell * L)
    axes = fig.subplots(L, H, squeeze=False)
    for layer in range(L):
        for h in range(H):
            ax = axes[layer][h]
            ax.imshow(_masked(weights[layer, h], None if hidden is None else hidden[layer, h]), cmap=_cmap(),
                      vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer}, head {h}", fontsize=8)
            _ticks(ax, tokens, n_q, n_k, fontsize=5)
    fig.suptitle(f"{title + ': ' if title else ''}attention weights, layers × heads — in each map {ROWS_COLS}"
                 + ("" if hidden is None else "; grey: masked"),
                 fontsize=10)
    fig.savefig(path)
    return os.fspath(path)


def _mosaic(weights: Tensor, path, *, title: str, hidden: Tensor | None) -> str:
    """Longer texts: every map tiled into one image (one axes, not L × H: laying out 72 axes took seconds), each
    max-pooled to at most GRID_CELLS cells a side."""
    import numpy as np

    if max(weights.shape[2:]) > GRID_CELLS:
        weights, hidden = _pool(weights, hidden)
    L, H, n_q, n_k = weights.shape
    gap = max(2, n_k // 16)
    cmap = _cmap()
    tiles = np.full((L * (n_q + gap) - gap, H * (n_k + gap) - gap, 4), 255, dtype=np.uint8)  # RGBA, white gaps
    for layer in range(L):
        for h in range(H):
            r, c = layer * (n_q + gap), h * (n_k + gap)
            m = _masked(weights[layer, h], None if hidden is None else hidden[layer, h])
            tiles[r:r + n_q, c:c + n_k] = cmap(m, bytes=True)  # colours made here, once: matplotlib only scales
    cell = 1.6
    fig = _figure(1.4 + cell * H, 1.0 + cell * L)
    ax = fig.add_subplot()
    ax.imshow(tiles, interpolation="nearest")
    ax.set_xticks([h * (n_k + gap) + n_k / 2 for h in range(H)], [f"head {h}" for h in range(H)], fontsize=8)
    ax.set_yticks([layer * (n_q + gap) + n_q / 2 for layer in range(L)], [f"layer {layer}" for layer in range(L)],
                  fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.suptitle(f"{title + ': ' if title else ''}attention weights, layers × heads — in each map {ROWS_COLS}"
                 + ("" if hidden is None else "; grey: masked"), fontsize=10)
    fig.savefig(path)
    return os.fspath(path)


def _pool(weights: Tensor, hidden: Tensor | None):
    """(L, H, N_q, N_k) → (L, H, ≤GRID_CELLS, ≤GRID_CELLS): each cell the largest weight it covers; hidden only where
    every covered cell is hidden. One map at a time: no second L × H × N × N tensor."""
    import torch

    L, H, n_q, n_k = weights.shape
    size = (min(n_q, GRID_CELLS), min(n_k, GRID_CELLS))
    pool = torch.nn.functional.adaptive_max_pool2d
    w = torch.empty(L, H, *size)
    seen = None if hidden is None else torch.empty(L, H, *size)
    for layer in range(L):
        for h in range(H):
            w[layer, h] = pool(weights[layer, h][None].float(), size)[0]
            if seen is not None:
                seen[layer, h] = pool((~hidden[layer, h])[None].float(), size)[0]
    return w, None if seen is None else seen == 0


def save_all(weights: Tensor, tokens: Sequence[str], out_dir: str | os.PathLike, *, title: str = "",
             hidden: Tensor | None = None) -> list[str]:
    """One PNG per head (``layer{l}_head{h}.png``) and the grid (``grid.png``) of weights (L, H, N, N) in out_dir;
    ``hidden`` (L, H, N, N) bool marks the masked cells, drawn grey."""
    _check_weights(weights, 4, "save_all")
    os.makedirs(out_dir, exist_ok=True)
    L, H = weights.shape[:2]
    heads = [(layer, h) for layer in range(L) for h in range(H)]
    paths = _heatmaps([weights[layer, h] for layer, h in heads], tokens,
                      [os.path.join(out_dir, f"layer{layer}_head{h}.png") for layer, h in heads],
                      [f"layer {layer}, head {h}" + (f" — {title}" if title else "") for layer, h in heads],
                      None if hidden is None else [hidden[layer, h] for layer, h in heads])
    paths.append(grid(weights, tokens, os.path.join(out_dir, "grid.png"), title=title, hidden=hidden))
    return paths


def lesson_plot(rows: Sequence[dict], path: str | os.PathLike) -> str:
    """The scaling lesson's picture: softmax entropy and gradient norm against d_k, with and without 1/√d_k."""
    fig = _figure(10.0, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    d = [r["d_k"] for r in rows]
    ax1.plot(d, [r["entropy_scaled"] for r in rows], "o-", label="scaled by 1/√d_k")
    ax1.plot(d, [r["entropy_raw"] for r in rows], "s--", label="not scaled")
    ax1.axhline(rows[0]["entropy_uniform"], color="grey", lw=0.8, ls=":", label="uniform (log N)")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("d_k")
    ax1.set_ylabel("softmax entropy (nats)")
    ax1.set_title("without scaling the softmax turns one-hot")
    ax1.legend(fontsize=8)
    ax2.plot(d, [r["grad_scaled"] for r in rows], "o-", label="scaled by 1/√d_k")
    ax2.plot(d, [r["grad_raw"] for r in rows], "s--", label="not scaled")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("d_k")
    ax2.set_ylabel("‖∂loss/∂scores‖ (median over queries)")
    ax2.set_title("…and its gradient vanishes")
    ax2.legend(fontsize=8)
    fig.suptitle("Why attention divides the scores by √d_k (q, k with unit-variance entries)", fontsize=11)
    fig.savefig(path)
    return os.fspath(path)
