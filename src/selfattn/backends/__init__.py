"""The one registry of attention backends, in priority order, and the chooser.

``choose(call)`` ranks the backends by the measured table for this device and call kind (``choice``), else by the
registry's order (the static order), and takes the first with no reason to refuse; the choice is memoised per call
signature. ``SELFATTN_BACKEND=name`` in the environment (read on the first call; ``choice.reset()`` reads it
again), or ``backend=name``, pins one: a named backend that cannot
serve raises ``BackendError`` with its reasons. Nothing falls back silently. When nothing fits, the error lists every
backend and why, and how to insist on the float64 oracle.
"""

from __future__ import annotations

from selfattn.backends import choice
from selfattn.backends.base import AttentionCall, Backend, merge_by_lse
from selfattn.backends.native import BACKEND as _native  # loads the compiled kernel when a call first asks
from selfattn.backends.flex import BACKEND as _flex  # imports no FlexAttention (that happens when a call runs)
from selfattn.backends.reference import BACKEND as _reference
from selfattn.backends.sdpa import BACKEND as _sdpa
from selfattn.backends.tiled import BACKEND as _tiled
from selfattn.backends.triton_flash import BACKEND as _triton  # imports no Triton (that happens when a call runs)

__all__ = ["AttentionCall", "Backend", "BackendError", "merge_by_lse", "register", "get", "names", "choose", "REGISTRY",
           "ranked"]


class _Registry(dict):
    """name -> Backend in priority order; any change forgets the memoised choices."""

    def __setitem__(self, key, value):
        choice.MEMO.clear()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        choice.MEMO.clear()
        super().__delitem__(key)

    def pop(self, *args):
        choice.MEMO.clear()
        return super().pop(*args)

    def clear(self):
        choice.MEMO.clear()
        super().clear()

    def update(self, *args, **kwargs):
        choice.MEMO.clear()
        super().update(*args, **kwargs)


# Priority order (the static order, docs/design.md): triton for CUDA, native (the C++ kernel) then tiled for the
# CPU, then sdpa and flex for what those decline, then the oracle (chosen automatically only on the CPU, and only for
# small calls).
REGISTRY: dict[str, Backend] = _Registry()


class BackendError(ValueError):
    """No backend (or not the named one) can serve this call; the message says why for each."""


def register(backend: Backend, *, before: str | None = None) -> None:
    """Add a backend; ``before`` names the backend it should take priority over (default: lowest priority)."""
    if backend.name in REGISTRY:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    items = list(REGISTRY.items())
    at = len(items) if before is None else [n for n, _ in items].index(before)
    items.insert(at, (backend.name, backend))
    REGISTRY.clear()
    REGISTRY.update(items)


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Backend:
    try:
        return REGISTRY[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; registered backends: {names()}") from None


def ranked(call: AttentionCall) -> list[Backend]:
    """The registered backends in the order the chooser tries them for this call: those the device's table ranks
    for the call's kind (fastest first), then the rest in registry order."""
    table = choice.table_for(call.device.type)
    order = table.order(choice.call_kind(call)) if table is not None else None
    if not order:
        return list(REGISTRY.values())
    first = [REGISTRY[n] for n in order if n in REGISTRY]
    return first + [b for b in REGISTRY.values() if b not in first]


def choose(call: AttentionCall, name: str | None = None, *, blocks: bool = False) -> Backend:
    """The backend for ``call``: the named one (or ``$SELFATTN_BACKEND``), else the first of ``ranked(call)`` that
    can serve it (``blocks``: only backends with the block API). Memoised per call signature."""
    if name is None:
        name = choice.pinned()
    key = (choice.signature(call, blocks), name)  # a named backend's reasons depend on the signature alone, too
    backend = choice.MEMO.get(key)
    if backend is None:
        backend = _first_able(call, blocks) if name is None else _named(call, name, blocks)
        if len(choice.MEMO) >= choice.MEMO_MAX:
            choice.MEMO.clear()
        choice.MEMO[key] = backend
    return backend


def _named(call: AttentionCall, name: str, blocks: bool) -> Backend:
    backend = get(name)
    reasons = backend.not_supported_reasons(call)
    if blocks and not backend.supports_blocks:
        reasons.append("computes no blocks (supports_blocks=False), which this caller needs")
    if reasons:
        able = [n for n, b in REGISTRY.items() if not b.not_supported_reasons(call)
                and (b.supports_blocks or not blocks)]
        pinned = " (pinned by SELFATTN_BACKEND)" if choice.pinned() == name else ""
        raise BackendError(
            f"backend {name!r}{pinned} cannot serve this call ({call.describe()}): " + "; ".join(reasons)
            + (f". Backends that can: {able}, or pass backend=None to choose automatically." if able else
               ". No registered backend can serve it.")
        )
    return backend


def _first_able(call: AttentionCall, blocks: bool) -> Backend:
    for backend in ranked(call):
        # a backend that cannot run here or on this device is passed over without listing its other reasons: the
        # full list is only needed for the error below
        if backend.unavailable_reasons() or call.device.type not in backend.device_types():
            continue
        if blocks and not backend.supports_blocks:
            continue
        if not (backend.not_supported_reasons(call) or backend.auto_reasons(call)):
            return backend
    why = {n: (["computes no blocks"] if blocks and not b.supports_blocks else [])
           + (b.not_supported_reasons(call) or b.auto_reasons(call)) for n, b in REGISTRY.items()}
    insist = ""
    if "reference" in REGISTRY and not REGISTRY["reference"].not_supported_reasons(call):
        insist = ("\nTo run it anyway on the float64 oracle (O(N_q·N_k) memory, slow), pass backend='reference' "
                  "(or set SELFATTN_BACKEND=reference).")
    raise BackendError(
        f"no backend can serve this call ({call.describe()}):\n"
        + "\n".join(f"  {n}: {'; '.join(r)}" for n, r in why.items()) + insist
    )


register(_reference)
register(_tiled, before="reference")
register(_native, before="tiled")  # the fused C++ kernel; tiled takes what it declines
register(_sdpa, before="reference")
register(_flex, before="reference")
register(_triton, before=names()[0])  # first in priority: it declines, with its reasons, what it cannot serve
