"""LoRA for any torch.nn.Module: inject_lora and the adapter functions that add, activate, disable and delete adapters
model-wide (PEFT's LoraModel).

Which layers a config selects is decided by the C++ rules that C++ ``lorafuse::inject_lora`` uses
(:mod:`lorafuse.peft.model_tree`); merges and unloading are in :mod:`lorafuse.peft.merging`.
"""

from __future__ import annotations


from torch import nn

from .. import _C
from ..config import LoraConfig
from ..nn import (
    ModulesToSave,
    base_kind_of,
    is_lora_layer,
    lora_layer_class,
)
from ..nn.base_kinds import DenseLinear
from ..nn.modules_to_save import check_saved_module
from .model_tree import (
    _UNTIES,
    _bias_tables,
    _check_not_tied,
    _has_peft_layers,
    _is_target,
    _model_wide,
    _select,
    _sites,
    _tables,
    active_adapter,
    lora_layers,
    saved_modules,
)


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


__all__ = [
    "inject_lora",
    "add_adapter",
    "set_adapter",
    "disable_adapters",
    "enable_adapters",
    "delete_adapter",
]
