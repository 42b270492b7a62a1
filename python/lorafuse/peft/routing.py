"""Which adapter a forward uses: per thread, with :func:`use_adapter` (the C++ AdapterScope stack, one
mechanism for C++ and Python layers)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence, Union

from .. import _C
from ..nn import scope as _scope
from .files import _check_name


@contextlib.contextmanager
def use_adapter(adapter_name: Union[str, Sequence[str]]) -> Iterator[None]:
    """For the current thread only, inside the ``with`` block: every lorafuse LoRA layer (Python and C++)
    runs adapter ``adapter_name`` instead of its active one; a layer without it runs as its base, and
    ``""`` runs the base model. Other threads are not affected, so each can serve its own adapter of one
    model at the same time. Scopes nest: the innermost open one decides, and one that closes out of order
    (a suspended generator) removes only itself. A layer with a merged adapter accepts only its active
    adapter. Activation checkpointing recomputes forward during backward: run backward inside the scope.

    A list gives one adapter per row of the batch (PEFT's ``adapter_names``): row i of every layer's input runs
    ``adapter_name[i]``, ``"__base__"`` (or ``""``) the base model; rows of adapters that a layer lacks run its base
    there. The base computes the whole batch at once and each row adds its own adapter (lorafuse.lora_multi_add), so a
    batch of many adapters costs about one forward; each row's output equals running it alone with its adapter. The
    list's length must divide the batch (generate repeats each row for beams and ``num_return_sequences``: the names
    follow). Training works too: each adapter's gradients are those of its rows. Names that no LoRA layer holds are a
    ValueError (all listed); a layer without a row's adapter runs its base for that row; adapters must be unmerged.
    C++ layers (a bound lorafuse model) follow the same list."""
    if not isinstance(adapter_name, str):
        names = tuple(adapter_name) if isinstance(adapter_name, (list, tuple)) else None
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError(
                "use_adapter: adapter_name: expected a str or a non-empty list of str (one per row), found "
                f"{adapter_name!r}"
            )
        rows = _C.RowAdapters(list(names), "use_adapter")  # checks the names: all known to some LoRA layer
        with _C._AdapterScope(rows):  # what C++ layers read
            token = _scope.enter(_scope.MixedBatch(rows))  # the same scope, as Python layers read it
            try:
                yield
            finally:
                _scope.exit(token)
        return
    _check_name(adapter_name, "use_adapter")
    scope = _C._AdapterScope(adapter_name)  # the C++ per-thread scope: Python and C++ layers both read it
    with scope:
        token = _scope.enter(adapter_name)  # the same scope, as Python layers read it
        try:
            yield
        finally:
            _scope.exit(token)


__all__ = ["use_adapter"]
