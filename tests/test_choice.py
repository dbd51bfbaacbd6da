"""The chooser: measured tables, the static order, the memo, SELFATTN_BACKEND, and no float64 oracle by surprise.

CUDA calls are described without a GPU: the call's tensors stay on the CPU and ``AttentionCall.device`` says cuda,
so the registry's reasons and ranking are what is tested, not a kernel (benchmarks/gpu_session.sh runs those).
"""

import json

import pytest
import torch

import selfattn
from selfattn import backends, masks, score_mods
from selfattn.backends import AttentionCall, BackendError, choice, triton_flash


@pytest.fixture
def fresh(monkeypatch):
    """A clean memo and table lookup before and after (tables are found once per process)."""
    monkeypatch.delenv("SELFATTN_BACKEND", raising=False)
    choice.reset()
    yield
    choice.reset()


@pytest.fixture
def on_cuda(monkeypatch, fresh):
    """Calls that say they are on a CUDA device, with Triton taken as installed and a GPU as present."""
    monkeypatch.setattr(AttentionCall, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(triton_flash, "_cuda_available", lambda: True)
    monkeypatch.setattr(triton_flash, "_triton_installed", lambda: True)
    monkeypatch.setattr(choice, "device_name", lambda device_type: "NVIDIA H100 80GB HBM3")


def _call(N=64, H_q=4, H_kv=2, dtype=torch.bfloat16, grad=False, **kw):
    q = torch.randn(1, H_q, N, 64, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(1, H_kv, N, 64, dtype=dtype, requires_grad=grad) for _ in range(2))
    return selfattn.api.make_call(q, k, v, **kw)


def test_cuda_custom_score_mod_and_trainable_bias_table_reach_flex_not_the_oracle(on_cuda):
    custom = _call(causal=True, score_mod=lambda s, b, h, q, k: s * 0.5, grad=True)
    table = torch.zeros(4, 2 * 8 + 1, requires_grad=True)
    trained = _call(causal=True, score_mod=score_mods.relative_bias(table), grad=True)
    for call in (custom, trained):
        assert backends.choose(call).name == "flex", backends.get("triton").not_supported_reasons(call)
    assert backends.choose(_call(causal=True)).name == "triton"  # the static order: our kernels first on CUDA


def test_the_oracle_is_never_chosen_on_cuda(on_cuda, monkeypatch):
    monkeypatch.setattr(type(backends.get("flex")), "unavailable_reasons", lambda self: ["FlexAttention missing"])
    call = _call(causal=True, score_mod=lambda s, b, h, q, k: s * 0.5)
    with pytest.raises(BackendError) as e:
        backends.choose(call)
    message = str(e.value)
    for name in backends.names():
        assert f"  {name}: " in message, message
    assert "never chosen automatically on cuda" in message and "backend='reference'" in message, message
    assert backends.choose(call, "reference").name == "reference"  # named, it runs


def test_the_oracle_is_not_chosen_for_a_large_cpu_call(fresh, monkeypatch):
    tiled = type(backends.get("tiled"))
    monkeypatch.setattr(tiled, "call_reasons", lambda self, call: ["taken away for this test"])
    q = torch.randn(1, 1, 2400, 16, dtype=torch.float64)  # 2400² float64 scores x 6 matrices: ~264 MiB
    with pytest.raises(BackendError, match="over the 256 MiB"):
        backends.choose(selfattn.api.make_call(q, q, q))
    small = q[:, :, :300]
    assert backends.choose(selfattn.api.make_call(small, small, small)).name == "reference"


def test_selfattn_backend_pins_a_backend(fresh, monkeypatch):
    call = _call(dtype=torch.float32, causal=True)
    monkeypatch.setenv("SELFATTN_BACKEND", "sdpa")
    choice.reset()  # the variable is read once
    assert backends.choose(call).name == "sdpa"
    window = _call(N=4096, H_q=2, H_kv=2, dtype=torch.float32, mask=masks.sliding_window(64))
    with pytest.raises(BackendError, match="pinned by SELFATTN_BACKEND"):
        backends.choose(window)  # a 4096² dense mask is over sdpa's limit
    monkeypatch.setenv("SELFATTN_BACKEND", "reference")
    choice.reset()
    assert backends.choose(call).name == "reference"


def test_a_measured_table_ranks_the_backends(fresh, monkeypatch, tmp_path):
    causal = _call(N=300, dtype=torch.float32, causal=True)
    window = _call(N=300, dtype=torch.float32, mask=masks.sliding_window(16))
    first = "native" if not backends.get("native").unavailable_reasons() else "tiled"  # the static order's CPU head
    assert backends.choose(causal).name == first
    entries = {choice.kind_key(choice.call_kind(causal)): {"order": ["sdpa", "tiled"], "ms": {}},
               choice.kind_key(choice.call_kind(window)): {"order": ["not-registered", "tiled", "sdpa"], "ms": {}}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": choice.TABLE_FORMAT, "device": choice.cpu_name(),
                                "torch": choice.torch_version(), "entries": entries}))
    monkeypatch.setenv("SELFATTN_TABLE", str(path))
    choice.reset()
    assert backends.choose(causal).name == "sdpa"
    assert backends.choose(window).name == "tiled"
    longer = _call(N=1500, dtype=torch.float32, causal=True)  # bucket 2048, not measured: the nearest (512) rules
    assert backends.choose(longer).name == "sdpa"
    assert [b.name for b in backends.ranked(causal)][:2] == ["sdpa", "tiled"]
    assert "table for" in choice.describe("cpu") and str(path) in choice.describe("cpu")
    monkeypatch.setenv("SELFATTN_TABLE", "none")
    choice.reset()
    assert backends.choose(causal).name == first and "static order" in choice.describe("cpu")


def test_the_choice_is_memoised_and_a_registry_change_forgets_it(fresh):
    call = _call(dtype=torch.float32, causal=True)
    first = backends.choose(call)
    assert choice.MEMO and backends.choose(call) is first
    assert backends.choose(_call(dtype=torch.float32, causal=True)) is first  # same signature, new tensors
    toy = type(backends.get("sdpa"))(name="toy-first", description="test")
    backends.register(toy, before=backends.names()[0])
    try:
        assert not choice.MEMO
        assert backends.choose(call).name == "toy-first"
    finally:
        del backends.REGISTRY["toy-first"]
    assert backends.choose(call) is first


def test_call_kinds_name_what_the_table_is_keyed_by():
    kind = choice.call_kind(_call(N=1, H_q=8, H_kv=1, dtype=torch.float32, causal=True))
    assert kind[0] == "cpu" and kind[1] == "float32" and kind[2] == "causal" and "gqa" in kind
    q = torch.randn(1, 2, 3, 8)
    k = torch.randn(1, 2, 700, 8)
    decode = choice.call_kind(selfattn.api.make_call(q, k, k, mask=masks.document(torch.zeros(700, dtype=torch.long))
                                                     & masks.causal(), score_mod=score_mods.softcap(20.0)))
    assert decode[2:4] == ("documents", "softcap") and decode[-2:] == ("decode", 2048)


def test_the_machine_record_names_the_cpu_its_isa_and_the_overrides_in_force(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    info = choice.machine()
    assert info["cpu"] == choice.cpu_model() and info["cpu"]
    assert info["capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    assert info["env"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}  # a run under emulation says so in its result
    assert len(info["loadavg"]) == 3
    json.dumps(info)  # it goes into the result files as it is


def test_tune_merge_adds_to_a_table_and_refuses_another_machines(fresh, tmp_path):
    from selfattn import tune

    out = str(tmp_path / "table.json")
    small = dict(dtypes=["float32"], sizes=[64], modes=["fwd"], rounds=1, out=out)
    tune.tune(workloads=["causal"], **small)
    first = json.loads(open(out).read())
    tune.tune(workloads=["plain"], merge=True, **small)
    merged = json.loads(open(out).read())
    assert set(merged["entries"]) == set(first["entries"]) | {k.replace("|causal|", "|none|")
                                                                for k in first["entries"]}
    assert len(merged["entries"]) == 2 * len(first["entries"])
    assert merged["merged"] == [{k: first[k] for k in ("measured", "load_average", "rounds")}]
    tune.tune(workloads=["plain"], **small)  # without merge the file holds this run alone
    assert set(json.loads(open(out).read())["entries"]) == set(merged["entries"]) - set(first["entries"])
    other = {**merged, "device": "Some Other CPU [AVX2]"}
    open(out, "w").write(json.dumps(other))
    with pytest.raises(ValueError, match="Some Other CPU.*leave out --merge"):
        tune.tune(workloads=["plain"], merge=True, **small)
    assert json.loads(open(out).read()) == other  # refused before anything was measured or written
