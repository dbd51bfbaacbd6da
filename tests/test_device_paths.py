"""The library end to end on each device, with the backend the registry picks there by default.

Modules, a training step of the tiny GPT, KV-cache decoding, split-KV decoding, the custom op under
``torch.compile(fullgraph=True)`` and a Hugging Face model, each checked against the oracle or the reference
backend, and each call's backend recorded: on the CPU every call must go to "native" (the C++ kernel; "tiled" for
float64 and where the kernel is not built), on a CUDA GPU to "triton". A
call that quietly lands on a slower backend (the float64 reference on a GPU, say) fails here.

The CPU cases run in every CI run; the CUDA cases are skipped without a GPU and run by
``benchmarks/gpu_session.sh`` on a lent one (the Triton kernels themselves are tested under the interpreter in CI).
"""

import copy
import math

import pytest
import torch

import selfattn
from selfattn import backends, decode, masks, reference, testing
from selfattn.model.generate import stream_tokens
from selfattn.model.gpt import GPT, GPTConfig
from selfattn.nn import MultiHeadAttention

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU"))]
# what serves every call below by default on each device: the CPU's float64 calls go to tiled (the kernel computes
# in float32), and so does everything where the native kernel is not built
FAST = {"cpu": {"native", "tiled"} if backends.get("native").unavailable_reasons() == [] else {"tiled"},
        "cuda": {"triton"}}


@pytest.fixture
def served(monkeypatch):
    """The names of the backends the registry picked, call by call."""
    names = []
    choose = backends.choose

    def recording(call, name=None, **kw):
        backend = choose(call, name, **kw)
        names.append(backend.name)
        return backend

    monkeypatch.setattr(backends, "choose", recording)
    return names


def _only(names: list, device: str) -> None:
    assert names, "no attention call reached the registry"
    assert set(names) <= FAST[device], f"on {device} every call must run on {FAST[device]}, got {set(names)}"
    if device == "cpu" and "native" in FAST["cpu"]:
        assert "native" in names, f"no call reached the native kernel: {names}"


MASKS = {
    "causal": lambda B, N, g: dict(causal=True),
    "window": lambda B, N, g: dict(mask=masks.sliding_window(37)),
    "padding&causal": lambda B, N, g: dict(mask=masks.key_padding(torch.randint(1, N + 1, (B,), generator=g)),
                                           causal=True),
    "documents": lambda B, N, g: dict(mask=masks.document(torch.sort(torch.randint(0, 4, (N,), generator=g)).values)
                                      & masks.causal()),
    "bias": lambda B, N, g: dict(bias=torch.randn(1, 4, 173, N, generator=g, dtype=torch.float64), causal=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", list(MASKS))
def test_default_backend_matches_the_oracle(device, dtype, kind, served):
    B, H_q, H_kv, N_q, N_k, D = 2, 4, 2, 173, 301, 64  # GQA, N_q != N_k (bottom-right), odd sizes
    g = torch.Generator().manual_seed(len(kind))
    q64, k64, v64 = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64)
                     for h, n in ((H_q, N_q), (H_kv, N_k), (H_kv, N_k)))
    kwargs = MASKS[kind](B, N_k, g)
    q, k, v = (t.to(device, dtype).requires_grad_() for t in (q64, k64, v64))
    fast_kwargs = {n: t.to(device, dtype) if n == "bias" else t for n, t in kwargs.items()}
    out = selfattn.attention(q, k, v, **fast_kwargs)
    _only(served, device)
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), d_out.to(device, dtype))

    oracle_in = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    oracle = reference.attention(*oracle_in, **kwargs)
    oracle_grads = torch.autograd.grad(oracle, oracle_in, d_out)
    low = [t.detach().to(dtype) for t in (q64, k64, v64)]
    low_kwargs = {n: t.to(dtype) if n == "bias" else t for n, t in kwargs.items()}
    naive = testing.naive(*low, **low_kwargs)
    naive_grads = testing.naive_grads_from_out(*low, d_out.to(dtype), **low_kwargs)
    testing.check_against_oracle(out.detach().cpu(), naive, oracle, what=f"out {kind} on {device}")
    for name, got, n, o in zip("qkv", grads, naive_grads, oracle_grads, strict=True):
        testing.check_against_oracle(got.cpu(), n, o, factor=3.0, what=f"d{name} {kind} on {device}")


def _tiny_gpt(device: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(context=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64)).to(device)


def _use(model, backend):
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.backend = backend


@pytest.mark.parametrize("device", DEVICES)
def test_gpt_training_step_matches_the_reference_backend(device, served):
    model = _tiny_gpt(device)
    tokens = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(1)).to(device)
    results = {}
    for backend in (None, "reference"):
        _use(model, backend)
        model.zero_grad()
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results[backend] = (loss.item(), [p.grad.clone() for p in model.parameters()])
        if backend is None:  # the first pass, with the default backend (a layer whose signature was kept skips the
            _only(list(served), device)  # registry: only the first one of a signature is recorded)
    (loss, grads), (ref_loss, ref_grads) = results[None], results["reference"]
    # fixed bounds, why: a float32 model whose attention is either fast or the oracle (rounded to float32): rtol 1e-5 ~
    # 84 ulps (run on the scalar, AVX2, AVX-512 kernels by make test-portable); a wrong mask, scale or position moves
    # values by > 1e-3
    assert math.isfinite(loss) and abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    for got, ref in zip(grads, ref_grads, strict=True):
        err = testing.max_error(got.double(), ref.double())
        assert err <= 1e-4 * ref.abs().max().item() + 1e-7, f"gradient differs from the reference backend by {err}"


@pytest.mark.parametrize("device", DEVICES)
def test_cached_decoding_gives_the_full_forward_tokens(device, served):
    model = _tiny_gpt(device).eval()
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        cached = torch.stack(list(stream_tokens(model, prompt, 40, top_k=1, cache="full")), 1)  # (B, 40)
        served_cached = list(served)
        seq = prompt
        for _ in range(40):  # no cache: the whole sequence again for every token
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    _only(served_cached, device)
    assert torch.equal(cached, seq[:, prompt.shape[1]:]), "greedy tokens differ with and without the KV cache"


@pytest.mark.parametrize("device", DEVICES)
def test_split_kv_decoding_matches_attention(device, served):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 1, 64, generator=g).to(device)  # one new token per sequence
    k, v = (torch.randn(2, 2, 5000, 64, generator=g).to(device) for _ in range(2))
    split = decode.split_kv_attention(q, k, v, chunk=1024)
    whole = selfattn.attention(q, k, v)
    _only(served, device)
    # split-KV vs whole: two float32 merge orders of 5,000 keys, values O(1): 1e-5 ~ 84 ulps
    assert testing.max_error(split, whole) <= 1e-5, testing.max_error(split, whole)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_fullgraph_matches_eager(device, served):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, 130, 32, generator=g).to(device).requires_grad_() for _ in range(3))
    lengths = torch.tensor([130, 77]).to(device)

    def f(q, k, v):
        return selfattn.attention(q, k, v, causal=True, mask=masks.key_padding(lengths)).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    got_grads = torch.autograd.grad(got.sum(), (q, k, v))
    want = f(q, k, v)
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    _only(served, device)
    for a, b in zip((got, *got_grads), (want, *want_grads), strict=True):
        # compiled vs not: two float32 paths of one computation, nothing third-party to measure: rtol 1e-5 ~ 84 ulps
        # (run on the scalar, AVX2, AVX-512 kernels by make test-portable); a wrong mask, scale or position moves values
        # by > 1e-3
        assert testing.max_error(a, b) <= 1e-5, testing.max_error(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_hugging_face_llama_matches_sdpa(device, padding, served):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("selfattn.integrations.hf")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    # each model its own copy of the config: _from_config writes the attention implementation into it
    ours = transformers.LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="selfattn")
    sdpa = transformers.LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa")
    ours, sdpa = ours.to(device).eval(), sdpa.to(device).eval()
    sdpa.load_state_dict(ours.state_dict())
    ids = torch.randint(1, 97, (3, 150), generator=torch.Generator().manual_seed(5)).to(device)
    am = torch.ones_like(ids)
    if padding == "right":
        am[1, 100:] = 0
    elif padding == "left":
        am[1, :40] = 0
        am[2, :3] = 0
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=am).logits
        served_ours = list(served)
        want = sdpa(input_ids=ids, attention_mask=am).logits
    _only(served_ours, device)
    valid = am.bool()  # positions of padding tokens are not compared (their rows differ by convention)
    err = testing.max_error(got[valid], want[valid]) / want[valid].abs().max().item()
    # ours vs SDPA, both float32: rtol 1e-5 ~ 84 ulps (run on the scalar, AVX2, AVX-512 kernels by make test-portable);
    # a wrong mask, scale or position moves values by > 1e-3
    assert err <= 1e-5, f"logits differ from sdpa by {err:.2e} (relative)"


@pytest.mark.parametrize("device", DEVICES)
def test_packed_sequences_match_each_sequence_alone(device, served):
    g = torch.Generator().manual_seed(6)
    lengths = [131, 1, 0, 260, 77]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32).to(device)
    q, k, v = (torch.randn(sum(lengths), h, 64, generator=g).to(device, torch.bfloat16) for h in (4, 2, 2))
    out = selfattn.varlen_attention(q, k, v, cu, causal=True)  # (T, H_q, D)
    _only(served, device)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if a == b:
            continue
        one = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, n, D)
        want = reference.attention(*(t.double().cpu() for t in one), causal=True)[0].transpose(0, 1)
        naive = testing.naive(*(t.cpu() for t in one), causal=True)[0].transpose(0, 1)
        testing.check_against_oracle(out[a:b].cpu(), naive, want, what=f"sequence {a}:{b} on {device}")
