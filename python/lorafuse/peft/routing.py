"""Which adapter a forward uses: per thread, with :func:`use_adapter` (the C++ AdapterScope stack, one
mechanism for C++ and Python layers)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from .. import _C
from ..nn import lora_linear as _layer
from .files import _check_name


@contextlib.contextmanager
def use_adapter(adapter_name: str) -> Iterator[None]:
    """For the current thread only, inside the ``with`` block: every lorafuse LoRA layer (Python and C++)
    runs adapter ``adapter_name`` instead of its active one; a layer without it runs as its base, and
    ``""`` runs the base model. Other threads are not affected, so each can serve its own adapter of one
    model at the same time. Scopes nest: the innermost open one decides, and one that closes out of order
    (a suspended generator) removes only itself. A layer with a merged adapter accepts only its active
    adapter. Activation checkpointing recomputes forward during backward: run backward inside the scope."""
    _check_name(adapter_name, "use_adapter")
    scope = _C._AdapterScope(adapter_name)  # the C++ per-thread scope: Python and C++ layers both read it
    with scope:
        token = _layer._scope_enter(adapter_name)  # the same scope, as Python layers read it
        try:
            yield
        finally:
            _layer._scope_exit(token)


__all__ = ["use_adapter"]
