"""selfattn.explain: traced steps equal the oracle and a hand computation; captured models; JSON; PNGs; CLI; lessons."""

import json
import math

import pytest
import torch
from torch import nn

import selfattn
from selfattn import backends, cli, explain, reference, testing
from selfattn.explain import lessons
from selfattn.nn import MultiHeadAttention


class TwoLayers(nn.Module):
    """A model of our own built from selfattn.nn.MultiHeadAttention: explain must work for any such model."""

    def __init__(self, d=24, **kw):
        super().__init__()
        self.emb = nn.Embedding(256, d)
        self.first = MultiHeadAttention(d, 4, n_kv_heads=2, causal=True, rotary=True, bias=True, **kw)
        self.second = MultiHeadAttention(d, 4, causal=True, **kw)

    def forward(self, ids, mask=None):
        x = self.emb(ids)  # (B, N, d)
        x = x + self.first(x, mask=mask)
        return x + self.second(x, mask=mask)


def hand_steps(X, W_Q, W_K, W_V, i, causal):
    """Query row i the slow way, with Python loops over scalars: q_i, s_ij, a_ij, y_i."""
    X, W_Q, W_K, W_V = (t.tolist() for t in (X, W_Q, W_K, W_V))
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))
    col = lambda W, c: [row[c] for row in W]
    proj = lambda x, W: [dot(x, col(W, c)) for c in range(len(W[0]))]
    q = proj(X[i], W_Q)
    ks, vs = [proj(x, W_K) for x in X], [proj(x, W_V) for x in X]
    s = [dot(q, k) for k in ks]
    scaled = [v / math.sqrt(len(q)) for v in s]
    visible = [not causal or j <= i for j in range(len(X))]
    e = [math.exp(v) if ok else 0.0 for v, ok in zip(scaled, visible, strict=True)]
    a = [v / sum(e) for v in e]
    y = [sum(a[j] * vs[j][c] for j in range(len(X))) for c in range(len(vs[0]))]
    return q, s, scaled, a, y


def test_trace_of_given_matrices_follows_the_textbook_by_hand():
    N, d_model, d_k, d_v = 5, 6, 3, 2
    X, W_Q, W_K, W_V = (torch.randn(*s, dtype=torch.float64) for s in ((N, d_model), (d_model, d_k),
                                                                     (d_model, d_k), (d_model, d_v)))
    t = explain.trace_vectors(X, W_Q, W_K, W_V, causal=True, token=2, tokens="abcde")
    assert t.names == ["X", "W_Q", "W_K", "W_V", "Q", "K", "V", "scores", "scaled", "masked", "weights", "Y"]
    shapes = {s.name: s.shape for s in t.steps}
    assert shapes["Q"] == (N, d_k) and shapes["V"] == (N, d_v) and shapes["weights"] == (N, N)
    assert shapes["Y"] == (N, d_v)
    for i in range(N):
        q, s, scaled, a, y = hand_steps(X, W_Q, W_K, W_V, i, causal=True)
        for name, ours, hand in (("q", t["Q"][i], q), ("scores", t["scores"][i], s), ("scaled", t["scaled"][i], scaled),
                                 ("weights", t["weights"][i], a), ("y", t["Y"][i], y)):
            torch.testing.assert_close(ours, torch.tensor(hand, dtype=torch.float64), msg=f"{name} of row {i}")
        assert torch.isinf(t["masked"][i, i + 1:]).all() and torch.isfinite(t["masked"][i, :i + 1]).all()
    table = t.table()
    assert "query token 2 'c'" in table and f"{t['weights'][2, 1].item():.4f}" in table


def test_fully_masked_row_traces_to_zeros_not_nan():
    torch.manual_seed(1)
    m = MultiHeadAttention(8, 2, causal=True)
    x = torch.randn(1, 4, 8)
    visible = torch.ones(4, 4, dtype=torch.bool)
    visible[1] = False  # query 1 sees nothing
    with explain.capture(m) as cap:
        m(x, mask=visible)
    t = cap.trace(0, 1, token=1)
    assert (t["weights"][1] == 0).all() and (t["Y"][1] == 0).all()
    assert torch.isfinite(t["weights"]).all() and torch.isfinite(t["Y"]).all()
    assert t["weights"][2].sum().item() == pytest.approx(1.0)


AVAILABLE = [name for name in backends.names() if not backends.get(name).unavailable_reasons()]


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_captured_model_traces_recompose_the_fast_output(dtype, backend):
    """The heads' traced y_i, concatenated and put through W_O, give what the layer computed on its own backend."""
    q = torch.zeros(2, 4, 11, 6, dtype=dtype, requires_grad=True)  # the layers' calls: (B, H, N, D), trainable
    reasons = backends.get(backend).not_supported_reasons(selfattn.api.make_call(q, q, q, causal=True))
    if reasons:
        pytest.skip(f"{backend} does not serve the layers' calls: {'; '.join(reasons)}")
    torch.manual_seed(2)
    model = TwoLayers(backend=backend).to(dtype)
    ids = torch.randint(0, 256, (2, 11))
    outputs = {}
    hooks = [mod.register_forward_hook(lambda mod, a, out, n=n: outputs.__setitem__(n, out))
             for n, mod in (("first", model.first), ("second", model.second))]
    testing.poison_allocator()
    with explain.capture(model) as cap:
        model(ids)
    for h in hooks:
        h.remove()
    assert [c.name for c in cap.calls] == ["first", "second"] and cap.n_layers == 2
    for layer, name in enumerate(("first", "second")):
        mod, x = cap.calls[layer].module, cap.calls[layer].x
        for b in range(2):
            traces = [cap.trace(layer, h, batch=b) for h in range(4)]
            y = torch.cat([t["Y"] for t in traces], dim=-1)  # (N, H·D) float64
            bias = None if mod.W_O.bias is None else mod.W_O.bias.double()
            oracle = nn.functional.linear(y, mod.W_O.weight.double(), bias)  # (N, d) float64
            q, k, v = mod.project(x[b:b + 1])
            naive = testing.naive(q, k, v, causal=True)  # same dtype, the textbook without care
            naive = mod.W_O(naive.transpose(1, 2).reshape(1, 11, -1))[0]
            testing.check_against_oracle(outputs[name][b], naive, oracle, what=f"{name} batch {b}")
            w_layer = cap.weights(layer)[b]  # (H, N, N)
            torch.testing.assert_close(torch.stack([t["weights"] for t in traces]), w_layer)
            _, w_module = mod(x[b:b + 1], return_weights=True)
            torch.testing.assert_close(w_layer.to(dtype), w_module[0], msg=f"layer {layer}: weights differ")


def test_captured_mask_and_batch_element_are_respected():
    torch.manual_seed(3)
    model = TwoLayers()
    ids = torch.randint(0, 256, (3, 7))
    lengths = torch.tensor([7, 4, 2])
    pad = (torch.arange(7)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, N_k)
    with explain.capture(model) as cap:
        model(ids, mask=pad)
    t = cap.trace(1, 3, token=6, batch=2)
    assert (t["weights"][:, 2:] == 0).all(), "keys past the padding of batch element 2 must get no weight"
    _, w = model.second(cap.calls[1].x, mask=pad, return_weights=True)
    torch.testing.assert_close(t["weights"], w[2, 3].double())


def test_capture_errors_name_the_fix():
    model = TwoLayers()
    with pytest.raises(ValueError, match="contains no selfattn.nn.MultiHeadAttention"):
        explain.capture(nn.Linear(3, 3))
    cap = explain.capture(model)
    with pytest.raises(ValueError, match="nothing was captured"):
        cap.trace(0, 0)
    with cap:
        model(torch.randint(0, 256, (1, 5)))
    with pytest.raises(ValueError, match=r"layer=2 is out of range: there are 2"):
        cap.trace(2, 0)
    with pytest.raises(ValueError, match=r"head=4 is out of range: there are 4"):
        cap.trace(0, 4)
    with pytest.raises(ValueError, match=r"token=5 is out of range"):
        cap.trace(0, 0, token=5)
    with pytest.raises(ValueError, match="give one label per row"):
        cap.trace(0, 0, tokens=["a", "b"])
    assert not model.first._forward_pre_hooks, "the hooks must be removed on exit"


def test_explain_model_traces_every_head_and_restores_training_mode():
    model = TwoLayers().train()
    e = explain.explain_model(model, torch.tensor([list(b"hello")]), list("hello"), layer=-1, head=2, token=0)
    assert model.training
    assert (e.layer, e.head, e.trace.token) == (1, 2, 0)
    assert e.weights.shape == (2, 4, 5, 5)
    torch.testing.assert_close(e.weights.sum(-1), torch.ones(2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="head=7 is out of range"):
        explain.explain_model(model, torch.tensor([list(b"hi")]), list("hi"), head=7)


JSON_OK = {"tokens": ["the", "cat", "sat"], "X": [[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]],
           "W_Q": [[1, 0], [0, 1], [2, 0], [0, 1]], "W_K": [[1, 0], [0, 1], [1, 0], [0, 0]],
           "W_V": [[1, 0], [0, 1], [1, 1], [0, 0]], "causal": True}


def test_the_documented_example_file_is_the_documented_example():
    from pathlib import Path

    from selfattn.explain.trace import JSON_EXAMPLE

    example = Path(__file__).parents[1] / "docs" / "explain_example.json"
    assert json.loads(example.read_text()) == json.loads(JSON_EXAMPLE) == JSON_OK
    assert explain.trace_json(example).tokens == ("the", "cat", "sat")


def test_json_trace_equals_the_oracle(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps(JSON_OK))
    t = explain.trace_json(path)
    assert t.tokens == ("the", "cat", "sat") and t.token == 2 and t.causal
    X, W = torch.tensor(JSON_OK["X"], dtype=torch.float64), {k: torch.tensor(JSON_OK[k], dtype=torch.float64)
                                                              for k in ("W_Q", "W_K", "W_V")}
    out, w = reference.attention(*(m[None, None] for m in reference.project(X, W["W_Q"], W["W_K"], W["W_V"])),
                                 causal=True, return_weights=True)
    torch.testing.assert_close(t["weights"], w[0, 0])
    torch.testing.assert_close(t["Y"], out[0, 0])
    assert t["scores"][2].tolist() == [2.0, 1.0, 2.0]  # q_2 = (2, 1); k = (1, 0), (0, 1), (1, 0)


@pytest.mark.parametrize("text, message", [
    ('{"X": [[1, 2], [3, 4]],', "not valid JSON: .* line 1, column"),
    ("[1, 2]", "must hold a JSON object"),
    (json.dumps({**JSON_OK, "W_Q": [[1, 0], [0, 1]]}), r"W_Q has shape \(2, 2\) but X has d_model=4"),
    (json.dumps({**JSON_OK, "W_K": [[1], [0], [1], [0]]}), "W_Q .* and W_K .* must have the same shape"),
    (json.dumps({**JSON_OK, "X": [[1, 0, 0, 1], [0, 1]]}), "row 0 has 4 numbers but row 1 has 2"),
    (json.dumps({**JSON_OK, "X": [[1, "a", 0, 1]]}), r"X in .*\[0\]\[1\] must be a number"),
    (json.dumps({**JSON_OK, "tokens": ["a"]}), "got 1 token labels for N=3"),
    (json.dumps({k: v for k, v in JSON_OK.items() if k != "W_V"} | {"Wv": 1}), r"missing keys \['W_V'\]; unknown"),
    (json.dumps({**JSON_OK, "token": 3}), "token=3 is out of range"),
    (json.dumps({**JSON_OK, "causal": "yes"}), "causal must be true or false"),
    (json.dumps({**JSON_OK, "scale": "big"}), "scale must be a finite number"),
])
def test_bad_json_gets_a_clear_message(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        explain.trace_json(path)


def _png_is_a_picture(path, min_size=200):
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_size, (path, im.size)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 20, f"{path}: only {len(colours or [])} colours"


def test_heatmaps_per_head_and_grid(tmp_path):
    pytest.importorskip("matplotlib", reason="the heatmaps need the viz extra")
    e = explain.explain_model(TwoLayers(), torch.tensor([list(b"a cat")]), list("a cat"))
    paths = e.write_pngs(tmp_path)
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == sorted(
        [f"layer{layer}_head{h}.png" for layer in range(2) for h in range(4)] + ["grid.png"])
    for p in paths:
        _png_is_a_picture(p)
    from PIL import Image

    with Image.open(paths[0]) as im:  # causal: the hidden upper triangle is drawn grey, apart from weight 0
        grey = sum(n for n, c in im.convert("RGB").getcolors(1 << 20) if c == (0xD9, 0xD9, 0xD9))
        assert grey > 1000, f"only {grey} grey pixels for the masked cells"


def test_cli_explain_json_and_bad_input(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(JSON_OK))
    assert cli.main(["explain", "--json", str(path), "--token", "1", "--out", str(tmp_path / "o"), "--no-png"]) == 0
    out = capsys.readouterr().out
    assert "query token 1 'cat'" in out and "explain.html" in out
    assert (tmp_path / "o" / "explain.html").stat().st_size > 1000
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for argv, message in ((["--json", str(bad)], "not valid JSON"),
                          (["--json", str(path), "--token", "9"], "token=9 is out of range"),
                          (["hello", "--json", str(path)], "give one of TEXT, --json, --lesson")):
        assert cli.main(["explain", *argv, "--out", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("selfattn explain: error:") and message in err, err


def test_lesson_scaling_numbers():
    rows = lessons.scaling((4, 64, 1024), n_keys=32, n_queries=64)
    ent_scaled = [r["entropy_scaled"] for r in rows]
    ent_raw = [r["entropy_raw"] for r in rows]
    assert max(ent_scaled) - min(ent_scaled) < 0.2, ent_scaled
    assert ent_raw[0] > ent_raw[1] > ent_raw[2] and ent_raw[2] < 0.5 * ent_scaled[2], ent_raw
    assert rows[2]["grad_raw"] < 0.01 * rows[2]["grad_scaled"], rows[2]
    assert [round(r["score_std"] / math.sqrt(r["d_k"]), 0) for r in rows] == [1.0, 1.0, 1.0]
    text = lessons.scaling_text(rows)
    assert "1024" in text and f"{rows[2]['max_weight_raw']:.3f}" in text


def test_lesson_orthogonal_numbers(capsys):
    r = lessons.orthogonal()
    idn, lrn = r["cases"]["identity"], r["cases"]["learned"]
    assert (r["X"][0] @ r["X"][1]).item() == 0.0
    assert idn["scores"][1].item() == 0.0 and idn["exp"][1].item() == 1.0
    assert idn["weights"][1].item() == pytest.approx(1 / idn["exp"].sum().item())
    assert idn["influence"] > 0.1 and lrn["influence"] > 0.1
    assert abs(lrn["cos_qk"]) > 0.1, "the random projections should change the angle"
    assert cli.main(["explain", "--lesson", "orthogonal"]) == 0
    assert "e^0 = 1" in capsys.readouterr().out


def test_rotary_positions_per_sequence_are_respected():
    torch.manual_seed(4)
    m = MultiHeadAttention(16, 2, causal=True, rotary=True).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    positions = torch.stack([torch.arange(6), torch.arange(6) * 3 + 5])  # (B, N): different per sequence
    with explain.capture(m) as cap:
        m(x, positions=positions)
    _, w = m(x, positions=positions, return_weights=True)
    for b in range(2):
        torch.testing.assert_close(cap.trace(0, 1, batch=b)["weights"], w[b, 1])
    assert not torch.allclose(w[0, 1], w[1, 1])
