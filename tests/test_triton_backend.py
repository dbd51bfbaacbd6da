"""The Triton backend's place in the registry, without running a kernel: lazy import, reasons, mask translation."""

import dataclasses
import subprocess
import sys

import pytest
import torch

import selfattn
from selfattn import backends, masks, score_mods
from selfattn.backends import triton_flash


def test_importing_selfattn_imports_no_triton_and_probes_no_gpu():
    code = ("import sys, selfattn; selfattn.backends.names(); "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not __import__('torch').cuda.is_initialized(), 'CUDA initialised'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_first_in_priority_and_cuda_only():
    assert backends.names()[0] == "triton"
    b = backends.get("triton")
    assert b.devices == frozenset({"cuda"}) and b.auto_devices == frozenset({"cuda"})


def test_reasons_name_what_is_missing(monkeypatch):
    def fresh():  # availability is asked once per process; forget it around the monkeypatches
        triton_flash._triton_installed.cache_clear()
        triton_flash._cuda_available.cache_clear()

    fresh()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_flash.importlib.util, "find_spec", lambda name: None)
    assert any("triton not installed" in r for r in backends.get("triton").unavailable_reasons())
    monkeypatch.undo()
    fresh()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if triton_flash.importlib.util.find_spec("triton") is not None:
        assert backends.get("triton").unavailable_reasons() == ["no CUDA GPU"]
    monkeypatch.undo()
    fresh()


def test_cpu_tensors_are_never_chosen_automatically(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even in interpreter mode (only read by the backend here)
    q = torch.randn(1, 1, 8, 16)
    call = selfattn.api.make_call(q, q, q, causal=True)
    assert backends.choose(call).name != "triton"
    if triton_flash.importlib.util.find_spec("triton") is not None:
        assert backends.get("triton").not_supported_reasons(call) == []
        assert any("name it" in r for r in backends.get("triton").auto_reasons(call))


def _call(B=2, N=10, mask=None, causal=False, **kw):
    """A call as a backend may receive it: a Mask goes in as given, past attention()'s checks of masks against the
    call's sizes (key lengths > N_k, ids for other lengths), so the kernels' own handling of them is reachable."""
    q = torch.randn(B, 2, N, 16)
    if mask is None or isinstance(mask, torch.Tensor):
        return selfattn.api.make_call(q, q, q, mask=mask, causal=causal, **kw)
    call = selfattn.api.make_call(q, q, q, causal=causal, **kw)
    return dataclasses.replace(call, mask=masks.causal() & mask if causal else mask)


def test_masks_become_kernel_arguments():
    lengths = masks.key_padding(torch.tensor([4, 20])) & masks.key_padding(torch.tensor([6, 7]))
    m = triton_flash.kernel_mask(_call(mask=masks.sliding_window(5) & masks.sliding_window(3) & lengths))
    assert (m.causal, m.window) == (True, 3)
    assert m.key_lengths.tolist() == [4, 7]  # the smaller of the two, clipped to N_k = 10
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    m = triton_flash.kernel_mask(_call(mask=masks.document(ids), causal=True))
    assert m.causal and m.runs is not None
    assert m.runs[0][0].tolist() == [0, 0, 0, 3, 3, 5, 5, 5, 5, 9]
    assert m.runs[1][0].tolist() == [3, 3, 3, 5, 5, 9, 9, 9, 9, 10]
    m = triton_flash.kernel_mask(_call(mask=masks.document(torch.tensor([0, 1, 0, 1, 1, 1, 2, 2, 2, 2]))))
    assert m.doc_ids is not None and m.runs is None  # document 0 in two runs: no block skipping, exact compare


def test_key_ranges_become_key_starts_and_lengths():
    rng = masks.key_range(torch.tensor([3, 0]), torch.tensor([9, 12])) & masks.key_range(torch.tensor([1, 4]))
    m = triton_flash.kernel_mask(_call(mask=masks.causal() & rng & masks.key_padding(torch.tensor([7, 20]))))
    assert m.causal and m.key_starts.tolist() == [3, 4] and m.key_lengths.tolist() == [7, 10]  # tightest, <= N_k
    right_only = triton_flash.kernel_mask(_call(mask=masks.key_padding(torch.tensor([2, 5]))))
    assert right_only.key_starts.tolist() == [0, 0] and right_only.key_lengths.tolist() == [2, 5]
    left_only = triton_flash.kernel_mask(_call(mask=masks.key_range(torch.tensor([2, 10]))))
    assert left_only.key_starts.tolist() == [2, 10] and left_only.key_lengths.tolist() == [10, 10]
    block = dataclasses.replace(_call(mask=masks.key_range(torch.tensor([2, 10]), torch.tensor([8, 12]))), k_pos0=4)
    m = triton_flash.kernel_mask(block)  # a block of keys at positions 4..13: the kernel counts rows from there
    assert m.key_starts.tolist() == [0, 6] and m.key_lengths.tolist() == [4, 8]


@pytest.mark.parametrize("kw, words", [
    (dict(mask=masks.Mask(lambda b, h, q, k: q != k)), "custom mask_mod"),
    (dict(mask=masks.causal() | masks.sliding_window(2)), "| of masks"),
    (dict(mask=torch.ones(10, 10, dtype=torch.bool)), "dense bool mask tensor"),
    (dict(mask=masks.document(torch.zeros(4, dtype=torch.long))), "document ids cover positions 0..3"),
    (dict(mask=masks.document(torch.zeros(10, dtype=torch.long)) & masks.document(torch.ones(10, dtype=torch.long))),
     "more than one document mask"),
    (dict(mask=masks.key_range(torch.tensor([1, 2, 3]))), "key_range starts have shape (3,)"),
], ids=["custom", "or", "tensor", "short-ids", "two-docs", "bad-starts"])
def test_masks_without_kernel_form_are_declined_with_the_reason(kw, words):
    assert any(words in r for r in backends.get("triton").call_reasons(_call(**kw)))


def test_a_mask_tensor_changed_in_place_is_translated_again():
    lengths = torch.tensor([3, 9])
    mask = masks.key_padding(lengths)
    assert triton_flash.kernel_mask(_call(mask=mask)).key_lengths.tolist() == [3, 9]
    lengths[0] = 5
    assert triton_flash.kernel_mask(_call(mask=mask)).key_lengths.tolist() == [5, 9]


def _mod_call(score_mod=None, B=2, H=2, N_q=6, N_k=10, **kw):
    q, k = torch.randn(B, H, N_q, 16), torch.randn(B, H, N_k, 16)
    return selfattn.api.make_call(q, k, k, score_mod=score_mod, **kw)


@pytest.mark.parametrize("mod, words", [
    (lambda: score_mods.ScoreMod(lambda s, b, h, q, k: s, "mine"), "score_mod 'mine' is a custom function"),
    (lambda: score_mods.softcap(2.0) >> score_mods.softcap(3.0), "more than one of its soft-caps"),
    (lambda: score_mods.alibi(torch.ones(2)) >> score_mods.alibi(torch.ones(2)), "more than one of its ALiBi terms"),
    (lambda: score_mods.alibi(torch.ones(3)), "alibi slopes have shape (3,)"),
    (lambda: score_mods.relative_bias(torch.zeros(2, 5, requires_grad=True)), "table requires grad"),
    (lambda: score_mods.relative_bias(torch.zeros(3, 5)), "relative_bias table has 3 rows"),
], ids=["custom", "two-softcaps", "two-alibis", "slopes-shape", "table-grad", "table-rows"])
def test_score_mods_without_kernel_form_are_declined_with_the_reason(mod, words):
    assert any(words in r for r in backends.get("triton").call_reasons(_mod_call(mod())))


def test_score_mods_become_kernel_arguments():
    cap, slopes = score_mods.softcap(2.0), torch.tensor([0.5, 0.25])
    table = torch.arange(14.0).view(2, 7)  # M = 3
    km = triton_flash.kernel_mod(_mod_call(score_mods.relative_bias(table) >> cap >> score_mods.alibi(slopes)))
    assert (km.softcap, km.rel, km.alibi) == (2.0, 1, 2)  # the table before the soft-cap, ALiBi after it
    assert km.slopes.shape == (1, 2)
    # distances k_pos − q_pos from the first key against the last query (0 − 9) to the last key against the first
    # query (9 − 4), each read from the table clamped to ±3
    assert km.rel_d0 == -9 and km.rel_bias.shape == (2, 6 + 10 - 1)
    d = torch.arange(-9, 6)
    assert torch.equal(km.rel_bias, table[:, d.clamp(-3, 3) + 3])
    t5 = torch.randn(2, 8)
    km = triton_flash.kernel_mod(_mod_call(score_mods.relative_bias(t5, buckets=8, max_distance=20)))
    assert (km.rel, km.softcap, km.alibi) == (2, 0.0, 0)
    assert torch.equal(km.rel_bias, t5[:, score_mods.t5_bucket(d, True, 8, 20)])
    km = triton_flash.kernel_mod(_mod_call(score_mods.alibi(torch.rand(2, 2))))
    assert km.slopes.shape == (2, 2) and km.alibi == 2


def test_dropout_becomes_the_hash_seed_and_threshold_as_int32_bits():
    km = triton_flash.kernel_mod(_mod_call(dropout_p=0.75, dropout_seed=2**40 + 7))
    assert km.dropout and km.drop_scale == 4.0
    assert km.thr == 3 * 2**30 - 2**32 and -(2**31) <= km.seed < 2**31
    assert km.seed % 2**32 == score_mods._mix((2**40 + 7) & 0xFFFFFFFF)
    assert any("rounds to 1" in r for r in backends.get("triton").call_reasons(_mod_call(dropout_p=1 - 2**-40)))
