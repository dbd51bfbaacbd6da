"""selfattn explain on the tiny GPT (selfattn.model): random weights, a checkpoint, and bad input from the CLI."""

import torch

from selfattn import cli, explain, testing
from selfattn.model.gpt import GPT, GPTConfig
from selfattn.model.train import TrainConfig, save_checkpoint

CONTEXT = GPTConfig().context
SMALL = GPTConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, context=32)


def test_explain_text_traces_every_layer_of_the_default_gpt():
    e = explain.explain_text("Hi, you!", layer=3, head=1, token=2)
    config = GPTConfig()
    assert e.weights.shape == (config.n_layer, config.n_head, 8, 8)
    assert e.tokens == tuple("Hi, you!") and (e.layer, e.head, e.trace.token) == (3, 1, 2)
    assert "blocks.3.attn (layer 3), head 1" in e.table() and "query token 2 ','" in e.table()
    torch.testing.assert_close(e.weights.sum(-1), torch.ones(4, 4, 8, dtype=torch.float64))
    assert (e.weights.triu(1) == 0).all(), "the GPT is causal"
    again = explain.explain_text("Hi, you!")
    assert torch.equal(again.weights, e.weights), "random weights are seeded: two runs agree bitwise"


def test_checkpoint_weights_are_the_ones_traced(tmp_path):
    torch.manual_seed(5)
    model = GPT(SMALL)
    save_checkpoint(str(tmp_path), model, TrainConfig(model=SMALL), step=1, history={})
    e = explain.explain_text("héllo", checkpoint=tmp_path, layer=1, head=3)
    assert e.tokens == ("h", "\\xc3", "\\xa9", "l", "l", "o")  # bytes: é is two tokens
    block = model.blocks[1]
    with torch.no_grad():
        x = model.blocks[0](model.embed(torch.tensor([list("héllo".encode())])))
        xn = block.norm_attn(x)
        q, k, v = block.attn.project(xn)
        fast = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                                                 v.repeat_interleave(2, 1), is_causal=True)
        naive = testing.naive(q, k, v, causal=True)
    testing.check_against_oracle(fast[0, 3], naive[0, 3], e.traces[1][3]["Y"], what="head 3 of layer 1")


def test_cli_explain_text_and_bad_input(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["explain", "abc", "--head", "2", "--out", str(out), "--no-png"]) == 0
    printed = capsys.readouterr().out
    assert "head 2" in printed and "query token 2 'c'" in printed
    assert (out / "explain.html").stat().st_size > 10_000
    for argv, message in ((["explain", ""], "the text is empty"),
                          (["explain", "abc", "--layer", "4"], "layer=4 is out of range: there are 4"),
                          (["explain", "abc", "--head", "-5"], "head=-5 is out of range"),
                          (["explain", "abc", "--token", "3"], "token=3 is out of range"),
                          (["explain", "x" * (CONTEXT + 1)], f"context is {CONTEXT} tokens"),
                          (["explain", "abc", "--checkpoint", str(tmp_path / "none")], "does not exist")):
        assert cli.main([*argv, "--out", str(out), "--no-png", "--no-html"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("selfattn explain: error:") and message in err, (argv, err)
