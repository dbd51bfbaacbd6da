"""The ``sdpa`` and ``flex`` backends on a CUDA GPU against the float64 oracle, forward and backward (FlashAttention's
rule: 2x the naive same-dtype error, 3x for gradients). Skipped without a GPU; benchmarks/gpu_session.sh runs it.

On the CPU both backends are checked by the registry's matrix (tests/test_backends.py; flex on the forward).
"""

import pytest
import torch

import selfattn
from selfattn import backends, masks, reference, score_mods, testing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _custom(s, b, h, q, k):
    return s + 0.02 * (k - q).to(s.dtype)


CASES = {  # name -> (backends, keyword arguments of attention given N and the device)
    "plain": (("sdpa", "flex"), lambda N, dev: {}),
    "causal": (("sdpa", "flex"), lambda N, dev: {"causal": True}),
    "window": (("flex",), lambda N, dev: {"mask": masks.sliding_window(97)}),
    "documents": (("flex",), lambda N, dev: {"mask": masks.document(torch.arange(N, device=dev) // 300)
                                             & masks.causal()}),
    "padding": (("sdpa", "flex"), lambda N, dev: {"mask": masks.key_padding(torch.tensor([0, N // 2], device=dev))}),
    "softcap": (("flex",), lambda N, dev: {"causal": True, "score_mod": score_mods.softcap(20.0)}),
    "alibi-trained": (("flex",), lambda N, dev: {"causal": True, "score_mod": score_mods.alibi(
        score_mods.alibi_slopes(8).to(dev).requires_grad_())}),
    "custom": (("flex",), lambda N, dev: {"causal": True, "score_mod": score_mods.ScoreMod(_custom, "custom")}),
}


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_matches_the_oracle_on_cuda(backend, case, D):
    names, make = CASES[case]
    if backend not in names:
        pytest.skip(f"{backend} is not meant for {case}")
    g = torch.Generator().manual_seed(D)
    B, H_q, H_kv, N = 2, 8, 2, 1000
    q64, k64, v64 = (torch.randn(B, h, N, D, generator=g, dtype=torch.float64) for h in (H_q, H_kv, H_kv))
    kw = make(N, "cuda")
    q, k, v = (t.to("cuda", torch.bfloat16).requires_grad_() for t in (q64, k64, v64))
    reasons = backends.get(backend).not_supported_reasons(selfattn.api.make_call(q, k, v, **kw))
    assert not reasons, reasons
    out, lse = selfattn.attention(q, k, v, backend=backend, return_lse=True, **kw)
    kw_cpu = make(N, "cpu")
    ref_in = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    out_ref, lse_ref = reference.attention(*ref_in, return_lse=True, **kw_cpu)
    naive_in = [t.detach().cpu().clone().requires_grad_() for t in (q, k, v)]
    out_naive = testing.naive(*naive_in, **kw_cpu)
    testing.check_against_oracle(out.cpu(), out_naive, out_ref, what=f"{backend} {case} out")
    dead = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse.cpu()), dead) and (out.cpu()[dead] == 0).all()
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), d_out.to("cuda", torch.bfloat16))
    grads_ref = torch.autograd.grad(out_ref, ref_in, d_out)
    grads_naive = torch.autograd.grad(out_naive, naive_in, d_out.to(torch.bfloat16))
    for name, a, r, n in zip("qkv", grads, grads_ref, grads_naive, strict=True):
        testing.check_against_oracle(a.cpu(), n, r, factor=3.0, what=f"{backend} {case} d{name}")


def test_the_automatic_choice_on_cuda_never_takes_the_oracle():
    q = torch.randn(1, 8, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = v = torch.randn(1, 2, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for kw in ({"causal": True}, {"causal": True, "score_mod": score_mods.ScoreMod(_custom, "custom")},
               {"causal": True, "score_mod": score_mods.relative_bias(torch.zeros(8, 33, device="cuda",
                                                                                requires_grad=True))}):
        chosen = backends.choose(selfattn.api.make_call(q, k, v, **kw))
        assert chosen.name != "reference", kw
