"""Lessons with numbers: why the scores are scaled by 1/√d_k, why an orthogonal x_j still gets weight, the steps in
order with their shapes, and why attention has W_Q, W_K, W_V at all.

    >>> print(scaling_text(scaling()))          # or: selfattn explain --lesson scaling
    >>> print(orthogonal_text(orthogonal()))    # or: selfattn explain --lesson orthogonal
    >>> print(steps_text(e.trace))              # or: selfattn explain --lesson steps [--model PATH] [TEXT]
    >>> X, heads, causal, name = first_layer(model, ids)
    >>> print(projections_text(projections(X, heads, causal=causal), tokens))   # or: --lesson weights
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from selfattn import reference

LESSONS = ("scaling", "orthogonal", "steps", "weights")


# ------------------------------------------------------------------------------------------------------- scaling


def scaling(d_ks: Sequence[int] = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), *, n_keys: int = 64,
            n_queries: int = 256, seed: int = 0) -> list[dict]:
    """For each d_k: q and k with independent unit-variance entries, so q·k has variance d_k. Returns, with and
    without the 1/√d_k scale, the mean softmax entropy (nats; log N = uniform, 0 = one-hot), the mean largest
    weight, and the median norm of ∂loss/∂scores for a random upstream gradient (how much signal reaches W_Q, W_K).
    """
    if not d_ks or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in d_ks):
        raise ValueError(f"d_ks must be positive ints, got {list(d_ks)}")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for d_k in d_ks:
        q = torch.randn(n_queries, d_k, generator=g, dtype=torch.float64)
        k = torch.randn(n_keys, d_k, generator=g, dtype=torch.float64)
        upstream = torch.randn(n_queries, n_keys, generator=g, dtype=torch.float64)
        row = {"d_k": d_k, "score_std": (q @ k.T).std().item(), "entropy_uniform": math.log(n_keys)}
        for tag, scale in (("scaled", 1.0 / math.sqrt(d_k)), ("raw", 1.0)):
            s = reference.steps(q[None, None], k[None, None], k[None, None], scale=scale)
            scores = s.scaled[0, 0].clone().requires_grad_(True)
            p = torch.softmax(scores, dim=-1)
            (p * upstream).sum().backward()
            w = s.weights[0, 0]
            row[f"entropy_{tag}"] = -(w * torch.log(w.clamp_min(1e-300))).sum(-1).mean().item()
            row[f"max_weight_{tag}"] = w.max(-1).values.mean().item()
            row[f"grad_{tag}"] = scores.grad.norm(dim=-1).median().item()
        rows.append(row)
    return rows


def scaling_text(rows: Sequence[dict]) -> str:
    n = round(math.exp(rows[0]["entropy_uniform"]))
    lines = [
        "Lesson: why divide the scores by √d_k?",
        f"q and k have unit-variance entries, so q·k has standard deviation √d_k; {n} keys per query.",
        f"Softmax entropy is log {n} = {rows[0]['entropy_uniform']:.2f} nats for uniform weights, 0 for one-hot.",
        "‖grad‖ is the median over queries of ‖∂loss/∂scores‖ for a random upstream gradient.",
        "",
        f"{'d_k':>6} {'std(q·k)':>9} | {'entropy':>8} {'max a':>6} {'‖grad‖':>9} | {'entropy':>8} {'max a':>6} "
        f"{'‖grad‖':>9}",
        f"{'':>6} {'':>9} | {'with 1/√d_k':^25} | {'without':^25}",
    ]
    for r in rows:
        lines.append(f"{r['d_k']:>6} {r['score_std']:>9.2f} | {r['entropy_scaled']:>8.3f}"
                     f" {r['max_weight_scaled']:>6.3f} {r['grad_scaled']:>9.2e} | {r['entropy_raw']:>8.3f}"
                     f" {r['max_weight_raw']:>6.3f} {r['grad_raw']:>9.2e}")
    last = rows[-1]
    ratio = last["grad_raw"] / max(last["grad_scaled"], 1e-300)
    lines += [
        "",
        f"With the scale, the entropy stays within {min(r['entropy_scaled'] for r in rows):.2f}–"
        f"{max(r['entropy_scaled'] for r in rows):.2f} nats at every"
        f" d_k: the score spread is 1 whatever d_k is.",
        f"Without it, at d_k={last['d_k']} the largest weight averages {last['max_weight_raw']:.3f} (nearly one-hot)"
        f" and the median gradient through the softmax is {ratio:.1e} times"
        " the scaled one:",
        "a saturated softmax passes almost no gradient back to W_Q and W_K, so training stalls.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- orthogonal


def orthogonal(seed: int = 0) -> dict:
    """Three tokens where x_1 ⟂ x_0 (x_0·x_1 = 0): does x_1 influence y_0? Two cases:

    * W_Q = W_K = W_V = I: the score q_0·k_1 = x_0·x_1 = 0, and e^0 = 1, so a_01 > 0 and v_1 enters y_0;
    * random W_Q, W_K: q_0·k_1 = x_0 W_Q W_Kᵀ x_1ᵀ, a bilinear form that orthogonality in x does not make 0.

    Returns the numbers for both cases, including ‖∂y_0/∂x_1‖ (the influence of x_1 on y_0, by autograd).
    """
    d = 4
    X = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.6, 0.0, 0.8, 0.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(d, dtype=torch.float64)
    W = torch.randn(3, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    cases = {}
    for name, (w_q, w_k, w_v) in (("identity", (eye, eye, eye)), ("learned", (W[0], W[1], W[2]))):
        x = X.clone().requires_grad_(True)
        q, k, v = reference.project(x, w_q, w_k, w_v)
        s = reference.steps(q[None, None], k[None, None], v[None, None])
        y0 = s.out[0, 0, 0]
        jac = torch.stack([torch.autograd.grad(y0[c], x, retain_graph=True)[0][1] for c in range(d)])  # ∂y_0/∂x_1
        cases[name] = {
            "W_Q": w_q, "W_K": w_k,
            "cos_x": _cos(X[0], X[1]),
            "cos_qk": _cos(q[0].detach(), k[1].detach()),
            "scores": s.scaled[0, 0, 0].detach(),
            "exp": torch.exp(s.scaled[0, 0, 0].detach()),
            "weights": s.weights[0, 0, 0].detach(),
            "y0": y0.detach(),
            "influence": jac.norm().item(),
        }
    return {"X": X, "cases": cases}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    den = (a.norm() * b.norm()).item()
    return 0.0 if den == 0 else (a @ b).item() / den


def orthogonal_text(result: dict) -> str:
    X = result["X"]
    idn, lrn = result["cases"]["identity"], result["cases"]["learned"]

    def vec(t):
        return "[" + ", ".join(f"{v:.3f}" for v in t.tolist()) + "]"

    lines = [
        "Lesson: if x_1 is orthogonal to x_0, does x_1 influence y_0?",
        f"x_0 = {vec(X[0])}, x_1 = {vec(X[1])}, x_2 = {vec(X[2])};  x_0·x_1 = {(X[0] @ X[1]).item():.1f}",
        "",
        "1) W_Q = W_K = W_V = I (no learned projection): the score is the dot product of the inputs.",
        f"   scaled scores s_0j = x_0·x_j / √4   = {vec(idn['scores'])}",
        f"   exp(s_0j)                          = {vec(idn['exp'])}   <- e^0 = 1, not 0",
        f"   weights a_0j = exp / Σ exp          = {vec(idn['weights'])}",
        f"   so a_01 = {idn['weights'][1].item():.3f}: x_1 gets {100 * idn['weights'][1].item():.0f}% of y_0 = "
        f"{vec(idn['y0'])}",
        f"   and ‖∂y_0/∂x_1‖ = {idn['influence']:.3f} > 0: moving x_1 moves y_0.",
        "   A score of 0 means 'average', not 'ignore'; only a mask (score −∞) gives weight exactly 0.",
        "",
        "2) Random W_Q, W_K, W_V: the score is x_0·W_Q·W_Kᵀ·x_1ᵀ, and W_Q·W_Kᵀ is not the identity,",
        "   so the projections change the angles:",
        f"   cos(x_0, x_1) = {lrn['cos_x']:.3f}   but   cos(q_0, k_1) = {lrn['cos_qk']:.3f}",
        f"   scaled scores s_0j = {vec(lrn['scores'])}",
        f"   weights a_0j      = {vec(lrn['weights'])}   (a_01 = {lrn['weights'][1].item():.3f})",
        f"   ‖∂y_0/∂x_1‖ = {lrn['influence']:.3f}.",
        "",
        "Orthogonal inputs are not 'unrelated' to attention: what counts is q_i·k_j after W_Q and W_K, and even a",
        "zero score keeps weight e^0 / Σ_j e^{s_ij} > 0.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- steps


def steps_text(trace, *, n_heads: int | None = None, d_model: int | None = None, rotary: bool = False,
               width: int = 6) -> str:
    """The order of the computation for one token (``trace.token``) of one head, each step's tensor and shape
    (``rotary``: q and k of a trace taken at a model's attention interface were already rotated by position)::

        x_i (d_model) → q_i = x_i·W_Q (d_k) → s_i = q_i·Kᵀ (N) → × 1/√d_k → mask → a_i = softmax (N)
        → y_i = a_i·V (d_v) → the heads concatenated (H·d_v) → ·W_O (d_model)
    """
    i, t = trace.token, trace
    N, d_k, d_v = len(t.tokens), t["Q"].shape[-1], t["V"].shape[-1]

    def v(x):
        return "[" + ", ".join(f"{a:.3f}" if math.isfinite(a) else ("−∞" if a < 0 else "∞")
                               for a in x[:width].tolist()) + (", …" if x.numel() > width else "") + "]"

    rot = "Q_rot" in t.names
    q = t["Q_rot" if rot else "Q"]
    lines = [f"Lesson: the steps of attention, in order, for token {i} {t.tokens[i]!r}" +
             (f" — {t.where}" if t.where else ""), ""]
    n = 1

    def step(what, shape, value=None, note=""):
        nonlocal n
        lines.append(f"{n:>2}. {what:<40} {shape:<16} {'' if value is None else v(value)}{note}")
        n += 1

    if "X" in t.names:
        X = t["X"]
        step("x_i: the token's input vector", f"({X.shape[-1]},)", X[i], "  (its embedding, normalised)")
        step("W_Q, W_K, W_V: learned matrices", f"({X.shape[-1]}, {d_k})")
        step("q_i = x_i·W_Q", f"({d_k},)", t["Q"][i])
        step("K = X·W_K (every token's key)", f"({N}, {d_k})")
        step("V = X·W_V (every token's value)", f"({N}, {d_v})")
    else:
        step("q_i = x_i·W_Q (+ b_Q), inside the model", f"({d_k},)", t["Q"][i],
             "  (rotated by position (RoPE) inside the model too)" if rotary else "")
        step("K: every token's key", f"({N}, {d_k})")
        step("V: every token's value", f"({N}, {d_v})")
    if rot:  # the tiny GPT: the trace has the rotation as a step of its own
        step("q_i and K rotated by position (RoPE)", f"({d_k},), ({N}, {d_k})", q[i])
    step("s_ij = q_i·k_j for every key j", f"({N},)", t["scores"][i], "  (one number per key)")
    step(f"× scale = {t.scale:.4g}", f"({N},)", t["scaled"][i])
    step("mask: −∞ where token i may not look", f"({N},)", t["masked"][i],
         "  (causal: keys after i)" if t.causal else "  (nothing masked here)")
    step("a_ij = softmax_j: e^s / Σ e^s", f"({N},)", t["weights"][i], f"  Σ_j a_ij = {t['weights'][i].sum():.4f}")
    step("y_i = Σ_j a_ij v_j", f"({d_v},)", t["Y"][i])
    if n_heads:
        step(f"concatenate the {n_heads} heads' y_i", f"({n_heads * d_v},)")
        if d_model:
            step("× W_O: back to the model's width", f"({d_model},)", None, "  → added to x_i (residual)")
    lines += ["", "Only the softmax is nonlinear: before it, one matrix product per token and a dot product per pair;",
              "after it, a weighted sum. Here one row a_i is formed for one token i; for all "
              f"N = {N} tokens at once the scores",
              "are an N × N matrix — which selfattn's fast backends never store (they keep a running max and sum per "
              "row instead)."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- weights


def projections(X: torch.Tensor, heads: Sequence[tuple[torch.Tensor, torch.Tensor]], *, causal: bool = False) -> dict:
    """Why W_Q and W_K: scores without them (s_ij = x_i·x_j / √d_model) against each head's learned q_i·k_j / √d_k,
    over the same inputs X (N, d_model). For each: the asymmetry ‖S − Sᵀ‖/‖S‖ (0: symmetric), the share of tokens
    whose largest score is their own, and the mean weight a_ii a token gives itself."""
    X = X.to(torch.float64)
    N, d_model = X.shape

    def measure(q, k, scale):
        s = reference.steps(q[None, None], k[None, None], k[None, None, :, :0], scale=scale, causal=causal)
        S, masked, w = s.scores[0, 0], s.masked[0, 0], s.weights[0, 0]
        asym = ((S - S.T).norm() / S.norm().clamp_min(1e-300)).item()
        return {"asymmetry": asym, "self_top": (masked.argmax(-1) == torch.arange(N)).double().mean().item(),
                "self_weight": w.diagonal().mean().item(), "top": masked.argmax(-1)}

    out = {"N": N, "d_model": d_model, "identity": measure(X, X, 1 / math.sqrt(d_model)), "heads": []}
    for Q, K in heads:
        Q, K = Q.to(torch.float64), K.to(torch.float64)
        out["heads"].append(measure(Q, K, 1 / math.sqrt(Q.shape[-1])))
    return out


def first_layer(model, inputs, tokenizer=None):
    """(X (N, d_model), [(Q, K) per query head], causal, name) of the first attention layer of ``model`` run once on
    ``inputs`` (ids (1, N)): a model built on selfattn.nn.MultiHeadAttention, or a transformers model on selfattn (Q
    and K after rotary positions, as the layer computes them). Sequence 0 of the batch."""
    from selfattn.explain.pretrained import capture

    cap = capture(model)
    with cap, torch.no_grad():
        model(inputs)
    call = cap.layer(0)
    if hasattr(call, "module"):  # selfattn.nn.MultiHeadAttention: its input and its own projection
        with torch.no_grad():
            q, k, _ = call.module.project(call.x, call.positions)  # (B, H_q, N, D), (B, H_kv, N, D)
        X, causal = call.x[0], call.module.causal
    else:
        module, seen = model.get_submodule(call.name), []
        hook = module.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        try:
            with torch.no_grad():
                model(inputs)
        finally:
            hook.remove()
        q, k, X, causal = call.q, call.k, seen[0][0], call.causal
    group = q.shape[1] // k.shape[1]
    heads = [(q[0, h], k[0, h // group]) for h in range(q.shape[1])]
    return X.detach(), heads, causal, call.name


def projections_text(result: dict, tokens: Sequence[str], *, where: str = "") -> str:
    idn, heads = result["identity"], result["heads"]
    mean = {k: sum(h[k] for h in heads) / len(heads) for k in ("asymmetry", "self_top", "self_weight")}
    lines = [
        "Lesson: why W_Q, W_K, W_V? Without them the score of tokens i and j is x_i·x_j." + (f" ({where})" if where
                                                                                            else ""),
        f"{result['N']} tokens, inputs x_i of width {result['d_model']} (what the first attention layer receives).",
        "",
        f"{'scores':<28} {'‖S−Sᵀ‖/‖S‖':>11} {'own score largest':>18} {'mean a_ii':>10}",
        f"{'x_i·x_j / √d (no W)':<28} {idn['asymmetry']:>11.3f} {100 * idn['self_top']:>17.0f}% "
        f"{idn['self_weight']:>10.3f}",
    ]
    for h, r in enumerate(heads):
        lines.append(f"{f'head {h}: q_i·k_j / √d_k':<28} {r['asymmetry']:>11.3f} {100 * r['self_top']:>17.0f}% "
                     f"{r['self_weight']:>10.3f}")
    lines.append(f"{'mean over the heads':<28} {mean['asymmetry']:>11.3f} {100 * mean['self_top']:>17.0f}% "
                 f"{mean['self_weight']:>10.3f}")
    best = max(range(len(heads)), key=lambda h: heads[h]["asymmetry"])
    show = [i for i in range(len(tokens))][: min(8, len(tokens))]
    lines += ["", f"where each token looks most (first {len(show)} tokens): without W, and with head {best}:"]
    for i in show:
        a, b = int(idn["top"][i]), int(heads[best]["top"][i])
        lines.append(f"  {tokens[i]!r:>14} → {tokens[a]!r:<14} vs → {tokens[b]!r}")
    lines += [
        "",
        "Without projections S = X·Xᵀ is symmetric (i looks at j exactly as much as j at i), and x_i·x_i = ‖x_i‖² is",
        "usually the largest entry of its row (Cauchy–Schwarz: x_i·x_j ≤ ‖x_i‖‖x_j‖), so a token mostly attends to",
        "itself. W_Q and W_K give each token two different vectors, a question q_i and a label k_j: q_i·k_j ≠ q_j·k_i,",
        "and a head can learn to look elsewhere (the next word, the subject, the [CLS] token). W_V decides what a",
        "token passes on once looked at, separately from how it is found.",
    ]
    return "\n".join(lines)
