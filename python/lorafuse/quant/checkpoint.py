"""A model's weights from and to a Hugging Face checkpoint folder, 4-bit layers in transformers + bitsandbytes'
format (the format and every rule of it live once, in C++: lorafuse::io::CheckpointReader, nf4_checkpoint_tensors,
write_checkpoint)."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import _C
from .._cpp import cpp_module_of as _cpp
from ..nn import is_lora_layer
from ..nn.base_kinds import DenseLinear, base_kind_of
from ..nn.linear4bit import Linear4bit

PathLike = Union[str, "os.PathLike[str]"]

_DENSE = DenseLinear()


def _layers(model: nn.Module, what: str) -> List[Tuple[nn.Module, str, str, nn.Module, bool]]:
    """(parent, name, path, module, is_4bit) of every dense ``nn.Linear`` and 4-bit layer; refuses LoRA layers."""
    out, lora = [], []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if is_lora_layer(child):
                lora.append(path)
                continue
            kind = base_kind_of(child)
            if kind is not None and kind.quantized_state(child) is not None:
                out.append((module, name, path, child, True))
            elif _DENSE.matches(child):
                out.append((module, name, path, child, False))
            else:
                walk(child, path)

    walk(model, "")
    if lora:
        advice = "load it before inject_lora" if what == "load_checkpoint" else (
            "save adapters with save_adapter, or merge_and_unload first"
        )
        raise ValueError(f"{what}: the model has LoRA layers ({_some(lora)}); a checkpoint holds the base model: {advice}")
    return out


def _some(names: List[str], limit: int = 5) -> str:
    shown = ", ".join(f'"{n}"' for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _under(name: str, prefixes: set) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


def _owners(model: nn.Module) -> Dict[str, Tuple[List[str], List[Tuple[nn.Module, str, bool]]]]:
    """Each parameter and persistent buffer by its first name: all its names and every (module, attribute,
    is_parameter) holding it (a tied weight has several of both)."""
    persistent = set(model.state_dict(keep_vars=True).keys())
    first: Dict[int, str] = {}
    owners: Dict[str, Tuple[List[str], List[Tuple[nn.Module, str, bool]]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for store, is_param in ((module._parameters, True), (module._buffers, False)):
            for attr, tensor in store.items():
                full = f"{prefix}.{attr}" if prefix else attr
                if tensor is None or (not is_param and full not in persistent and id(tensor) not in first):
                    continue
                names, holders = owners.setdefault(first.setdefault(id(tensor), full), ([], []))
                if full not in names:
                    names.append(full)
                if (module, attr, is_param) not in holders:
                    holders.append((module, attr, is_param))
    return owners


def load_checkpoint(
    model: nn.Module,
    directory: PathLike,
    quantize: Optional["QuantConfig"] = None,  # noqa: F821
    strict: bool = True,
) -> List[str]:
    """Loads the Hugging Face checkpoint folder ``directory`` (config.json; model.safetensors or the shards listed by
    model.safetensors.index.json) into ``model``, whose parameters may be on the meta device (a skeleton, e.g. made
    under ``accelerate.init_empty_weights()``: nothing is allocated until it loads).

    - A Linear layer whose weight the checkpoint holds in 4 bits (a model that transformers + bitsandbytes quantized,
      or :func:`save_checkpoint` wrote) becomes a :class:`lorafuse.nn.Linear4bit` on those bytes, computing in
      config.json's ``bnb_4bit_compute_dtype``. With ``quantize`` (a :class:`QuantConfig`), dense Linear layers are
      quantized as they load, one at a time, so the dense model never exists as a whole.
    - Every other parameter and persistent buffer takes the checkpoint's values in the model's own dtype.

    Everything is read and checked before the model changes. ``strict``: every parameter and buffer must be in the
    checkpoint and every tensor of it used. Returns the paths of the layers now in 4 bits."""
    directory = os.fspath(directory)
    cpp = _cpp(model)
    if cpp is not None:  # a bound C++ model (the reference Llama): lorafuse::load_checkpoint
        return _C._cpp_load_checkpoint(cpp, directory, quantize._fields() if quantize else None, strict)
    reader = _C._CheckpointReader(directory)
    layers = _layers(model, "load_checkpoint")
    tie = getattr(model, "tie_weights", None)
    if callable(tie):  # a transformers skeleton made under init_empty_weights has its tied weights still apart
        tie()
    described = []
    for _, _, path, module, is_4bit in layers:
        own = None
        nf4 = is_4bit and getattr(module, "is_nf4", True)  # a lorafuse Linear4bit in another format: False
        if nf4:  # a dense weight in the checkpoint is quantized as the model's 4-bit layer is
            _, _, nested, _, blocksize = base_kind_of(module).nf4_state(module)
            double_quant = nested is not None and nested.numel() > 0
            own = ("nf4", blocksize, double_quant, getattr(module, "compute_dtype", None), [])
        described.append((path, module.in_features, module.out_features, module.bias is not None, own))
    owners = _owners(model)
    state = []
    for names, holders in owners.values():
        module, attr, _ = holders[0]
        tensor = getattr(module, attr)
        state.append((names, list(tensor.shape), tensor.is_meta))
    kinds = {path: type(m).__name__ for path, m in model.named_modules() if path}
    # every rule (what loads, what is quantized, the checks and errors) in C++: lorafuse::plan_checkpoint_load
    planned, assignments = _C._plan_checkpoint_load(
        reader, described, state, kinds, quantize._fields() if quantize else None, strict
    )

    # Apply: nothing above changed the model.
    holders_of = list(owners.values())
    with torch.no_grad():
        for name, index in assignments:
            holders = holders_of[index][1]
            module, attr, is_param = holders[0]
            current = getattr(module, attr)
            value = reader.read(name)
            if not current.is_meta:
                current.copy_(value)
                continue
            value = value.to(current.dtype)
            new = nn.Parameter(value, requires_grad=current.requires_grad) if is_param else value
            for owner, owner_attr, _ in holders:
                setattr(owner, owner_attr, new)
    paths = []
    for index, parts in planned:
        parent, name, path, module, _ = layers[index]
        layer = Linear4bit._from_parts(parts)
        layer.train(module.training)
        device = _device_of(module)
        if device is not None:  # a model already on its device (not a skeleton): the new layer joins it there
            layer = layer.to(device)
        setattr(parent, name, layer)
        paths.append(path)
    return paths


def _device_of(module: nn.Module) -> Optional[torch.device]:
    """The device of a module's tensors, or None on the meta device (or without tensors)."""
    for t in [*module.parameters(), *module.buffers()]:
        return None if t.is_meta else t.device
    return None


def _nf4_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a 4-bit layer is saved with (its quant_state's dtype): the dtype it computes in, which
    save_checkpoint's quantization_config then names (write_checkpoint derives it)."""
    return getattr(module, "compute_dtype", None) or module.weight.quant_state.dtype


def save_checkpoint(model: nn.Module, directory: PathLike, config: Optional[dict] = None) -> None:
    """Saves ``model``'s weights as the Hugging Face checkpoint folder ``directory`` (atomically; other files in it
    kept), so that transformers (with bitsandbytes for the 4-bit layers) and :func:`load_checkpoint` load it: each
    4-bit layer (:class:`lorafuse.nn.Linear4bit`, or bitsandbytes' own) as transformers stores one, every other
    parameter and persistent buffer as it is (a tied weight once).

    config.json is ``config`` (a dict; default: the model's own Hugging Face config, ``model.config``, or for the
    C++ Llama its shape) with ``quantization_config`` describing the 4-bit layers (its ``llm_int8_skip_modules``
    lists the Linear layers left dense, so transformers quantizes exactly these), removed when there are none. A
    model with LoRA layers is refused: save adapters with :func:`save_adapter`, or ``merge_and_unload`` first."""
    directory = os.fspath(directory)
    cpp = _cpp(model)
    if config is None:
        config = _default_config(model, cpp)
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict (config.json's contents), found {type(config).__name__}")
    if cpp is not None:
        _C._cpp_save_checkpoint(cpp, directory, json.dumps(config))
        return
    tensors, quantized, dense = [], set(), []
    for _, _, path, module, is_4bit in _layers(model, "save_checkpoint"):
        if not is_4bit:
            dense.append(path)
            continue
        packed, absmax, nested_absmax, offset, fmt = base_kind_of(module).quantized_state(module)
        dtype = _nf4_dtype(module)
        tensors += _C._nf4_checkpoint_tensors(
            f"{path}.weight",
            packed,
            absmax,
            nested_absmax if nested_absmax is not None else torch.empty(0),
            offset if offset is not None else torch.empty(0),
            int(fmt[1]),
            [module.out_features, module.in_features],
            dtype,
            list(fmt),
            getattr(module, "stat_dtype", torch.float32),
        )
        if module.bias is not None:
            tensors.append((f"{path}.bias", module.bias.detach()))
        quantized.add(path)
    for name, (_, holders) in _owners(model).items():
        if _under(name, quantized):
            continue
        module, attr, _ = holders[0]
        tensor = getattr(module, attr)
        if tensor.is_meta:
            raise ValueError(f'save_checkpoint: "{name}" is on the meta device (it has no values); load it first')
        tensors.append((name, tensor.detach()))
    _C._write_checkpoint(directory, json.dumps(config), tensors, dense)  # quantization_config derived in C++


def _default_config(model: nn.Module, cpp) -> dict:
    if cpp is not None and hasattr(model, "config") and hasattr(model.config, "to_hf_json"):
        return json.loads(model.config.to_hf_json())
    hf = getattr(model, "config", None)
    if hf is not None and hasattr(hf, "to_json_string"):
        return json.loads(hf.to_json_string(use_diff=False))
    return {}


__all__ = ["load_checkpoint", "save_checkpoint"]
