"""Model-wide merges and unloading: merge, unmerge, merge_and_unload and unload (PEFT's LoraModel), all or nothing."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from .. import _C
from ..nn import Linear, MergeError, ModulesToSave, is_lora_layer
from .model_tree import _check_not_tied, _model_wide, _sites, _tables, lora_layers


class _MergeTransaction:
    """Model-wide merges are all or nothing: on a failure the layers merged before it are put back
    (merging starts from the unmerged weight, so re-merging what was merged reproduces the same bits)."""

    def __init__(self) -> None:
        self.undo: List[Tuple[Linear, List[str], bool]] = []

    def merge(self, layer: Linear, names: Sequence[str], requantize: bool = False) -> None:
        self.undo.append((layer, list(layer.merged_adapters), not layer.adapters_enabled))
        layer.enable_adapters()
        layer.merge(names, requantize=requantize)

    def rollback(self) -> None:
        for layer, merged_before, was_disabled in reversed(self.undo):
            if layer.merged:
                layer.unmerge()
            if merged_before:
                # into 4 bits only ever with requantize (other bases ignore it); from the unmerged bytes: same bytes
                layer.merge(merged_before, requantize=True)
            if was_disabled:
                layer.disable_adapters()


def merge(
    model: nn.Module, adapter_names: Optional[Sequence[str]] = None, requantize: bool = False
) -> Dict[str, MergeError]:
    """Folds the named adapters (default, or an empty list: the active one) into the base weights, all or
    nothing; layers that have an adapter merged already keep it as it is, with a warning (as PEFT). A single name
    may be given as a str. 4-bit layers refuse (rounding to 4 bits again changes their
    outputs) unless ``requantize``; the result maps the path of every layer that holds a re-quantized merge (this
    call's or an earlier one's) to what the rounding cost (:class:`lorafuse.nn.MergeError`); ``unmerge`` restores
    the bytes exactly. Empty when nothing is rounded."""
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    return _merge(model, list(adapter_names or []), requantize)


def _cpp_merge_report(model: nn.Module, report: Dict[str, tuple]) -> Dict[str, MergeError]:
    return {path: MergeError(*errors) for path, errors in report.items()}


@_model_wide(_C._cpp_merge, result=_cpp_merge_report)
def _merge(model: nn.Module, adapter_names: List[str], requantize: bool) -> Dict[str, MergeError]:
    layers = lora_layers(model)
    plan = _C._rules_plan_merge(_tables(layers), adapter_names, "merge")
    _check_not_tied(model, [layer for layer, mine in zip(layers, plan) if mine], "merge")
    transaction = _MergeTransaction()
    try:
        for (_, layer), mine in zip(layers, plan):
            if mine:
                transaction.merge(layer, mine, requantize)
    except BaseException:
        transaction.rollback()
        raise
    return {path: layer.merge_error for path, layer in layers if layer.merge_error is not None}


@_model_wide(_C._cpp_unmerge)
def unmerge(model: nn.Module) -> None:
    """Restores every merged layer's base weight exactly."""
    layers = lora_layers(model)
    _C._rules_check_unmerge(_tables(layers), "unmerge")
    for _, layer in layers:
        if layer.merged:
            layer.unmerge()


@_model_wide(_C._cpp_merge_and_unload, result=lambda model, _: model)
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges the active adapter for good (also while disabled) and puts each plain ``nn.Linear`` back:
    the base model again, with the adapter inside its weights; a 4-bit base becomes a dense ``nn.Linear`` holding
    dequant(W) + the adapter in its compute dtype; a module kept whole (``modules_to_save``) becomes the active
    adapter's copy (PEFT). All or nothing. Returns ``model``."""
    sites = [(parent, name, m) for parent, name, _, m in _sites(model) if is_lora_layer(m)]
    dense = {id(layer): layer._unloaded_dense() for _, _, layer in sites}  # 4-bit bases; nothing changes yet
    in_place = [(path, m) for _, _, path, m in _sites(model) if is_lora_layer(m) and dense[id(m)] is None]
    _check_not_tied(model, [(p, m) for p, m in in_place if m._table.plan_unload()], "merge_and_unload")
    transaction = _MergeTransaction()
    try:
        for _, _, layer in sites:
            if dense[id(layer)] is None and layer._table.plan_unload():
                transaction.merge(layer, [layer.active_adapter])
    except BaseException:
        transaction.rollback()
        raise
    for parent, name, layer in sites:
        unloaded = dense[id(layer)]
        if unloaded is None:
            unloaded = layer.merge_and_unload()
        setattr(parent, name, unloaded)
    _unload_saved(model)
    return model


def _unload_saved(model: nn.Module) -> None:
    """Each modules-to-save layer's place: its active adapter's copy (the original when none is active), as PEFT."""
    for parent, name, _, wrapper in [site for site in _sites(model) if isinstance(site[3], ModulesToSave)]:
        setattr(parent, name, wrapper.unloaded())


@_model_wide(_C._cpp_unload, result=lambda model, _: model)
def unload(model: nn.Module) -> nn.Module:
    """Puts every LoRA layer's base back in its place, the adapters dropped (PEFT's ``unload()``): not merged — what
    a merge folded into a base stays there, as in PEFT. Save the adapters first (:func:`save_adapter`) to keep them.
    A module kept whole (``modules_to_save``) becomes the active adapter's copy, as PEFT's ``unload()`` leaves it.
    Returns ``model``."""
    for parent, name, _, layer in [site for site in _sites(model) if is_lora_layer(site[3])]:
        setattr(parent, name, layer.unloaded_base())
    _unload_saved(model)
    return model


__all__ = [
    "merge",
    "unmerge",
    "merge_and_unload",
    "unload",
]
