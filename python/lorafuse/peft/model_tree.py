"""The model as the model-wide rules see it: its sites (modules in order, lorafuse layers as leaves) and what the C++
rules read of them, the LoRA and modules-to-save layers there, target selection, parameter counts, and
:func:`_model_wide`, the one switch that hands a bound C++ model to the C++ implementation of a function.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from torch import nn

from .. import _C
from .._cpp import cpp_module_of as _cpp
from ..nn import (
    Linear,
    Linear4bit,
    ModulesToSave,
    MultiheadAttention,
    base_kind_of,
    is_lora_layer,
)


def _model_wide(cpp_impl, result=lambda model, out: out):
    """Decorates the Python implementation of a model-wide function: on a bound C++ model ``cpp_impl`` (the
    C++ implementation, one binding per function) runs instead; ``result(model, its return)`` is returned."""

    def wrap(py_impl):
        @functools.wraps(py_impl)
        def dispatch(model, *args, **kwargs):
            cpp = _cpp(model)
            if cpp is None:
                return py_impl(model, *args, **kwargs)
            return result(model, cpp_impl(cpp, *args, **kwargs))

        return dispatch

    return wrap


def _is_target(m: nn.Module) -> bool:
    """A module that can take an adapter: a lorafuse layer, or a base of a known kind that may be selected."""
    kind = base_kind_of(m)
    return is_lora_layer(m) or (kind is not None and kind.selectable)


def _is_attention(m: nn.Module) -> bool:
    """A multi-head attention that can take an adapter (a lorafuse.nn.MultiheadAttention, or its base)."""
    kind = base_kind_of(m.base_layer if is_lora_layer(m) else m)
    return kind is not None and kind.attention


def _is_embedding(m: nn.Module) -> bool:
    """An embedding layer that can take an adapter (a lorafuse.nn.Embedding, or an nn.Embedding base)."""
    kind = base_kind_of(m.base_layer if is_lora_layer(m) else m)
    return kind is not None and kind.embedding


def _sites(model: nn.Module) -> Iterator[Tuple[nn.Module, str, str, nn.Module]]:
    """(parent, name, path, module) in module order; lorafuse layers (LoRA and modules-to-save) are leaves."""

    def walk(module: nn.Module, prefix: str):
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            yield module, name, path, child
            if not is_lora_layer(child) and not isinstance(child, ModulesToSave):
                yield from walk(child, path)

    yield from walk(model, "")


def _infos(sites) -> list:
    """What the C++ rules see of each site (ModuleInfo): (path, type, is_linear, in_features, out_features, is_embedding,
    is_lora_layer, is_saved_module, is_attention); an embedding's in and out are num_embeddings and embedding_dim, an
    attention's embed_dim and 3·embed_dim."""
    infos = []
    for _, _, path, m in sites:
        target, embedding, saved = _is_target(m), _is_embedding(m), isinstance(m, ModulesToSave)
        attention = target and _is_attention(m)
        if is_lora_layer(m):
            features = (m.in_features, m.out_features)
        else:
            features = base_kind_of(m).features(m) if target else (-1, -1)
        infos.append((path, type(m).__name__, target and not embedding and not attention, *features, embedding,
                      is_lora_layer(m) or saved, saved, attention))
    return infos


def _cpp_saved_modules(cpp) -> List[Tuple[str, nn.Module]]:
    modules = dict(cpp.named_modules().items())
    return [(path, modules[path]) for path in _C._cpp_saved_modules(cpp)]


@_model_wide(_cpp_saved_modules)
def saved_modules(model: nn.Module) -> List[Tuple[str, ModulesToSave]]:
    """Every module kept whole (``modules_to_save``: a :class:`lorafuse.nn.ModulesToSave`), with its path, in module
    order (for a C++ model: the bound C++ lorafuse::nn::ModulesToSave layers)."""
    return [(path, m) for _, _, path, m in _sites(model) if isinstance(m, ModulesToSave)]


def _cpp_lora_layers(cpp) -> List[Tuple[str, nn.Module]]:
    modules = dict(cpp.named_modules().items())
    return [(path, modules[path]) for path in _C._cpp_lora_layers(cpp)]


@_model_wide(_cpp_lora_layers)
def lora_layers(model: nn.Module) -> List[Tuple[str, Linear]]:
    """Every lorafuse LoRA layer in the model, with its path, in module order (for a C++ model: the bound
    C++ LoraLinear layers)."""
    return [(path, m) for _, _, path, m in _sites(model) if is_lora_layer(m)]


def _tables(layers: Sequence[Tuple[str, Linear]]) -> list:
    """(path, adapter table) per layer: what the model-wide rules (C++ lorafuse::rules) read."""
    return [(path, layer._table) for path, layer in layers]


def _bias_tables(model: nn.Module) -> list:
    """The tables that PEFT's bias modes read: every LoRA layer's, and an attention's output projection as a layer of its
    own (PEFT's structure: <path>.base_layer.out_proj)."""
    layers = lora_layers(model)
    inner = [(f"{path}.base_layer.out_proj", m.out_proj_layer._table) for path, m in layers
             if isinstance(m, MultiheadAttention)]
    return _tables(layers) + inner


@_model_wide(_C._cpp_adapter_names)
def adapter_names(model: nn.Module) -> List[str]:
    """Adapter names present in the model, in the order they first appear."""
    return _C._rules_adapter_names(_tables(lora_layers(model)))


@_model_wide(_C._cpp_active_adapter, result=lambda model, name: name or None)
def active_adapter(model: nn.Module) -> Optional[str]:
    """The model's active adapter, or None."""
    return _C._rules_active_adapter(_tables(lora_layers(model))) or None


def _has_peft_layers(model: nn.Module) -> Optional[str]:
    for path, m in model.named_modules():
        if type(m).__module__.startswith("peft.") and hasattr(m, "lora_A"):
            return path
    return None


def model_type(model: nn.Module) -> str:
    """transformers' ``config.model_type`` of ``model`` ("" for a model without one), as PEFT reads it."""
    config = getattr(model, "config", None)
    value = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return value if isinstance(value, str) else ""


def _output_layer(model: nn.Module) -> Optional[nn.Module]:
    """A transformers model's output embeddings (what "all-linear" leaves out, as in PEFT); None for other models."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return None
    return model.get_output_embeddings()


def _select(model: nn.Module, sites: list, config_json: str) -> Tuple[list, list]:
    """The C++ selection rules (lorafuse::select_targets, select_saved_modules) over ``sites``, with the model's type
    (default targets) and output layer ("all-linear"): the LoRA targets and the modules kept whole, each (index into
    sites, adapter options as a dict)."""
    output = _output_layer(model)
    output_path = next((path for _, _, path, m in sites if output is not None and m is output), "")
    chosen, saved, messages = _C._select_targets(_infos(sites), config_json, model_type(model), output_path)
    for message in messages:
        warnings.warn(message, stacklevel=4)
    return [(i, json.loads(o)) for i, o in chosen], [(i, json.loads(o)) for i, o in saved]


def default_target_modules(model_type: str) -> Optional[Union[List[str], str]]:
    """PEFT's default ``target_modules`` for transformers' ``model_type`` (what ``LoraConfig(target_modules=None)``
    selects: ``["q_proj", "v_proj"]`` for "llama", ``["c_attn"]`` for "gpt2", ...), or None for a type without
    defaults. The table is the C++ one (lorafuse::default_target_modules)."""
    if not isinstance(model_type, str):
        raise TypeError(f"model_type: expected a str, found {type(model_type).__name__}")
    return _C._default_target_modules(model_type)


@_model_wide(_C._cpp_trainable_parameters, lambda model, out: tuple(out))
def trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors count once. A 4-bit weight (lorafuse.nn.Linear4bit,
    stored as buffers) counts its out × in parameters, as PEFT counts bitsandbytes' 4-bit weights. A bound C++
    model: lorafuse::trainable_parameters."""
    trainable = total = 0
    for p in model.parameters():  # each tensor once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    for m in model.modules():
        if isinstance(m, Linear4bit):
            total += m.in_features * m.out_features
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints PEFT's line, e.g.
    ``trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622``."""
    trainable, total = trainable_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")


_UNTIES = (
    "a copy of it per adapter would untie them, so the model would compute something else (PEFT ties such copies; "
    "lorafuse does not yet). Untie them first, or leave the module out of modules_to_save"
)


def _check_not_tied(model: nn.Module, layers: List[Tuple[str, nn.Module]], what: str, consequence: str = "") -> None:
    """rules::check_not_tied over this model's parameters: no merge into (or copy of) a weight another module holds
    too."""
    if layers:
        parameters = [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)]
        _C._rules_check_not_tied(parameters, [path for path, _ in layers], what, consequence)


__all__ = [
    "saved_modules",
    "lora_layers",
    "adapter_names",
    "active_adapter",
    "model_type",
    "default_target_modules",
    "trainable_parameters",
    "print_trainable_parameters",
]
