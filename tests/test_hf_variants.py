"""The model variants transformers used to need eager attention for: gpt-oss (learned sinks, ``s_aux``), Gemma-2
(logit soft-capping) and BERT training with its default attention dropout — tiny random models, nothing downloaded."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("selfattn.integrations.hf")

from selfattn import testing  # noqa: E402

VOCAB = 97
ORACLE = hf.register("selfattn-oracle", backend="reference")


def _gpt_oss():
    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"])
    return transformers.GptOssForCausalLM, config


def _gemma2():
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, attn_logit_softcapping=0.5,
        final_logit_softcapping=30.0, query_pre_attn_scalar=16, max_position_embeddings=256)
    return transformers.Gemma2ForCausalLM, config


def _pair(make, impl="selfattn"):
    cls, config = make()
    torch.manual_seed(0)
    eager = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    with torch.no_grad():  # make the sinks and the soft-cap matter: sink logits and scores of size ~1 and more
        for name, p in eager.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn_like(p) * 2)
            if name.endswith("q_proj.weight"):
                p.mul_(20.0)
    ours = cls._from_config(copy.deepcopy(config), attn_implementation=impl).eval()
    ours.load_state_dict(eager.state_dict())
    return eager, ours


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("family", ["gpt-oss", "gemma2"])
@pytest.mark.parametrize("padding", [False, True])
def test_logits_and_greedy_generation_equal_eager(family, padding):
    eager, ours = _pair({"gpt-oss": _gpt_oss, "gemma2": _gemma2}[family])
    ids = torch.randint(1, VOCAB, (2, 21))
    am = torch.ones_like(ids)
    if padding:
        am[1, :5] = 0  # left padding
    with torch.no_grad():
        want = eager(ids, attention_mask=am).logits
        got = ours(ids, attention_mask=am).logits
    rows = am.bool()
    if family == "gemma2":  # eager's own float32 error, measured against the same model in float64
        with torch.no_grad():
            want64 = copy.deepcopy(eager).double()(ids, attention_mask=am).logits
        testing.check_against_third_party(got[rows], want[rows], want64[rows], what=f"{family} logits")
    else:  # gpt-oss's experts run torch's grouped matmul, which has no float64: a fixed bound, ~80 float32 ulps of
        # the largest logit (a wrong sink or window moves logits by > 1e-2 of it)
        rel = _rel(got[rows], want[rows])
        assert rel <= 1e-5, f"{family}: relative logits error {rel:.2e} > 1e-5"
    gen = dict(max_new_tokens=12, do_sample=False, attention_mask=am, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **gen), eager.generate(ids, **gen))


def test_gemma2_softcap_matters():
    """Soft-capping at 0.5 changes the logits: the match above is not an accident of small scores."""
    eager, ours = _pair(_gemma2)
    ids = torch.randint(1, VOCAB, (1, 17))
    with torch.no_grad():
        want = eager(ids).logits
        for layer in ours.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert _rel(ours(ids).logits, want) > 1e-3


def _bert(dropout):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, attention_probs_dropout_prob=dropout)
    return transformers.BertForMaskedLM, config


def _train_step(model, ids, labels, seed):
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(grads, want):
    """Every gradient within 1e-4 of the largest (the key biases' gradient is zero up to rounding: softmax does not
    see a constant added to a row). A fixed bound, and why: two float32 training steps of a whole model whose
    attention differs only in rounding, with no float64 twin of dropout's model to measure against; 1e-4 is ~800
    float32 ulps at the largest gradient, and a wrong mask, scale or dropout position moves gradients by > 1e-2."""
    top = max(g.abs().max().item() for g in want.values())
    for name, g in grads.items():
        err = (g - want[name]).abs().max().item()
        assert err <= 1e-4 * top, f"{name}: {err:.2e} vs largest gradient {top:.2e}"


def test_bert_training_step_with_default_dropout_equals_the_oracle():
    """model.train() with attention dropout 0.1 (the default): runs, and with one seed the tiled backend and the
    oracle backend drop the same weights, so loss and gradients agree."""
    assert _bert(0.1)[1].attention_probs_dropout_prob == transformers.BertConfig().attention_probs_dropout_prob
    _, ours = _pair(lambda: _bert(0.1))
    _, oracle = _pair(lambda: _bert(0.1), impl=ORACLE)
    ids = torch.randint(1, VOCAB, (3, 23))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    loss, grads = _train_step(ours, ids, labels, seed=7)
    loss_o, grads_o = _train_step(oracle, ids, labels, seed=7)
    assert abs(loss - loss_o) <= 1e-5 * abs(loss_o), (loss, loss_o)  # ~80 float32 ulps: see _close for why fixed
    _close(grads, grads_o)
    loss2, _ = _train_step(ours, ids, labels, seed=8)
    assert loss2 != loss, "another seed drops other weights"


def test_bert_without_dropout_equals_eager_in_training():
    eager, ours = _pair(lambda: _bert(0.0))
    cfg = copy.deepcopy(eager.config)
    cfg.hidden_dropout_prob = 0.0
    ids = torch.randint(1, VOCAB, (2, 19))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
    loss_e, grads_e = _train_step(eager, ids, labels, seed=3)
    loss, grads = _train_step(ours, ids, labels, seed=3)
    assert abs(loss - loss_e) <= 1e-5 * abs(loss_e)  # ~80 float32 ulps: see _close for why fixed
    _close(grads, grads_e)
