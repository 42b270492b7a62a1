"""LoRA for any torch.nn.Module: inject_lora and the model-wide adapter functions (PEFT's LoraModel).

Which layers a config selects is decided by the C++ rules that C++ ``lorafuse::inject_lora`` uses.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from torch import nn

from .. import _C
from .._cpp import cpp_module_of as _cpp
from ..config import LoraConfig
from ..nn import (
    Linear,
    Linear4bit,
    MergeError,
    ModulesToSave,
    MultiheadAttention,
    base_kind_of,
    is_lora_layer,
    lora_layer_class,
)
from ..nn.base_kinds import DenseLinear
from ..nn.modules_to_save import check_saved_module


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


def inject_lora(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default", autocast_adapter_dtype: bool = True
) -> nn.Module:
    """Gives adapter ``adapter_name`` to every Linear (or named embedding) layer of ``model`` that ``config`` selects.

    An ``nn.Linear`` is replaced in place by a :class:`lorafuse.nn.Linear` wrapping it (sharing its
    weight), an ``nn.Embedding`` by a :class:`lorafuse.nn.Embedding`; a lorafuse layer already there gets the adapter
    beside its others. Every parameter is then
    frozen except the active adapter's A and B (and the biases that its ``bias`` mode names). The first
    adapter injected becomes active; a later one waits for :func:`set_adapter`. Works on the meta device.

    ``autocast_adapter_dtype`` (PEFT's argument): True keeps a float16/bfloat16 base's adapters in float32 (stable
    training); False makes them in the base's dtype.

    Returns:
        ``model`` (changed in place).

    Raises:
        ValueError: a bad config, an adapter name already present, targets that match no module (the message
            lists the Linear layers there are; one list entry matching nothing while others match is a
            warning, as PEFT allows it), no ``target_modules`` for a model without default targets, a selected
            module that is neither a Linear nor an embedding, DoRA or LoftQ/PiSSA/OLoRA where they cannot run, a model
            that already has PEFT LoRA layers (use
            :func:`lorafuse.from_peft`). Nothing is changed.
        TypeError: a field of the wrong type.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config: expected a lorafuse.LoraConfig, found {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, found {type(model).__name__}")
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name: expected a str, found {type(adapter_name).__name__}")
    if not isinstance(autocast_adapter_dtype, bool):
        raise TypeError(f"autocast_adapter_dtype: expected a bool, found {type(autocast_adapter_dtype).__name__}")
    return _inject(model, config, adapter_name, autocast_adapter_dtype)


@_model_wide(
    lambda cpp, config, name, autocast: _C._cpp_inject_lora(cpp, config._to_json(), name, autocast),
    result=lambda m, _: m,
)
def _inject(model: nn.Module, config: LoraConfig, adapter_name: str, autocast_adapter_dtype: bool) -> nn.Module:
    if _is_target(model):
        raise ValueError(
            "model: inject_lora replaces layers inside a model, and this model is itself a Linear layer; "
            "wrap it in lorafuse.nn.Linear instead"
        )
    peft_path = _has_peft_layers(model)
    if peft_path is not None:
        raise ValueError(
            f'model: "{peft_path}" is a PEFT LoRA layer; inject_lora does not mix with PEFT layers '
            "(lorafuse.from_peft converts a PEFT model)"
        )
    _C._rules_check_new_adapter(_tables(lora_layers(model)), adapter_name, "")
    sites = list(_sites(model))
    chosen, saved = _select(model, sites, config._to_json())
    _C._validate_adapter(adapter_name, config.r, float(config.lora_alpha), float(config.lora_dropout))
    _check_loftq(sites, chosen, adapter_name)
    _check_saved(model, sites, saved)

    prior_active = active_adapter(model)
    _attach(model, sites, chosen, adapter_name, keep_active=False, autocast_adapter_dtype=autocast_adapter_dtype)
    _attach_saved(model, sites, saved, adapter_name, keep_active=False)
    _activate_and_freeze(model, prior_active if prior_active is not None else adapter_name)
    return model


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


def _check_loftq(sites, chosen, adapter_name: str) -> None:
    """For every chosen layer whose adapter starts from the base weight (LoftQ, PiSSA, OLoRA), before any changes: a
    plain nn.Linear base (or a lorafuse layer over one) with a full-precision weight (the layer's rules, _check_loftq)."""
    _check_dora(sites, chosen)
    for index, opts in chosen:
        init = opts["init_lora_weights"]
        _, _, path, module = sites[index]
        base = module.base_layer if is_lora_layer(module) else module
        kind = base_kind_of(base)
        if not _C._init_changes_base(init):  # those that start from the base weight and change it
            continue
        if is_lora_layer(module):
            try:
                module._check_loftq(adapter_name, opts["r"], init)
            except ValueError as err:
                raise ValueError(f'init_lora_weights "{init}": "{path}": {err}') from None
            continue
        if kind is not None and kind.embedding:
            raise ValueError(
                f'init_lora_weights "{init}": "{path}" is an embedding layer, whose adapter lorafuse starts only as '
                "PEFT's default does (A zeros, B normal); leave it out of target_modules or use init_lora_weights=True"
            )
        if not isinstance(kind, DenseLinear):
            raise ValueError(
                f'init_lora_weights "{init}": "{path}" ({type(base).__name__}) has no full-precision nn.Linear weight '
                "to start from (a quantized base: start from the full-precision model, then quantize it)"
            )
        _C._check_loftq_weight(path, base.weight, opts["r"], None, init)


def _check_dora(sites, chosen) -> None:
    """For every chosen layer, before the first layer changes: a base its kind can adapt, and for a DoRA adapter, a
    base whose weight DoRA can rescale."""
    for index, _ in chosen:
        _, _, path, module = sites[index]
        base = module.base_layer if is_lora_layer(module) else module
        kind = base_kind_of(base)
        why = kind.refusal(base) if kind is not None else None
        if why is not None:
            raise ValueError(f'target_modules: "{path}" ({type(base).__name__}): {why}')
    for index, opts in chosen:
        if not opts.get("use_dora"):
            continue
        _, _, path, module = sites[index]
        base = module.base_layer if is_lora_layer(module) else module
        kind = base_kind_of(base)
        if kind is None or kind.dora_weight(base) is None:
            why = kind.dora_refusal(base) if kind is not None else f"{type(base).__name__} is no base kind"
            raise ValueError(f'use_dora: "{path}": DoRA rescales the rows of the base\'s full-precision weight; {why}')


def _attach(model, sites, chosen, adapter_name: str, keep_active: bool, fill=None, autocast_adapter_dtype=True) -> None:
    """Gives ``adapter_name`` to ``sites[index]`` for each (index, options) chosen: added to a lorafuse
    layer, or a new one wrapping an ``nn.Linear`` (in the model's train/eval mode; disabled if the model's
    adapters are; not activating the adapter when ``keep_active``). ``fill(index, layer)`` then sets the
    weights."""
    all_disabled = _C._rules_starts_disabled(_tables(lora_layers(model)))
    for index, opts in chosen:
        parent, name, _, module = sites[index]
        init = opts["init_lora_weights"]
        kwargs = dict(
            r=opts["r"],
            lora_alpha=opts["lora_alpha"],
            lora_dropout=opts["lora_dropout"],
            use_rslora=opts["use_rslora"],
            # adapters loaded from a file take its weights: LoftQ ran when they were made, not again on this base
            init_lora_weights=True if fill is not None and _C._init_changes_base(init) else init,
            bias=opts["bias"],
            task_type=opts["task_type"],
            loftq_config=opts.get("loftq_config") or None,
            use_dora=bool(opts.get("use_dora", False)),
        )
        if not autocast_adapter_dtype:  # PEFT's autocast_adapter_dtype=False: the adapter in the base's dtype
            base = module.base_layer if is_lora_layer(module) else module
            kwargs["adapter_dtype"] = base_kind_of(base).weight_dtype(base)
        if is_lora_layer(module):
            module.add_adapter(adapter_name, **kwargs, activate=not keep_active)
            layer = module
        else:
            layer = lora_layer_class(module)(module, adapter_name=adapter_name, **kwargs)
            layer.train(module.training)  # a new module starts in training mode; keep the model's mode
            if all_disabled:  # a model whose adapters are disabled stays so
                layer.disable_adapters()
            if keep_active:
                layer.clear_active_adapter()
        if fill is not None:
            fill(index, layer)
        if layer is not module:
            setattr(parent, name, layer)


def _check_saved(model: nn.Module, sites, saved) -> None:
    """Every module that modules_to_save keeps whole can be (before anything changes): one that runs, holding no
    weights tied to a module outside it."""
    new = []
    for index, _ in saved:
        _, _, path, module = sites[index]
        if not isinstance(module, ModulesToSave):
            check_saved_module(module, path)
            new.append((path, module))
    _check_not_tied(model, new, "modules_to_save", _UNTIES)


def _saved_options(opts: dict):
    """The adapter options a modules-to-save layer records (its table's), from the options as a dict."""
    return _C.AdapterOptions(
        opts["r"], float(opts["lora_alpha"]), float(opts["lora_dropout"]), opts["use_rslora"], True, opts["bias"],
        None, opts["task_type"], None, False,
    )


def _attach_saved(model, sites, saved, adapter_name: str, keep_active: bool, fill=None) -> None:
    """Gives ``adapter_name`` its copy of each module ``saved`` names (index, options): added to a modules-to-save
    layer there, or a new one wrapping the module (in its train/eval mode; disabled if the model's adapters are).
    ``fill(index, copy)`` then sets the copy's state."""
    all_disabled = _C._rules_starts_disabled(_tables(lora_layers(model)))
    for index, opts in saved:
        parent, name, _, module = sites[index]
        if isinstance(module, ModulesToSave):
            module.add_adapter(adapter_name, _saved_options(opts), activate=not keep_active)
            wrapper = module
        else:
            wrapper = ModulesToSave(module, adapter_name, _saved_options(opts), activate=not keep_active)
            wrapper.train(module.training)
            if all_disabled:
                wrapper.disable_adapters()
        if fill is not None:
            fill(index, wrapper.modules_to_save[adapter_name])
        if wrapper is not module:
            setattr(parent, name, wrapper)


def _activate_and_freeze(model: nn.Module, active: str) -> None:
    """Freezes everything but ``active``'s A and B (and the biases its ``bias`` mode names)."""
    for p in model.parameters():
        p.requires_grad_(False)
    set_adapter(model, active)
    # the active adapter's bias mode decides, as in PEFT (a later adapter's config waits until it is active)
    params = dict(model.named_parameters())
    kept = [path for path, _ in saved_modules(model)]
    for name in _C._rules_trained_biases(_bias_tables(model), list(params), active, kept):
        params[name].requires_grad_(True)


def add_adapter(
    model: nn.Module, adapter_name: str, config: LoraConfig, autocast_adapter_dtype: bool = True
) -> nn.Module:
    """Another adapter beside the existing ones (:func:`inject_lora` under another name)."""
    return inject_lora(model, config, adapter_name, autocast_adapter_dtype)


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


@_model_wide(_C._cpp_set_adapter)
def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Activates ``adapter_name`` in every layer that has it (the others run as their base); only its
    weights train. Moves no data."""
    layers = lora_layers(model)
    for (_, layer), name in zip(layers, _C._rules_plan_set_adapter(_tables(layers), adapter_name)):
        if name:
            layer.set_adapter(name)
        else:
            layer.clear_active_adapter()
    for _, wrapper in saved_modules(model):  # PEFT: the adapter's copy where the wrapper has one, else the original
        if adapter_name in wrapper.adapters:
            wrapper.set_adapter(adapter_name)
        else:
            wrapper.clear_active_adapter()


@_model_wide(_C._cpp_disable_adapters)
def disable_adapters(model: nn.Module) -> None:
    """The base model alone (merged layers are unmerged first; every adapter frozen until :func:`enable_adapters` or
    :func:`set_adapter`, as PEFT)."""
    for _, layer in lora_layers(model) + saved_modules(model):
        layer.disable_adapters()


@_model_wide(_C._cpp_enable_adapters)
def enable_adapters(model: nn.Module) -> None:
    """The adapters again."""
    for _, layer in lora_layers(model) + saved_modules(model):
        layer.enable_adapters()


@_model_wide(_C._cpp_delete_adapter)
def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Removes ``adapter_name`` from every layer (a merged adapter must be unmerged first)."""
    layers = lora_layers(model)
    next_active = _C._rules_plan_delete_adapter(_tables(layers), adapter_name)
    layers = layers + saved_modules(model)
    for _, layer in layers:
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
    if next_active:
        set_adapter(model, next_active)
    elif next_active == "":
        for _, layer in layers:
            layer.clear_active_adapter()


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
    "default_target_modules",
    "unload",
    "inject_lora",
    "add_adapter",
    "trainable_parameters",
    "print_trainable_parameters",
    "set_adapter",
    "disable_adapters",
    "enable_adapters",
    "delete_adapter",
    "merge",
    "unmerge",
    "merge_and_unload",
    "lora_layers",
    "saved_modules",
    "adapter_names",
    "active_adapter",
]
