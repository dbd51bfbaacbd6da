"""attn_implementation="selfattn" in Hugging Face transformers: tiny random models of each family (no downloads)
give eager attention's logits, weights and greedy generations."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("selfattn.integrations.hf")

from selfattn import masks, testing  # noqa: E402

VOCAB = 97


def _llama():
    return transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256)  # GQA: 4 query heads share 2 key/value heads; RoPE


def _gpt2():
    return transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)


def _bert():
    return transformers.BertModel, transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


FAMILIES = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}


def _pair(family):
    """The same random weights under attn_implementation="eager" and "selfattn"."""
    cls, config = FAMILIES[family]()
    torch.manual_seed(0)
    eager = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours = cls._from_config(copy.deepcopy(config), attn_implementation="selfattn").eval()
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == "selfattn" and eager.config._attn_implementation == "eager"
    return eager, ours


def _batch(padding):
    ids = torch.randint(1, VOCAB, (3, 19))
    am = torch.ones(3, 19, dtype=torch.long)
    if padding == "left":
        am[1, :6] = 0
        am[2, :1] = 0
    elif padding == "right":
        am[1, 12:] = 0
        am[2, 18:] = 0
    return ids, (None if padding == "none" else am)


def _in_float64(eager):
    """eager in float64: measures eager's own float32 rounding on this CPU (testing.check_against_third_party)."""
    return copy.deepcopy(eager).double()


def _output(model, family, ids, am):
    out = model(ids, attention_mask=am, output_attentions=True)
    return (out.last_hidden_state if family == "bert" else out.logits), out.attentions


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_weights_equal_eager(family, padding):
    eager, ours = _pair(family)
    ids, am = _batch(padding)
    with torch.no_grad():
        want, want_w = _output(eager, family, ids, am)
        want64, want64_w = _output(_in_float64(eager), family, ids, am)
        got, got_w = _output(ours, family, ids, am)
    rows = torch.ones(ids.shape, dtype=torch.bool) if am is None else am.bool()  # padded query rows are not compared
    testing.check_against_third_party(got[rows], want[rows], want64[rows], what=f"{family}/{padding} logits")
    assert len(got_w) == len(want_w) == eager.config.num_hidden_layers
    for layer, (gw, ww, w64) in enumerate(zip(got_w, want_w, want64_w, strict=True)):
        assert gw.shape == ww.shape, (gw.shape, ww.shape)
        testing.check_against_third_party(*(w.permute(0, 2, 1, 3)[rows] for w in (gw, ww, w64)),  # (rows, H, N_k)
                                          what=f"{family}/{padding} layer {layer} weights")


@pytest.mark.parametrize(("family", "cache", "padding"), [
    ("llama", "dynamic", "left"),  # generation pads on the left: the new tokens see only the real ones
    ("llama", "static", "left"),  # the static cache's empty slots are masked keys (a dense mask)
    ("llama", "static", "none"),  # no mask at all: the prefill sees only its own N_q of the N_k slots
    ("gpt2", "dynamic", "left"),
    ("mistral", "dynamic", "left"),  # a sliding window of 5: the cache and the mask drop the older keys
    ("gemma3", "dynamic", "left"),  # window and full layers alternate
])
def test_fifty_greedy_tokens_equal_eager(family, cache, padding):
    eager, ours = _pair(family)
    ids, am = _batch(padding)
    kwargs = dict(attention_mask=am, max_new_tokens=50, min_new_tokens=50, do_sample=False, pad_token_id=0)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        want = eager.generate(ids, **kwargs)
        got = ours.generate(ids, **kwargs)
    assert want.shape == (3, 19 + 50), want.shape
    diff = (got != want).nonzero().tolist()
    assert not diff, f"{family}/{cache}: generations differ at (batch, position) {diff[:5]}"


def test_prefill_without_padding_uses_causal_flag_not_a_dense_mask(monkeypatch):
    import selfattn

    seen = []
    real = selfattn.attention

    def spy(q, k, v, **kw):
        seen.append((kw.get("causal"), kw.get("mask")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(selfattn, "attention", spy)
    eager, ours = _pair("llama")
    ids, am = _batch("left")
    with torch.no_grad():
        ours(ids[:1])
        ours(ids, attention_mask=am)
    assert seen[0] == (True, None), seen[0]
    causal, mask = seen[-1]
    assert causal is False and isinstance(mask, masks.Mask) and mask.name == "(causal & key_range)", seen[-1]


@pytest.mark.parametrize("side", ["left", "right", "both", "none"])
def test_structured_mask_recognises_causal_and_key_padding(side):
    B, N_q, N_k = 3, 6, 11
    valid = torch.ones(B, N_k, dtype=torch.bool)
    if side in ("left", "both"):
        valid[1, :4] = False
    if side in ("right", "both"):
        valid[2, 7:] = False
    causal = masks.causal().dense(1, 1, N_q, N_k)
    for dense, name in ((valid[:, None, None, :].expand(B, 1, N_q, N_k), "key"), (valid[:, None, None] & causal,
                                                                                 "causal&key")):
        got = hf.structured_mask(dense.clone())
        assert isinstance(got, masks.Mask), f"{side}/{name}: not recognised"
        assert torch.equal(got.dense(B, 1, N_q, N_k), dense), f"{side}/{name}: wrong mask {got}"
        keys = got.spec if name == "key" else got.spec[2]  # ("and", ("causal",), keys)
        want_kind = "key_padding" if side in ("right", "none") else "key_range"
        assert keys is not None and keys[0] == want_kind, f"{side}/{name}: {got.spec}"
        if side == "left":
            assert keys[1].tolist() == [0, 4, 0] and keys[2] is None, keys  # starts; no ends: left padding only
        if side == "both":
            assert keys[1].tolist() == [0, 4, 0] and keys[2].tolist() == [11, 11, 7], keys
    odd = torch.rand(B, 1, N_q, N_k) < 0.5
    assert hf.structured_mask(odd) is odd
    scattered = valid.clone()
    scattered[0, 5] = False  # a hole in the middle: no ready-made form, but still an exact Mask
    got = hf.structured_mask(scattered[:, None, None].expand(B, 1, N_q, N_k).clone())
    assert got.name == "key_mask" and got.spec is None and torch.equal(got.dense(B, 1, 1, N_k)[:, 0, 0], scattered)


@pytest.mark.parametrize("window", [1, 3, 6])
@pytest.mark.parametrize("N_q", [1, 6, 11])
def test_structured_mask_recognises_sliding_windows(window, N_q):
    B, N_k = 3, 11
    valid = torch.ones(B, N_k, dtype=torch.bool)
    valid[1, :4] = False
    valid[2, :11] = False  # a batch element with no real key
    dense = valid[:, None, None] & masks.sliding_window(window).dense(1, 1, N_q, N_k)
    got = hf.structured_mask(dense)
    assert isinstance(got, masks.Mask) and got.spec is not None, f"window {window}, N_q {N_q}: not recognised"
    assert torch.equal(got.dense(B, 1, N_q, N_k), dense), f"window {window}, N_q {N_q}: wrong mask {got}"
    if N_q > window:  # the window binds somewhere: it must be recognised as one, not as causal
        assert "sliding_window" in got.name, got.name
    widened = dense.clone()
    widened[0, 0, -1, 0] = True  # one more visible pair, far back: whatever it is recognised as must be exact
    again = hf.structured_mask(widened)
    assert again is widened or torch.equal(again.dense(B, 1, N_q, N_k), widened), f"{again} is not the mask"
    if N_q > 1 and window < N_k - 1:
        assert again is widened, f"window {window}, N_q {N_q}: {again}"


def _record_calls(monkeypatch):
    """Spy on selfattn.attention: the list of AttentionCalls the model makes (masks as the layers passed them)."""
    import selfattn

    calls = []
    real = selfattn.attention

    def spy(q, k, v, **kw):
        calls.append(selfattn.api.make_call(q, k, v, causal=kw.get("causal", False), mask=kw.get("mask"),
                                            bias=kw.get("bias"), scale=kw.get("scale")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(selfattn, "attention", spy)
    return calls


def test_left_padding_becomes_a_mask_the_triton_kernels_take(monkeypatch):
    """Batched generation pads on the left: the prefill's mask is causal & key_range, which the Triton backend
    serves (on a GPU it is chosen instead of a slower backend); the tiled backend skips the padded blocks."""
    from selfattn import backends

    calls = _record_calls(monkeypatch)
    eager, ours = _pair("llama")
    ids, am = _batch("left")
    with torch.inference_mode():  # its tensors (the mask's starts too) have no version counter to key caches on
        ours(ids, attention_mask=am)
        ours(ids, attention_mask=am)
    assert len(calls) == 2 * ours.config.num_hidden_layers
    for call in calls:
        assert call.mask.name == "(causal & key_range)", call.mask
        assert call.mask.spec[2][1].tolist() == [0, 6, 1], call.mask.spec  # the first real key of each sequence
        assert backends.get("triton").call_reasons(call) == [], backends.get("triton").call_reasons(call)
    assert calls[0].mask is calls[1].mask  # recognised once, reused by every layer


def _mistral():
    return transformers.MistralForCausalLM, transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=5)


def _gemma3():  # sliding-window and full layers alternate: two masks per forward
    return transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"] * 2)


def _qwen2():
    return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, use_sliding_window=True, sliding_window=5,
        max_window_layers=0)


FAMILIES |= {"mistral": _mistral, "gemma3": _gemma3, "qwen2": _qwen2}


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", ["mistral", "gemma3", "qwen2"])
def test_sliding_window_models_get_window_masks_not_dense_ones(family, padding, monkeypatch):
    from selfattn import backends

    calls = _record_calls(monkeypatch)
    recognised = []
    real_recognise = hf._recognise
    monkeypatch.setattr(hf, "_recognise", lambda mask: recognised.append(mask) or real_recognise(mask))
    eager, ours = _pair(family)
    ids, am = _batch(padding)
    with torch.no_grad():
        want = eager(ids, attention_mask=am).logits
        want64 = _in_float64(eager)(ids, attention_mask=am).logits
        got = ours(ids, attention_mask=am).logits
    rows = am.bool()
    testing.check_against_third_party(got[rows], want[rows], want64[rows], what=f"{family}/{padding} logits")
    layers = ours.config.layer_types if family == "gemma3" else ["sliding_attention"] * 2
    assert len(calls) == len(layers)
    assert len(recognised) == len(set(layers)), f"{len(recognised)} recognitions for {len(set(layers))} masks"
    for layer, (kind, call) in enumerate(zip(layers, calls, strict=True)):
        assert isinstance(call.mask, masks.Mask) and call.mask.spec is not None, f"layer {layer}: {call.mask}"
        first = ("sliding_window", 5) if kind == "sliding_attention" else ("causal",)
        keys = "key_range" if padding == "left" else "key_padding"
        assert call.mask.spec[:2] == ("and", first) and call.mask.spec[2][0] == keys, f"layer {layer}: {call.mask}"
        assert backends.get("triton").call_reasons(call) == [], f"layer {layer}: {call.mask}"


def test_key_mask_block_states_are_exact():
    valid = torch.rand(2, 37) < 0.6
    valid[0, :10] = False
    exact = hf.key_mask(valid)
    assert exact.block_fn is not None
    dense_only = masks.Mask(exact.mask_mod)
    for bq, bk in ((4, 5), (8, 8), (16, 3)):
        got = exact.block_states(2, 1, 13, 37, bq, bk)
        want = dense_only.block_states(2, 1, 13, 37, bq, bk)
        assert torch.equal(got.expand_as(want), want), (bq, bk)


@pytest.mark.parametrize("padding", ["none", "left"])
def test_llama_compiles_fullgraph_without_graph_breaks(padding):
    import torch._dynamo

    torch._dynamo.reset()
    eager, ours = _pair("llama")
    ids, am = _batch(padding)

    def logits(ids, am):
        return ours(ids, attention_mask=am, use_cache=False).logits

    with torch.no_grad():
        explained = torch._dynamo.explain(logits)(ids, am)
        assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
        got = torch.compile(logits, fullgraph=True, backend="aot_eager")(ids, am)
        want = eager(ids, attention_mask=am, use_cache=False).logits
        want64 = _in_float64(eager)(ids, attention_mask=am, use_cache=False).logits
    rows = torch.ones(ids.shape, dtype=torch.bool) if am is None else am.bool()
    testing.check_against_third_party(got[rows], want[rows], want64[rows], what=f"compiled/{padding} logits")
