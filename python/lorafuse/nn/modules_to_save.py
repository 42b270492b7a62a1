"""A module that trains whole with an adapter (PEFT's ``modules_to_save``, e.g. a classification head)."""

from __future__ import annotations

import copy
from typing import Any, List, Optional

import torch
from torch import nn

from .. import _C
from . import scope as _scope
from .scope import MixedBatch
from .table_view import AdapterTableView


class ModulesToSave(AdapterTableView, nn.Module):
    """PEFT's ``ModulesToSaveWrapper``, with its names: ``original_module`` (the model's module, frozen) and
    ``modules_to_save[adapter]``, a copy per adapter made when the adapter is added; the active adapter's copy trains.

    Forward runs the copy of the adapter a LoRA layer would run (the active one, or :func:`lorafuse.use_adapter`'s;
    with one adapter per row, each row's copy), and the original where there is none: disabled adapters, no active
    adapter, an adapter without a copy here, ``"__base__"`` rows. Attributes the wrapper lacks are read from the module
    that runs (as PEFT: ``model.classifier.weight`` is the active copy's). :func:`lorafuse.merge_and_unload` and
    :func:`lorafuse.unload` put the active adapter's copy in the wrapper's place.

    Args:
        module: the module to keep whole (any ``nn.Module`` but containers, LoRA and modules-to-save layers).
        adapter_name: the first adapter's name.
        options: the adapter's options (:class:`lorafuse.nn.AdapterOptions`), recorded in the wrapper's table.
        activate: make the adapter active (else the wrapper runs the original until :meth:`set_adapter`).
        copy_module: the adapter's copy, adopted as it is (``from_peft``: PEFT's own), instead of a new deep copy.
    """

    def __init__(
        self,
        module: nn.Module,
        adapter_name: str = "default",
        options: Optional[Any] = None,
        activate: bool = True,
        *,
        copy_module: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        check_saved_module(module, type(module).__name__)
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        # The adapters and the rules over them (active, enabled, what a scope runs): the C++ table, as LoRA layers.
        self._table = _C.AdapterTable()
        # What forward reads, recomputed whenever the table changes (Python values, replaced as a whole: other threads
        # may run forward): the names of the copies that run while adapters are enabled, and the active one's (None:
        # the original). The copy itself is looked up in modules_to_save at call time (FSDP or a user may replace it).
        self._running: frozenset = frozenset()
        self._active_name: Optional[str] = None
        for p in module.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, options, activate=activate, copy_module=copy_module)

    # ---- adapters -------------------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        options: Optional[Any] = None,
        *,
        activate: bool = True,
        copy_module: Optional[nn.Module] = None,
    ) -> None:
        """A copy of the original for ``adapter_name`` (frozen unless it becomes the active adapter); ``copy_module``
        is adopted as that copy instead of a new deep copy."""
        if options is None:
            options = _C.AdapterOptions(8)
        self._table.check_add(adapter_name, options, torch.float32)
        module = copy.deepcopy(self.original_module) if copy_module is None else copy_module
        for p in module.parameters():
            p.requires_grad_(False)
        self.modules_to_save[adapter_name] = module
        self._table.add(adapter_name, options, activate)
        self._apply_trainability()

    def set_adapter(self, adapter_name: str) -> None:
        self._table.check_activate(adapter_name)
        self._table.activate(adapter_name)
        self._apply_trainability()

    def clear_active_adapter(self) -> None:
        self._table.clear_active()
        self._apply_trainability()

    def delete_adapter(self, adapter_name: str) -> None:
        self._table.check_remove(adapter_name)
        self._table.remove(adapter_name)
        self._refresh()  # forward stops seeing it before its module goes
        del self.modules_to_save[adapter_name]
        self._apply_trainability()

    def disable_adapters(self) -> None:
        """The original from now on; every copy frozen until :meth:`enable_adapters` or :meth:`set_adapter` (PEFT)."""
        self._table.set_enabled(False)
        for module in self.modules_to_save.values():
            for p in module.parameters():
                p.requires_grad_(False)
        self._refresh()

    def enable_adapters(self) -> None:
        self._table.set_enabled(True)
        self._apply_trainability()

    def unloaded(self) -> nn.Module:
        """What merge_and_unload and unload put in the wrapper's place: the active adapter's copy, else the original."""
        active = self._table.active
        return self.modules_to_save[active] if active else self.original_module

    def _apply_trainability(self) -> None:
        for name, module in self.modules_to_save.items():
            train = self._table.trains(name)
            for p in module.parameters():
                p.requires_grad_(train)
        self._refresh()

    def _refresh(self) -> None:
        table = self._table
        self._running = frozenset(table.names) if table.enabled else frozenset()
        active = table.route(None)
        self._active_name = active or None

    def _running_module(self, name: Optional[str]) -> nn.Module:
        """Adapter ``name``'s copy when it runs here, else the original."""
        return self.modules_to_save[name] if name is not None and name in self._running else self.original_module

    # ---- forward --------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        name = self._active_name
        if _scope.open_scopes:
            stack = getattr(_scope.thread_scope, "stack", None)
            if stack:
                name = stack[-1][1]
                if isinstance(name, MixedBatch):
                    return self._mixed_forward(name, args, kwargs)
        # "" (the base) and names without a copy here: the original
        return self._running_module(name)(*args, **kwargs)

    def _mixed_forward(self, mixed: MixedBatch, args: tuple, kwargs: dict) -> Any:
        """One adapter per row of the input's first dimension: each group of rows through its adapter's copy (the
        rows grouped by the C++ RowAdapters)."""
        running = self._running  # one snapshot
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or len(args) > 1 or kwargs:
            raise ValueError(
                f"use_adapter with one adapter per row: the module kept whole here ({type(self.original_module).__name__}) "
                "is called with more than one input tensor, which lorafuse cannot split by rows; run each adapter's "
                "rows in a batch of their own"
            )
        rows = x.shape[0] if x.dim() >= 2 else 1
        groups = mixed.rows.row_groups(rows, sorted(running))
        if len(groups) == 1:
            return self._running_module(groups[0][0] or None)(x)
        out = None
        for name, indices in groups:
            index = torch.tensor(indices, dtype=torch.long, device=x.device)
            y = self._running_module(name or None)(x.index_select(0, index))
            if out is None:
                out = y.new_zeros((rows, *y.shape[1:]))
            out = out.index_copy(0, index, y)
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        modules = self.__dict__.get("_modules")
        if modules is None or "original_module" not in modules:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        active = self.__dict__.get("_active_name")
        copies = modules.get("modules_to_save")
        running = copies[active] if active is not None and active in self.__dict__.get("_running", ()) else None
        return getattr(running if running is not None else modules["original_module"], name)

    def extra_repr(self) -> str:
        return self._table.describe()


def check_saved_module(module: Any, path: str) -> None:
    """A TypeError naming ``path`` unless ``module`` can be kept whole: an nn.Module that runs (not a container) and
    is not a LoRA or modules-to-save layer (PEFT's rules)."""
    from . import is_lora_layer

    if not isinstance(module, nn.Module):
        raise TypeError(f"modules_to_save: \"{path}\": expected a torch.nn.Module, found {type(module).__name__}")
    if isinstance(module, (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)):
        raise TypeError(
            f'modules_to_save: "{path}" is a {type(module).__name__}, a container that cannot run; name the module '
            "inside it to train whole"
        )
    from .base_kinds import base_kind_of

    kind = base_kind_of(module)
    if kind is not None and not kind.selectable:
        raise ValueError(
            f'modules_to_save: "{path}" is a {type(module).__name__} ({kind.name}) that its owner never calls (an '
            "nn.MultiheadAttention reads its out_proj's weight itself), so a copy there would not run; keep the owner "
            "whole instead"
        )
    if is_lora_layer(module) or isinstance(module, ModulesToSave):
        raise TypeError(
            f'modules_to_save: "{path}" is a {type(module).__name__}; a module trains either whole (modules_to_save) '
            "or through LoRA, not both"
        )


def saved_state(module: nn.Module) -> List[tuple]:
    """A copy's state as PEFT saves it: its state_dict, detached."""
    return [(k, v.detach()) for k, v in module.state_dict(keep_vars=True).items()]


__all__ = ["ModulesToSave", "check_saved_module", "saved_state"]
