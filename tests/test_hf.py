"""attn_implementation="selfattn" in Hugging Face transformers: tiny random models of each family (no downloads)
give eager attention's logits, weights and greedy generations."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("selfattn.integrations.hf")

from selfattn import masks  # noqa: E402

VOCAB = 97
REL_TOL = 1e-5  # the bound on |logits_selfattn - logits_eager| / max|logits_eager| in float32


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
        got, got_w = _output(ours, family, ids, am)
    rows = torch.ones(ids.shape, dtype=torch.bool) if am is None else am.bool()  # padded query rows are not compared
    rel = ((got - want)[rows].abs().max() / want[rows].abs().max()).item()
    assert rel <= REL_TOL, f"{family}/{padding}: relative logits error {rel:.2e} > {REL_TOL:.0e}"
    assert len(got_w) == len(want_w) == eager.config.num_hidden_layers
    for layer, (gw, ww) in enumerate(zip(got_w, want_w, strict=True)):
        assert gw.shape == ww.shape, (gw.shape, ww.shape)
        err = (gw - ww).permute(0, 2, 1, 3)[rows].abs().max().item()  # (B, N_q, H, N_k) -> (rows, H, N_k)
        assert err <= 1e-6, f"{family}/{padding} layer {layer}: weights differ by {err:.2e}"


@pytest.mark.parametrize(("family", "cache", "padding"), [
    ("llama", "dynamic", "left"),  # generation pads on the left: the new tokens see only the real ones
    ("llama", "static", "left"),  # the static cache's empty slots are masked keys (a dense mask)
    ("llama", "static", "none"),  # no mask at all: the prefill sees only its own N_q of the N_k slots
    ("gpt2", "dynamic", "left"),
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
    assert causal is False and isinstance(mask, masks.Mask) and mask.name == "(causal & key_mask)", seen[-1]


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
        if side in ("right", "none") and name == "key":
            assert got.spec is not None and got.spec[0] == "key_padding", got.spec
    odd = torch.rand(B, 1, N_q, N_k) < 0.5
    assert hf.structured_mask(odd) is odd


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


def test_unsupported_features_say_what_to_do():
    eager, ours = _pair("llama")
    q = k = v = torch.randn(1, 4, 3, 16)
    attn = ours.model.layers[0].self_attn
    with pytest.raises(ValueError, match="dropout"):
        hf.attention_forward(attn, q, k, v, None, dropout=0.1)
    with pytest.raises(ValueError, match="soft-capping"):
        hf.attention_forward(attn, q, k, v, None, softcap=30.0)


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
    rows = torch.ones(ids.shape, dtype=torch.bool) if am is None else am.bool()
    rel = ((got - want)[rows].abs().max() / want[rows].abs().max()).item()
    assert rel <= REL_TOL, f"compiled/{padding}: relative logits error {rel:.2e}"
