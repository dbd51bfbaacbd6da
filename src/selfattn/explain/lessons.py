"""Two lessons with numbers: why the scores are scaled by 1/√d_k, and why an orthogonal x_j still gets weight.

    >>> print(scaling_text(scaling()))          # or: selfattn explain --lesson scaling
    >>> print(orthogonal_text(orthogonal()))    # or: selfattn explain --lesson orthogonal
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from selfattn import reference

LESSONS = ("scaling", "orthogonal")


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
