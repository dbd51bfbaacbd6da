"""The Triton backend's place in the registry, without running a kernel: lazy import, reasons, mask translation."""

import dataclasses
import subprocess
import sys

import pytest
import torch

import selfattn
from selfattn import backends, masks
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
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_flash.importlib.util, "find_spec", lambda name: None)
    assert any("triton not installed" in r for r in backends.get("triton").unavailable_reasons())
    monkeypatch.undo()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if triton_flash.importlib.util.find_spec("triton") is not None:
        assert backends.get("triton").unavailable_reasons() == ["no CUDA GPU"]


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
