"""The one registry of attention backends, in priority order, and the chooser.

``choose(call)`` walks the list and takes the first backend with no reason to refuse; a named backend that cannot
serve raises ``BackendError`` with its reasons. Nothing falls back silently. When nothing fits, the error lists every
backend and why.
"""

from __future__ import annotations

from selfattn.backends.base import AttentionCall, Backend, merge_by_lse
from selfattn.backends.reference import BACKEND as _reference
from selfattn.backends.sdpa import BACKEND as _sdpa
from selfattn.backends.tiled import BACKEND as _tiled
from selfattn.backends.triton_flash import BACKEND as _triton  # imports no Triton (that happens when a call runs)

__all__ = ["AttentionCall", "Backend", "BackendError", "merge_by_lse", "register", "get", "names", "choose", "REGISTRY"]

# Priority order: the first that can serve a call is chosen (triton for CUDA, tiled for CPU, then the oracle).
REGISTRY: dict[str, Backend] = {}


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


def choose(call: AttentionCall, name: str | None = None) -> Backend:
    if name is not None:
        backend = get(name)
        reasons = backend.not_supported_reasons(call)
        if reasons:
            able = [n for n, b in REGISTRY.items() if not b.not_supported_reasons(call)]
            raise BackendError(
                f"backend {name!r} cannot serve this call ({call.describe()}): " + "; ".join(reasons)
                + (f". Backends that can: {able}, or pass backend=None to choose automatically." if able else
                   ". No registered backend can serve it.")
            )
        return backend
    for backend in REGISTRY.values():
        # a backend that cannot run here or on this device is passed over without listing its other reasons: the
        # choice is made on every call, and the full list is only needed for the error below
        if backend.unavailable_reasons() or call.device.type not in backend.device_types():
            continue
        if not (backend.not_supported_reasons(call) or backend.auto_reasons(call)):
            return backend
    why = {n: backend.not_supported_reasons(call) or backend.auto_reasons(call) for n, backend in REGISTRY.items()}
    raise BackendError(
        f"no backend can serve this call ({call.describe()}):\n"
        + "\n".join(f"  {n}: {'; '.join(r)}" for n, r in why.items())
    )


register(_reference)
register(_tiled, before="reference")
register(_sdpa, before="reference")
register(_triton, before=names()[0])  # first in priority: it declines, with its reasons, what it cannot serve
