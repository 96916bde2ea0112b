"""Which implementation the public functions run: the fused kernels or the reference."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

BACKENDS = ("fused", "reference")
_state = threading.local()


def current_backend() -> str:
    """The backend in effect on this thread ("fused" unless inside `backend(...)`)."""
    return getattr(_state, "name", "fused")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the public ops on `name`: "fused" (default) or "reference" (plain torch).

    Example:
        >>> with vae_fast.backend("reference"):
        ...     loss, ll, kl = vae_fast.elbo(logits, x, mu, logvar)
    """
    if name not in BACKENDS:
        raise ValueError(f"vae_fast.backend: unknown backend {name!r}; expected one of {BACKENDS}")
    previous = current_backend()
    _state.name = name
    try:
        yield
    finally:
        _state.name = previous
