"""Which adapter Python LoRA layers run on this thread: the stack of lorafuse.use_adapter scopes."""

from __future__ import annotations

import threading

# Per-thread adapter choice: lorafuse.use_adapter opens a C++ AdapterScope (what C++ layers read) and, in
# the same call, pushes the name onto this thread's stack here (what Python layers read: a Python value, so
# that torch.compile can trace and guard it). open_scopes counts the scopes open on any thread, so that
# forward looks at the thread-local stack only while some scope is open.
thread_scope = threading.local()
open_scopes = 0


class MixedBatch:
    """A scope's per-row adapters (use_adapter with a list): the C++ RowAdapters, whose plans (rows grouped by the
    adapters a layer has) every layer of a forward shares, C++ and Python alike."""

    def __init__(self, rows) -> None:
        self.rows = rows
        self.names = tuple(rows.names)


def enter(name) -> object:
    """Pushes ``name`` on this thread's stack; returns the token that removes it."""
    global open_scopes
    stack = getattr(thread_scope, "stack", None)
    if stack is None:
        stack = thread_scope.stack = []
    token = object()
    stack.append((token, name))
    open_scopes += 1
    return token


def exit(token: object) -> None:
    """Removes the entry of ``token`` wherever it is (generators may close scopes out of order)."""
    global open_scopes
    stack = getattr(thread_scope, "stack", [])
    for i in range(len(stack) - 1, -1, -1):
        if stack[i][0] is token:
            del stack[i]
            break
    open_scopes -= 1
