"""Adapter files in PEFT's format (adapter_config.json + adapter_model.safetensors) and per-thread adapters.

The format, the tensor names and every loading rule are the C++ implementation's (``lorafuse::io``); this
module applies them to models written in Python and hands bound C++ models to C++.

Thread-safety contract (the same as C++, see ``<lorafuse/adapters.h>``): on one model, any number of threads
may run forward, each choosing its adapter with :func:`use_adapter`, while one thread calls
:func:`load_adapter` under a new name (on a model that already has an active adapter and LoRA layers for
every layer the file adapts, from a file without biases) and :func:`delete_adapter` of an adapter that no
running forward uses and that is not active. Everything else (inject_lora, set_adapter, merge, training
steps, ``.to()``, ...) must not overlap anything.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Union

import torch
from torch import nn

from .. import _C
from ..config import config_fields
from ..nn import Linear, ModulesToSave, MultiheadAttention, base_kind_of, is_lora_layer
from ..nn.modules_to_save import saved_state
from .inject import _activate_and_freeze, _attach, _attach_saved, _check_dora, _check_saved
from .model_tree import (
    _bias_tables,
    _has_peft_layers,
    _infos,
    _is_target,
    _model_wide,
    _sites,
    _tables,
    active_adapter,
    lora_layers,
    saved_modules,
)

PathLike = Union[str, "os.PathLike[str]"]


def _folder(dir: PathLike, what: str) -> str:
    if not isinstance(dir, (str, os.PathLike)):
        raise TypeError(f"{what}: dir must be a path (str or os.PathLike), found {type(dir).__name__}")
    return os.fspath(dir)


def _check_name(adapter_name: str, what: str) -> str:
    if not isinstance(adapter_name, str):
        raise TypeError(f"{what}: adapter_name must be a str, found {type(adapter_name).__name__}")
    return adapter_name


def save_adapter(model: nn.Module, dir: PathLike, adapter_name: str = "default") -> None:
    """Writes adapter ``adapter_name`` of ``model`` to folder ``dir`` in PEFT's format, so that
    ``PeftModel.from_pretrained(base_model, dir)`` loads it.

    The two files replace what ``dir`` held as a pair, atomically (a new folder beside it takes its place in
    one rename; other files in ``dir`` are kept): a crash leaves the old adapter or the new one. The config
    selects exactly the layers that have the adapter: by their names (``["q_proj", "v_proj"]``) where that
    is exact, with ``rank_pattern``/``alpha_pattern`` for layers off the common rank and alpha.

    Raises:
        ValueError: no layer has the adapter; layers disagreeing on lora_dropout/use_rslora/bias; a folder
            that cannot be written.
    """
    _save(model, _folder(dir, "save_adapter"), _check_name(adapter_name, "save_adapter"))


@_model_wide(_C._cpp_save_adapter)
def _save(model: nn.Module, path: str, adapter_name: str) -> None:
    _C._rules_require_adapter(_tables(lora_layers(model)), adapter_name, "save_adapter")
    sites = list(_sites(model))
    layers = []
    fan_in_fan_out = False  # PEFT's flag: set in a config that adapts Conv1D layers
    for index, (_, _, _, m) in enumerate(sites):
        if is_lora_layer(m) and adapter_name in m.adapters:
            parts = [(m, False)]
            if isinstance(m, MultiheadAttention):  # its output projection: <path>.base_layer.out_proj in the file
                parts.append((m.out_proj_layer, True))
            for layer, out_proj in parts:
                a, b = (t.detach() for t in layer._factors(adapter_name))
                mags = layer.lora_magnitude_vector
                magnitude = mags[adapter_name].weight.detach() if adapter_name in mags else None
                layers.append((index, layer.adapters[adapter_name], a, b, magnitude, out_proj))
            fan_in_fan_out = fan_in_fan_out or base_kind_of(m.base_layer).fan_in_fan_out
    params = dict(model.named_parameters())
    kept = [p for p, _ in saved_modules(model)]
    trained = _C._rules_trained_biases(_bias_tables(model), list(params), adapter_name, kept)
    biases = [(name, params[name].detach()) for name in trained]
    config = getattr(model, "config", None)
    base_name = getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""
    saved = [
        (p, saved_state(w.modules_to_save[adapter_name])) for p, w in saved_modules(model) if adapter_name in w.adapters
    ]
    _C._save_adapter(path, _infos(sites), layers, biases, str(base_name), fan_in_fan_out, saved)


def load_adapter(
    model: nn.Module,
    dir: PathLike,
    adapter_name: str = "default",
    partial: bool = False,
    is_trainable: bool = False,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Loads the PEFT-format adapter in folder ``dir`` into ``model`` under ``adapter_name``.

    On a model without LoRA layers the layers are injected from the file's adapter_config.json (as PEFT's
    ``from_pretrained`` does) and the adapter becomes active. On a model with LoRA layers the adapter is added
    beside the others, inactive and frozen, until :func:`set_adapter` or :func:`use_adapter` picks it.

    As PEFT's ``is_trainable=False`` (the default), the loaded adapter is frozen and the model is put in eval mode
    (inference); with ``is_trainable=True`` it trains like one from :func:`inject_lora` once it is active.

    The file's tensors are cast to the layer's adapter dtype (float32 for a float16/bfloat16 base, else the
    base weight's dtype). Everything is checked before the model changes.

    Args:
        partial: load even if the file lacks some layers that its config targets in this model.
        is_trainable: train the adapter (PEFT's argument); False: inference.
        autocast_adapter_dtype: PEFT's argument: True keeps a float16/bfloat16 base's adapters in float32; False
            makes them in the base's dtype.

    Raises:
        ValueError: a missing or malformed adapter_config.json; a truncated or corrupted safetensors file;
            PEFT features lorafuse does not support yet (named); a rank or shape that does not fit the layer;
            modules the model lacks; targeted layers the file lacks (unless ``partial``); zero-element
            tensors; an adapter name already in use.
    """
    path = _folder(dir, "load_adapter")
    _check_name(adapter_name, "load_adapter")
    for name, value in (
        ("partial", partial),
        ("is_trainable", is_trainable),
        ("autocast_adapter_dtype", autocast_adapter_dtype),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"load_adapter: {name} must be a bool, found {type(value).__name__}")
    _C._validate_adapter(adapter_name, 1, 1.0, 0.0)  # the name's rules, before anything changes
    return _load(model, path, adapter_name, partial, is_trainable, autocast_adapter_dtype)


@_model_wide(_C._cpp_load_adapter, result=lambda model, _: model)
def _load(
    model: nn.Module, path: str, adapter_name: str, partial: bool, is_trainable: bool, autocast_adapter_dtype: bool
) -> nn.Module:
    if _is_target(model):
        raise ValueError(
            "model: load_adapter puts adapters into layers inside a model, and this model is itself a Linear "
            "layer; load into a model that holds it"
        )
    peft_path = _has_peft_layers(model)
    if peft_path is not None:
        raise ValueError(
            f'model: "{peft_path}" is a PEFT LoRA layer; load_adapter does not mix with PEFT layers '
            "(lorafuse.from_peft converts a PEFT model)"
        )
    sites = list(_sites(model))
    _C._rules_check_new_adapter(
        _tables(lora_layers(model)), adapter_name, ". Load under another name, or delete_adapter first"
    )
    plan = _C._plan_adapter_load(path, _infos(sites), bool(partial))
    bias_copies = []
    if plan["biases"]:
        params = dict(model.named_parameters())
        targets = _C._rules_match_biases(
            [(name, list(t.shape)) for name, t in plan["biases"]],
            [(name, list(p.shape)) for name, p in params.items()],
            "load_adapter",
        )
        bias_copies = [(params[target], t) for target, (_, t) in zip(targets, plan["biases"])]
    for message in plan["warnings"]:
        warnings.warn(message, UserWarning, stacklevel=2)

    states = {}
    for index, _, state in plan["saved"]:  # modules_to_save: the file's state fits the module (before changes)
        _, _, spath, module = sites[index]
        own = module.original_module if isinstance(module, ModulesToSave) else module
        _C._check_saved_state(spath, [(k, list(v.shape)) for k, v in own.state_dict().items()], state)
        states[index] = state
    saved = [(index, json.loads(opts)) for index, opts, _ in plan["saved"]]
    _check_saved(model, sites, saved)

    # (index, out_proj) → weights; out_proj: an attention's output projection (<path>.base_layer.out_proj in the file)
    weights = {(index, out_proj): (a, b, m, w) for index, _, a, b, m, w, out_proj in plan["targets"]}
    for (index, _), (_, _, _, w) in weights.items():  # PEFT's save_embedding_layers: the base weight, checked first
        if w is not None:
            _check_base_weight(sites[index], w)

    def fill(index: int, layer: Linear) -> None:
        parts = [(layer, False)] + ([(layer.out_proj_layer, True)] if isinstance(layer, MultiheadAttention) else [])
        for part, out_proj in parts:
            a, b, m, w = weights[(index, out_proj)]
            with torch.no_grad():  # cast to the layer's adapter dtype, moved to its device
                part_a, part_b = part._factors(adapter_name)
                part_a.copy_(a)
                part_b.copy_(b)
                if m is not None:  # DoRA
                    part.lora_magnitude_vector[adapter_name].weight.copy_(m)
                if w is not None:  # the base weight, as PEFT loads it
                    part.base_layer.weight.copy_(w)

    prior_active = active_adapter(model)
    chosen = [(index, json.loads(opts)) for index, opts, *_, out_proj in plan["targets"] if not out_proj]
    _check_dora(sites, chosen)
    _attach(
        model,
        sites,
        chosen,
        adapter_name,
        keep_active=prior_active is not None,
        fill=fill,
        autocast_adapter_dtype=autocast_adapter_dtype,
    )

    def fill_saved(index: int, copy: nn.Module) -> None:
        own = copy.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, tensor in states[index]:
                own[key].copy_(tensor)

    _attach_saved(model, sites, saved, adapter_name, keep_active=prior_active is not None, fill=fill_saved)
    with torch.no_grad():
        for param, tensor in bias_copies:
            param.copy_(tensor)
    if prior_active is None:
        _activate_and_freeze(model, adapter_name)
        if not is_trainable:  # PEFT's is_trainable=False: inference, the adapter (and its biases) do not train
            for p in model.parameters():
                p.requires_grad_(False)
    # else it waits inactive, frozen; the active adapter keeps training as before (PEFT)
    # PEFT puts the model in eval mode; a model in eval mode already is not written to (other threads may be running
    # forward while an adapter loads beside theirs)
    if not is_trainable and any(m.training for m in model.modules()):
        model.eval()
    return model


def _check_base_weight(site, weight) -> None:
    """A file's base weight (PEFT's save_embedding_layers) fits the site's base: a full-precision weight of its shape,
    with nothing merged into it."""
    _, _, path, module = site
    base = module.base_layer if is_lora_layer(module) else module
    own = getattr(base, "weight", None)
    kind = base_kind_of(base)
    if not isinstance(own, torch.Tensor) or kind is None or kind.quantized_state(base) is not None:
        raise ValueError(
            f'load_adapter: "{path}": the file holds a base weight for it ({path}.base_layer.weight), and its '
            f"{type(base).__name__} has no full-precision weight to take it"
        )
    if tuple(own.shape) != tuple(weight.shape):
        raise ValueError(
            f'load_adapter: "{path}": the file\'s base weight ({path}.base_layer.weight) is {list(weight.shape)} but '
            f"the layer's weight is {list(own.shape)}"
        )
    if is_lora_layer(module) and module.merged:
        raise ValueError(
            f'load_adapter: "{path}": the file holds a base weight for it, and adapters are merged into its weight '
            "now; unmerge first"
        )


def read_adapter(dir: PathLike) -> dict:
    """The adapter in folder ``dir``, validated as :func:`load_adapter` validates it, without a model:
    ``{"config": LoraConfig fields, "config_json": str, "layers": [(path, lora_A, lora_B)],
    "magnitudes": {path: DoRA magnitude vector} (a DoRA adapter's), "embeddings": [paths of embedding layers],
    "base_weights": [(path, base weight)] (PEFT's save_embedding_layers), "biases": [(path, tensor)],
    "warnings": [str]}``."""
    adapter = _C._read_adapter(_folder(dir, "read_adapter"))
    from_file = adapter.pop("targets_from_file")
    adapter["config"] = config_fields(adapter["config_json"], [p for p, _, _ in adapter["layers"]] if from_file else None)
    return adapter


__all__ = ["save_adapter", "load_adapter", "read_adapter"]
