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
            if kind is not None and kind.nf4_state(child) is not None:
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
    file_quant = reader.quant_config
    nf4 = set(reader.nf4_weights())
    used, missing, handled = set(), [], set()
    replacements = []
    for parent, name, path, module, is_4bit in layers:
        weight = f"{path}.weight"
        out_features, in_features = module.out_features, module.in_features
        dense_in_file = weight in reader and weight not in nf4
        to_quantize = dense_in_file and (
            is_4bit or (quantize is not None and not _C._quant_keeps_dense(path, quantize.modules_to_not_convert))
        )
        if weight not in nf4 and not to_quantize:
            if is_4bit:
                handled.add(path)
                missing.append(weight)
            continue
        handled.add(path)
        bias = None
        if module.bias is not None:
            bias_name = f"{path}.bias"
            if bias_name in reader:
                _check_shape(reader, bias_name, [out_features])
                bias = reader.read(bias_name)
                used.add(bias_name)
            else:
                missing.append(bias_name)
                bias = torch.zeros(out_features)
        if weight in nf4:
            packed, absmax, nested, offset, blocksize, shape, dtype = reader.read_nf4(weight)
            if list(shape) != [out_features, in_features]:
                raise ValueError(
                    f'load_checkpoint: "{weight}" is {list(shape)} in the checkpoint; the model\'s layer is '
                    f"[{out_features}, {in_features}]"
                )
            compute = (file_quant[3] if file_quant else None) or (quantize.compute_dtype if quantize else None) or dtype
            layer = Linear4bit(in_features, out_features, bias is not None, compute, blocksize, nested.numel() > 0, "meta")
            layer.packed, layer.absmax, layer.nested_absmax, layer.offset = packed, absmax, nested, offset
            if bias is not None:
                layer.bias = nn.Parameter(bias.to(compute), requires_grad=False)
            used.update(reader.nf4_tensor_names(weight))
        else:
            _check_shape(reader, weight, [out_features, in_features])
            if is_4bit:  # quantized as the model's 4-bit layer is (lorafuse's or bitsandbytes')
                _, _, nested, _, blocksize = base_kind_of(module).nf4_state(module)
                double_quant = nested is not None and nested.numel() > 0
                settings = (getattr(module, "compute_dtype", None), blocksize, double_quant)
            else:
                settings = (quantize.compute_dtype, quantize.blocksize, quantize.double_quant)
            try:  # quantize_nf4's own checks (dtype, finite values), with the tensor named
                layer = Linear4bit.from_weight(reader.read(weight), bias, *settings)
            except (TypeError, ValueError) as e:
                raise type(e)(f'load_checkpoint: "{weight}": {e}') from None
            _C._release_freed_memory()  # the dense weight's place, given back: the peak stays near the 4-bit size
            if layer.bias is not None:
                layer.bias.requires_grad_(False)
            used.add(weight)
        layer.train(module.training)
        device = _device_of(module)
        if device is not None:  # a model already on its device (not a skeleton): the new layer joins it there
            layer = layer.to(device)
        replacements.append((parent, name, path, layer))
    modules = dict(model.named_modules())
    for w in sorted(nf4):
        path = w[: -len(".weight")] if w.endswith(".weight") else None
        if path not in handled and path in modules:
            raise ValueError(
                f'load_checkpoint: {directory} stores "{w}" in 4 bits, but the model\'s "{path}" is a '
                f"{type(modules[path]).__name__}, not a Linear layer"
            )

    owners = _owners(model)
    assignments = []
    for name, (names, holders) in owners.items():
        # held only by layers read above: done; held elsewhere too (a tied weight), it loads for those holders
        if all(_under(n, handled) for n in names):
            continue
        present = [n for n in names if n in reader]  # a tied weight: under any of its names, once or more
        if not present:
            missing.append(name)
            continue
        module, attr, _ = holders[0]
        _check_shape(reader, present[0], list(getattr(module, attr).shape))
        assignments.append((present[0], holders))
        used.update(present)
    unexpected = [n for n in reader.names() if n not in used]
    if strict and missing:
        raise ValueError(
            f"load_checkpoint: {directory} lacks {len(missing)} tensor(s) of the model: {_some(missing)}. Is it "
            "another model's checkpoint? (strict=False loads what is there)"
        )
    if strict and unexpected:
        raise ValueError(
            f"load_checkpoint: {directory} holds {len(unexpected)} tensor(s) that the model has no place for: "
            f"{_some(unexpected)}. Is it another model's checkpoint? (strict=False ignores them)"
        )
    meta = [n for n in missing if n in owners and getattr(owners[n][1][0][0], owners[n][1][0][1]).is_meta]
    if meta:
        raise ValueError(
            f"load_checkpoint: {directory} lacks {len(meta)} tensor(s) that the model holds on the meta device (no "
            f"values at all): {_some(meta)}"
        )

    # Apply: nothing above changed the model.
    with torch.no_grad():
        for name, holders in assignments:
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
    for parent, name, _, layer in replacements:
        setattr(parent, name, layer)
    return [path for _, _, path, _ in replacements]


def _device_of(module: nn.Module) -> Optional[torch.device]:
    """The device of a module's tensors, or None on the meta device (or without tensors)."""
    for t in [*module.parameters(), *module.buffers()]:
        return None if t.is_meta else t.device
    return None


def _check_shape(reader, name: str, expected: List[int]) -> None:
    _, shape = reader.entry(name)
    if list(shape) != list(expected):
        raise ValueError(f'load_checkpoint: "{name}" is {list(shape)} in the checkpoint; the model\'s is {expected}')


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
        packed, absmax, nested_absmax, offset, blocksize = base_kind_of(module).nf4_state(module)
        dtype = _nf4_dtype(module)
        tensors += _C._nf4_checkpoint_tensors(
            f"{path}.weight",
            packed,
            absmax,
            nested_absmax if nested_absmax is not None else torch.empty(0),
            offset if offset is not None else torch.empty(0),
            blocksize,
            [module.out_features, module.in_features],
            dtype,
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
