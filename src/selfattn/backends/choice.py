"""How the registry chooses a backend for a call: a measured table for this device, else the static order.

A *call kind* is a small hashable description of a call (``call_kind``): the device type, the dtype, the mask's
kind (none, causal, window, documents, padding, dense, custom, each "+bias" with a bias), the score modifier's kind,
sinks, dropout, gradients, grouped-query or not, decoding (N_q <= ``DECODE_MAX_Q``) or prefill, and N_k rounded up
to a bucket of ``N_BUCKETS``. ``selfattn tune`` times every backend that can serve each kind on this machine and
writes a *table*: for each kind, the backends fastest first. The table is keyed by the device's name (the CPU model
and its vector capability, or the GPU's name) and torch's major.minor version.

Tables are looked up, first match wins, in ``$SELFATTN_TABLE`` (a file; "none" means the static order), then the
user's own under ``~/.cache/selfattn/tables/`` (``$XDG_CACHE_HOME`` respected; ``selfattn tune`` writes there), then
the ones shipped in ``selfattn/backends/tables/``. A kind the table lacks takes the entry of the nearest N bucket
of the same kind; a kind with no entry at all, or a device without a table, takes the registry's order (the
*static order*, docs/design.md). Backends the table ranks come first, in its order, then every other registered
backend in registry order; the first that can serve the call is chosen. A backend registered after the table was
measured (not in it) therefore only serves what the ranked ones decline, until the table is measured again.

The choice is memoised per call signature (shapes, dtype, device, the mask's and modifier's structure, bias shape,
gradients), so a repeated call costs a dictionary lookup.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import platform

import torch

from selfattn.backends.base import AttentionCall

N_BUCKETS = (128, 512, 2048, 8192, 32768)  # N_k rounded up to one of these (the last holds everything larger)
DECODE_MAX_Q = 16  # at most this many query rows against the keys: a decoding step (or a few speculative tokens)
TABLE_FORMAT = 1
SHIPPED_DIR = pathlib.Path(__file__).with_name("tables")


# ----------------------------------------------------------------------------------------------------- call kinds


def n_bucket(n: int) -> int:
    for b in N_BUCKETS:
        if n <= b:
            return b
    return N_BUCKETS[-1]


def mask_kind(call: AttentionCall) -> str:
    """none, causal, window, documents, padding, dense or custom; "+bias" when a bias is added."""
    kind = "none"
    if call.mask is not None:
        spec = call.mask.spec
        leaves = _leaves(spec) if spec is not None else None
        if leaves is None or _has_or(spec):
            kind = "custom"
        else:
            kinds = {leaf[0] for leaf in leaves}
            if "tensor" in kinds:
                kind = "dense"
            elif "document" in kinds:
                kind = "documents"
            elif "sliding_window" in kinds:
                kind = "window"
            elif kinds & {"key_padding", "key_range"}:
                kind = "padding"
            else:
                kind = "causal"
    return kind + ("+bias" if call.bias is not None else "")


def mod_kind(call: AttentionCall) -> str:
    """none, custom, or the ready-made modifiers joined by "+" (softcap, alibi, relative, t5)."""
    mod = call.score_mod
    if mod is None:
        return "none"
    if mod.spec is None:
        return "custom"
    from selfattn import score_mods

    return "+".join(leaf[0] for leaf in score_mods.leaves(mod.spec))


def call_kind(call: AttentionCall) -> tuple:
    """(device type, dtype, mask kind, modifier kind, sinks, dropout, fwd or fwd+bwd, gqa or mha, decode or
    prefill, N_k bucket): what the table is keyed by."""
    return (call.device.type, str(call.dtype).removeprefix("torch."), mask_kind(call), mod_kind(call),
            "sinks" if call.sinks is not None else "nosinks", "dropout" if call.dropout_p else "nodropout",
            "fwd+bwd" if call.needs_grad else "fwd", "gqa" if call.H_q != call.H_kv else "mha",
            "decode" if call.N_q <= DECODE_MAX_Q else "prefill", n_bucket(call.N_k))


def kind_key(kind: tuple) -> str:
    return "|".join(str(part) for part in kind)


def _leaves(spec: tuple) -> list[tuple]:
    if spec[0] in ("and", "or"):
        return _leaves(spec[1]) + _leaves(spec[2])
    return [spec]


def _has_or(spec: tuple) -> bool:
    return spec[0] == "or" or (spec[0] == "and" and (_has_or(spec[1]) or _has_or(spec[2])))


# ------------------------------------------------------------------------------------------ signatures (the memo)

def _skeleton(spec) -> tuple | None:
    """A spec with its tensors replaced by their shapes: what a backend's reasons can depend on."""
    if spec is None:
        return None
    return tuple(tuple(p.shape) if isinstance(p, torch.Tensor) else _skeleton(p) if isinstance(p, tuple) else p
                 for p in spec)


def _structure(obj) -> tuple | str:
    """The skeleton of a Mask's or ScoreMod's spec ("custom" without one), kept on the object: both are frozen and
    never change their spec, and an attribute is the cheapest lookup there is."""
    s = obj.__dict__.get("_choice_structure")
    if s is None:
        s = _skeleton(obj.spec) if obj.spec is not None else "custom"
        object.__setattr__(obj, "_choice_structure", s)
    return s


def signature(call: AttentionCall, blocks: bool) -> tuple:
    """Everything a backend's reasons and the table look at, cheaply: shapes, dtype, device, positions, the mask's
    and the modifier's structure, the bias's shape, gradients (``call.needs_grad``, inlined: this runs per call)."""
    bias, mod, mask, q, k, v, sinks = call.bias, call.score_mod, call.mask, call.q, call.k, call.v, call.sinks
    grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or (bias is not None and bias.requires_grad)
        or (sinks is not None and sinks.requires_grad) or (mod is not None and mod.trains))
    return (q.shape, k.shape, v.shape, q.dtype, q.device, None if mask is None else _structure(mask),
            None if bias is None else (bias.shape, bias.dtype, bias.requires_grad),
            None if mod is None else (_structure(mod), tuple(t.requires_grad for t in mod.captures)),
            sinks is not None, call.dropout_p, grad, call.q_pos0, call.k_pos0, blocks)


def pinned() -> str | None:
    """``$SELFATTN_BACKEND``, read once (``reset`` reads it again): the backend every unnamed call gets."""
    global _PINNED
    if _PINNED is _UNREAD:
        _PINNED = os.environ.get("SELFATTN_BACKEND") or None
    return _PINNED


_UNREAD = object()
_PINNED = _UNREAD


# ----------------------------------------------------------------------------------------------------- the tables


def cpu_name() -> str:
    """The CPU's model and vector capability, e.g. "AMD EPYC 9B14 [AVX512]" (what a CPU table is keyed by)."""
    return _cpu_name()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC 9B14" (Linux's /proc/cpuinfo, else what ``platform`` knows): the one
    reader the tables and every benchmark's machine record use."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown CPU"


def machine() -> dict:
    """What every benchmark records beside its numbers: the CPU model, ``get_cpu_capability()``, the ISA overrides in
    force (``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA``, which emulate another machine), torch's version, its
    threads, the cores and the load average when asked."""
    return {"cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cores": os.cpu_count(), "loadavg": list(os.getloadavg()),
            "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}}


def _cpu_name() -> str:
    return f"{cpu_model()} [{torch.backends.cpu.get_cpu_capability()}]"


def device_name(device_type: str) -> str:
    """The name a table for this device type is keyed by: ``cpu_name()``, or the current CUDA GPU's name."""
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    if device_type == "cpu":
        return cpu_name()
    return device_type


def torch_version() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def user_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "selfattn" / "tables"


class Table:
    """A measured ranking for one device and torch version: kind key -> backend names, fastest first."""

    def __init__(self, data: dict, path: str):
        self.data, self.path = data, path
        self.device, self.torch = data["device"], data["torch"]
        self.entries: dict[str, list[str]] = {k: e["order"] for k, e in data["entries"].items()}
        self._by_rest: dict[str, list[int]] = {}  # the kind without its bucket -> buckets measured
        for key in self.entries:
            rest, bucket = key.rsplit("|", 1)
            self._by_rest.setdefault(rest, []).append(int(bucket))

    def order(self, kind: tuple) -> list[str] | None:
        key = kind_key(kind)
        if key in self.entries:
            return self.entries[key]
        rest, bucket = key.rsplit("|", 1)
        buckets = self._by_rest.get(rest)
        if not buckets:
            return None
        nearest = min(buckets, key=lambda b: (abs(b.bit_length() - int(bucket).bit_length()), -b))
        return self.entries[f"{rest}|{nearest}"]


def _candidates() -> list[pathlib.Path]:
    paths = []
    for folder in (user_dir(), SHIPPED_DIR):
        if folder.is_dir():
            paths += sorted(folder.glob("*.json"))
    return paths


def load_table(path: str | os.PathLike) -> Table:
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path}: table format {data.get('format')!r}, expected {TABLE_FORMAT}; run `selfattn tune` "
                         "again")
    return Table(data, str(path))


_TABLES: dict[str, Table | None] = {}


def table_for(device_type: str) -> Table | None:
    """The table in use for a device type (None: the static order); looked up once per process (``reset``)."""
    if device_type in _TABLES:
        return _TABLES[device_type]
    found = None
    forced = os.environ.get("SELFATTN_TABLE")
    if forced:
        if forced.lower() not in ("none", "static"):  # the named file, whatever device it was measured on
            found = load_table(forced)
    else:
        name, version = device_name(device_type), torch_version()
        for path in _candidates():
            try:
                table = load_table(path)
            except (OSError, ValueError, KeyError):
                continue  # a broken or old file is passed over; `selfattn info` lists what is in use
            if table.device == name and table.torch == version:
                found = table
                break
    _TABLES[device_type] = found
    return found


def describe(device_type: str) -> str:
    """One line for ``selfattn info``: which table is in use for the device type and where it came from."""
    name = device_name(device_type)
    table = table_for(device_type)
    if table is None:
        why = ("SELFATTN_TABLE=" + os.environ["SELFATTN_TABLE"]) if os.environ.get("SELFATTN_TABLE") else \
            f"none measured for {name!r} with torch {torch_version()}"
        return f"{device_type}: static order (registry order; {why}; `selfattn tune` measures one)"
    return f"{device_type}: table for {table.device!r}, torch {table.torch}, {len(table.entries)} call kinds, from " \
           f"{table.path}"


def reset() -> None:
    """Forget the tables found, the memoised choices and SELFATTN_BACKEND's value (after writing a table, or
    changing SELFATTN_TABLE or SELFATTN_BACKEND)."""
    global _PINNED
    _TABLES.clear()
    MEMO.clear()
    _PINNED = _UNREAD


MEMO: dict[tuple, object] = {}
MEMO_MAX = 4096
