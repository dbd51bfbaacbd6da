"""The tiny GPT: config checks, cached vs uncached generation, sampling, data, training, checkpoints, the CLI."""

import json
import os
from importlib.util import find_spec

import pytest
import torch

from selfattn import cli
from selfattn.model import GPT, GPTConfig, data
from selfattn.model import train as train_mod
from selfattn.model.generate import generate, sample_next, stream_tokens
from selfattn.model.train import TrainConfig, load_checkpoint, train

needs_train_extra = pytest.mark.skipif(
    find_spec("safetensors") is None or find_spec("matplotlib") is None,
    reason="checkpoints need safetensors and the loss curve matplotlib: pip install 'selfattn[train,viz]'")

TINY = GPTConfig(context=16, n_layer=2, n_head=2, d_model=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def _lively(config: GPTConfig, seed: int = 0) -> GPT:
    """A random model with large weights, so that greedy decoding wanders instead of repeating one byte."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5)
    return model.eval()


def test_config_refuses_bad_shapes_with_the_fix():
    with pytest.raises(ValueError, match="even size"):
        GPTConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="multiple of n_kv_head=3"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="context must be a positive int"):
        GPTConfig(context=0)
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({"n_layers": 3})


def test_weights_are_tied_and_shapes_follow_the_config():
    model = GPT(TINY)
    assert model.head.weight is model.embed.weight
    logits, loss = model(torch.randint(256, (3, 7)), torch.randint(256, (3, 7)))
    assert logits.shape == (3, 7, 256) and loss.ndim == 0
    with pytest.raises(ValueError, match="tokens\\[None\\]"):
        model(torch.randint(256, (7,)))


@pytest.mark.parametrize("n_kv_head", [None, 1], ids=["mha", "gqa"])
def test_cached_greedy_generation_equals_recomputing_for_500_tokens(n_kv_head):
    model = _lively(GPTConfig(context=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=64))
    prompt = torch.randint(256, (1, 7))
    steps = list(stream_tokens(model, prompt, 500, temperature=0, cache="full", return_logits=True))
    tokens = torch.stack([t for t, _ in steps], 1)  # (1, 500)
    cached_logits = torch.stack([lg for _, lg in steps], 1)  # (1, 500, vocab)
    assert len(set(tokens[0].tolist())) > 10, "the test model should not repeat one byte"
    with torch.no_grad():  # without a cache: every prefix recomputed in one causal pass over the whole sequence
        full = model(torch.cat((prompt, tokens[:, :-1]), 1))[:, prompt.shape[1] - 1:]  # (1, 500, vocab)
    rel = ((cached_logits - full).norm(dim=-1) / full.norm(dim=-1)).max().item()
    # cached vs recomputed, both float32: rtol 1e-5 ~ 84 ulps (run on the scalar, AVX2, AVX-512 kernels by make
    # test-portable); a wrong mask, scale or position moves values by > 1e-3
    assert rel <= 1e-5, f"cached logits differ from recomputed ones by {rel:.2e} (relative)"
    assert torch.equal(full.argmax(-1), tokens), "greedy tokens differ between cached and recomputed logits"
    uncached = torch.stack(list(stream_tokens(model, prompt, 40, temperature=0, cache="none")), 1)
    assert torch.equal(uncached, tokens[:, :40])


def test_window_cache_equals_full_cache_until_it_rolls_and_runs_on_after():
    model = _lively(TINY)
    prompt = torch.randint(256, (2, 5))
    full = torch.stack(list(stream_tokens(model, prompt, 30, temperature=0, cache="full")), 1)
    win = torch.stack(list(stream_tokens(model, prompt, 30, temperature=0, cache="window", window=40)), 1)
    assert torch.equal(full, win)
    rolled = torch.stack(list(stream_tokens(model, torch.randint(256, (1, 40)), 30, temperature=0,
                                            cache="window", window=8, sinks=2)), 1)
    assert rolled.shape == (1, 30)


def test_sampling_settings():
    logits = torch.randn(4, 256)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_next(logits, top_p=1e-6), logits.argmax(-1))
    top5 = torch.topk(logits, 5).indices
    draws = torch.stack([sample_next(logits, top_k=5, generator=torch.Generator().manual_seed(i)) for i in range(50)])
    assert all(torch.isin(draws[:, b], top5[b]).all() for b in range(4))
    model = _lively(TINY)
    a = generate(model, "ab", 20, seed=3, temperature=1.0, top_p=0.9)
    assert a == generate(model, "ab", 20, seed=3, temperature=1.0, top_p=0.9)
    streamed = []
    assert generate(model, "ab", 20, seed=3, temperature=1.0, top_p=0.9, stream=streamed.append) == "".join(streamed)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, "ab", 5, temperature=-1)
    with pytest.raises(ValueError, match="only used with cache='window'"):
        generate(model, "ab", 5, cache="full", window=8)


def test_data_bytes_split_and_errors(tmp_path):
    text = "héllo, wörld\n" * 10
    assert data.decode(data.encode(text)) == text
    assert data.decode([0xE2, 0x82]) == "\ufffd"  # a cut character does not raise
    default = data.load_splits(None, context=128)
    assert len(default.train) > 400_000 and abs(len(default.val) / (len(default.train) + len(default.val)) - 0.1) < 1e-3
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8.*iconv"):
        data.load_splits(str(bad))
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_splits(str(tmp_path / "missing.txt"))
    small = tmp_path / "small.txt"
    small.write_text("x" * 100)
    with pytest.raises(ValueError, match="shorter --context"):
        data.load_splits(str(small), context=64)


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(200)))
    return str(path)


def _cfg(tmp_path, out, **kw):
    base = dict(model=TINY, data=_corpus(tmp_path), out_dir=str(tmp_path / out), steps=8, batch_size=4, warmup=2,
                eval_every=4, progress=False, plot=False)
    base.update(kw)
    return TrainConfig(**base)


@needs_train_extra
def test_training_checkpoints_interruption_and_resume_repeat_the_straight_run(tmp_path, monkeypatch):
    straight = train(_cfg(tmp_path, "a", plot=True), log=lambda *a: None)
    assert straight["step"] == 8 and not straight["interrupted"]
    assert {"model.safetensors", "config.json", "state.pt", "loss.png"} <= set(os.listdir(tmp_path / "a"))
    assert len(straight["history"]["val_loss"]) == 2 and straight["history"]["train_loss"][-1] < 5.0

    calls = {"n": 0}
    batch = data.Splits.batch

    def interrupt_at_step_5(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return batch(self, *a, **kw)

    monkeypatch.setattr(data.Splits, "batch", interrupt_at_step_5)
    stopped = train(_cfg(tmp_path, "b"), log=lambda *a: None)
    assert stopped["interrupted"] and stopped["step"] == 5
    assert json.loads((tmp_path / "b" / "config.json").read_text())["step"] == 5
    assert not [f for f in os.listdir(tmp_path / "b") if ".tmp" in f]
    monkeypatch.setattr(data.Splits, "batch", batch)
    resumed = train(_cfg(tmp_path, "b"), resume=True, log=lambda *a: None)
    assert resumed["step"] == 8
    assert resumed["history"]["train_loss"] == straight["history"]["train_loss"]
    a, _ = load_checkpoint(str(tmp_path / "a"))
    b, config = load_checkpoint(str(tmp_path / "b" / "model.safetensors"))
    assert config == TINY
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), f"{name} differs between the straight and the interrupted-and-resumed run"


def test_training_refuses_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="at least one step"):
        _cfg(tmp_path, "x", steps=0)
    with pytest.raises(ValueError, match="shorter --context"):
        train(_cfg(tmp_path, "x", model=GPTConfig(context=8000, n_layer=1, d_model=32)), log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_cfg(tmp_path, "never"), resume=True, log=lambda *a: None)
    with pytest.raises(ValueError, match="min_lr"):
        _cfg(tmp_path, "x", lr=1e-3, min_lr=1e-2)


@needs_train_extra
def test_float16_training_uses_loss_scaling_and_stays_finite(tmp_path):
    r = train(_cfg(tmp_path, "h", steps=3, dtype="float16", eval_every=3), log=lambda *a: None)
    assert all(torch.isfinite(torch.tensor(r["history"]["train_loss"])))
    assert r["val_loss"] is not None and r["val_loss"] == r["val_loss"]


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    lrs = [train_mod.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[-1] == pytest.approx(1e-4, rel=0.01)


@needs_train_extra
def test_cli_train_then_generate(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--data", _corpus(tmp_path), "--out", out, "--steps", "3", "--batch-size", "2", "--context",
            "16", "--layers", "1", "--d-model", "32", "--heads", "2", "--eval-every", "3", "--no-progress",
            "--no-plot"]
    assert cli.main(args) == 0
    assert "held-out loss" in capsys.readouterr().out
    assert cli.main(["generate", "--checkpoint", out, "--prompt", "def ", "--tokens", "12", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert cli.main(["train", "--data", str(tmp_path / "nope.txt"), "--out", out]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["train", "--steps", "0", "--out", out]) == 2
    assert "at least one step" in capsys.readouterr().err


def _progress_lines(text: str) -> list[str]:
    """What a log viewer shows as lines: tqdm redraws with carriage returns, each redraw a line of the log."""
    return [seg for seg in text.replace("\r", "\n").split("\n") if seg.strip()]


@needs_train_extra
@pytest.mark.parametrize("interval_s", [train_mod.PROGRESS_INTERVAL_S, 0.0])
def test_progress_off_a_terminal_writes_a_few_lines_not_one_per_step(tmp_path, capsys, monkeypatch, interval_s):
    monkeypatch.setattr(train_mod, "PROGRESS_INTERVAL_S", interval_s)
    steps = 60
    result = train(_cfg(tmp_path, "p", steps=steps, eval_every=30, progress=True), log=lambda *a: None)
    assert result["step"] == steps
    captured = capsys.readouterr()
    lines = _progress_lines(captured.err)
    bars = [line for line in lines if "step/s" in line or "s/step" in line or f"/{steps}" in line]
    # a run of a few seconds: the first and last bar and a redraw around each of the 2 held-out lines; with no time
    # limit (interval 0), also at most one redraw per tenth of the run
    limit = 6 if interval_s else 6 + 10
    assert len(bars) <= limit, f"{len(bars)} progress lines for {steps} steps (limit {limit}):\n" + "\n".join(lines)
    assert f"{steps}/{steps}" in bars[-1], bars[-1]
    assert captured.out.count("held-out loss") == 2, captured.out
