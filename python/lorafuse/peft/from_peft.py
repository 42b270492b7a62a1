"""from_peft: a PEFT LoRA model's layers as lorafuse layers, in place, with the same outputs."""

from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch import nn

from .. import _C
from ..nn import ModulesToSave, base_kind_of, lora_layer_class


def _config_problems(name: str, config: Any) -> List[str]:
    problems = []
    if getattr(config, "lora_bias", False):
        problems.append(f'adapter "{name}" has a bias in lora_B (lora_bias=True)')
    if getattr(config, "layer_replication", None):
        problems.append(f'adapter "{name}" uses layer_replication')
    if getattr(config, "trainable_token_indices", None):
        problems.append(f'adapter "{name}" trains token embeddings (trainable_token_indices)')
    if getattr(config, "target_parameters", None):
        problems.append(f'adapter "{name}" targets parameters (target_parameters)')
    if getattr(config, "use_bdlora", None):
        problems.append(f'adapter "{name}" uses BD-LoRA (use_bdlora: block-diagonal factors)')
    return problems


def _task_type(config: Any) -> Any:
    """The adapter's PEFT task type as a str (peft.TaskType's value), or None."""
    task_type = getattr(config, "task_type", None)
    return getattr(task_type, "value", task_type)


def _convertible(module: nn.Module, peft_linear: type, peft_embedding: type) -> bool:
    """A PEFT LoRA layer that a lorafuse layer reproduces: PEFT's Linear over an nn.Linear of a lorafuse base kind,
    PEFT's Embedding over an nn.Embedding, or PEFT's bitsandbytes Linear4bit over bitsandbytes' NF4 Linear4bit (the
    bnb_linear4bit kind)."""
    kind = base_kind_of(module.base_layer)
    if kind is not None and not kind.selectable:  # an attention's out_proj: the attention never calls it
        return False
    if type(module) is peft_embedding:
        return kind is not None and kind.embedding
    if type(module) is peft_linear:  # over an nn.Linear or transformers' Conv1D
        return kind is not None and not kind.embedding and kind.quantized_state(module.base_layer) is None
    cls = type(module)
    return cls.__module__ == "peft.tuners.lora.bnb" and cls.__name__ == "Linear4bit" and kind is not None


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Replaces the LoRA layers of a PEFT model by :class:`lorafuse.nn.Linear` layers, in place.

    Each layer keeps its base layer and adopts PEFT's own ``lora_A`` / ``lora_B`` modules (the same
    parameter objects, so an optimizer built on the PEFT model keeps working), with the same ranks,
    scales, dropout, active adapter and enabled state. PEFT's ``ModulesToSaveWrapper`` layers (``modules_to_save``,
    task heads) become :class:`lorafuse.nn.ModulesToSave` layers holding the same original and copies. Outputs are
    the same as PEFT's.

    Args:
        peft_model: a ``peft.PeftModel`` whose tuner is LoRA.

    Returns:
        The underlying model (``peft_model.base_model.model``), now with lorafuse layers; use the
        ``lorafuse`` functions (set_adapter, merge, save_adapter, ...) on it from then on, not PEFT's wrapper
        (whose ``save_pretrained`` then refuses: it would write a file without the adapter's weights).

    Raises:
        TypeError: not a PEFT LoRA model.
        ValueError: a PEFT feature that lorafuse does not carry over, named — LoRA variants other than DoRA
            (aLoRA, KaSA, ...; DoRA is carried, its magnitude parameter adopted, over nn.Linear and Conv1D), a scaling
            other than lora_alpha/r (scale_layer), lora_bias, a fan_in_fan_out that does not fit the layer's weight, layer replication, trainable
            tokens, target_parameters, BD-LoRA, LoRA on layers other than nn.Linear, transformers' Conv1D and
            nn.Embedding (convolutions, quantized bases other than bitsandbytes' NF4), merged layers or
            several active adapters at once. Nothing is changed then.
    """
    try:
        import peft
        from peft.tuners.lora import Embedding as PeftEmbedding
        from peft.tuners.lora import Linear as PeftLinear
        from peft.tuners.lora import LoraLayer, LoraModel
    except ImportError as e:  # pragma: no cover - peft is a test dependency
        raise TypeError("peft_model: the peft package is not installed") from e
    if not isinstance(peft_model, peft.PeftModel) or not isinstance(peft_model.base_model, LoraModel):
        raise TypeError(
            f"peft_model: expected a peft.PeftModel with LoRA adapters, found {type(peft_model).__name__}"
        )
    model = peft_model.base_model.model

    problems: List[str] = []
    for name, config in peft_model.peft_config.items():
        problems += _config_problems(name, config)
    layers: List[Tuple[nn.Module, str, str, Any]] = []
    kept_whole: List[Tuple[nn.Module, str, Any]] = []  # PEFT's ModulesToSaveWrapper layers
    for path, module in model.named_modules():
        if type(module).__name__ == "ModulesToSaveWrapper":
            if len(module.active_adapters) > 1:
                problems.append(f'"{path}" has several active adapters {module.active_adapters}')
            if set(module.modules_to_save) != set(module._adapters):
                problems.append(f'"{path}" (modules_to_save) has copies {sorted(module.modules_to_save)} but adapters '
                                f"{sorted(module._adapters)}")
            parent_path, _, child = path.rpartition(".")
            kept_whole.append((model.get_submodule(parent_path) if parent_path else model, child, module))
            continue
        if type(module).__name__ == "TrainableTokensWrapper":
            problems.append(f'"{path}" is a {type(module).__name__}')
            continue
        if not isinstance(module, LoraLayer):
            continue
        if type(module).__name__ == "MultiheadAttention":
            problems.append(
                f'"{path}" is PEFT\'s MultiheadAttention LoRA layer, which in PEFT 0.21 adds its out_proj delta twice '
                "(PEFT pull request #3774) where lorafuse.nn.MultiheadAttention adds it once, so the converted model "
                "would compute something else; save the adapter (save_pretrained) and load it with "
                "lorafuse.load_adapter for LoRA's own outputs"
            )
            continue
        if path.endswith(".base_layer.out_proj") and type(module.base_layer).__name__ == "NonDynamicallyQuantizableLinear":
            continue  # the out_proj of a PEFT MultiheadAttention layer (named above)
        if not _convertible(module, PeftLinear, PeftEmbedding):
            problems.append(
                f'"{path}" is a PEFT {type(module).__name__} over a {type(module.base_layer).__name__}'
            )
            continue
        dora = base_kind_of(module.base_layer).dora_weight(module.base_layer) is not None
        variants = {
            a: type(v).__name__
            for a, v in getattr(module, "lora_variant", {}).items()
            if v is not None and not (dora and type(v).__name__ == "DoraLinearVariant")  # DoRA: lorafuse computes it
        }
        if variants:
            problems.append(f'"{path}" uses LoRA variants {variants} (they change the forward)')
        if bool(getattr(module, "fan_in_fan_out", False)) != base_kind_of(module.base_layer).fan_in_fan_out:
            problems.append(
                f'"{path}" has fan_in_fan_out={module.fan_in_fan_out} over a {type(module.base_layer).__name__}'
            )
        if module.merged_adapters:
            problems.append(f'"{path}" has merged adapters {module.merged_adapters}; unmerge them first')
        if len(module.active_adapters) > 1:
            problems.append(f'"{path}" has several active adapters {module.active_adapters}')
        base_dtype = base_kind_of(module.base_layer).weight_dtype(module.base_layer)
        embedding = type(module) is PeftEmbedding
        for adapter in module.lora_embedding_A if embedding else module.lora_A:
            if embedding:
                dtype = module.lora_embedding_A[adapter].dtype
                if dtype not in (base_dtype, torch.float32):
                    problems.append(f'"{path}" adapter "{adapter}" is {dtype} over a {base_dtype} base')
                continue
            factors = (type(module.lora_A[adapter]), type(module.lora_B[adapter]))
            if factors != (nn.Linear, nn.Linear):  # a variant's own factor modules (BD-LoRA's block-diagonal ones)
                problems.append(
                    f'"{path}" adapter "{adapter}" has lora_A/lora_B of types {factors[0].__name__}/'
                    f"{factors[1].__name__}, not nn.Linear"
                )
                continue
            dtype = module.lora_A[adapter].weight.dtype
            if dtype not in (base_dtype, torch.float32):
                problems.append(f'"{path}" adapter "{adapter}" is {dtype} over a {base_dtype} base')
            if module.lora_A[adapter].bias is not None or module.lora_B[adapter].bias is not None:
                problems.append(f'"{path}" adapter "{adapter}" has a bias in lora_A/lora_B')
            try:
                _C._validate_adapter(adapter, int(module.r[adapter]), float(module.lora_alpha[adapter]), 0.0)
            except ValueError as e:
                problems.append(f'"{path}" adapter "{adapter}": {e}')
                continue
            rslora = bool(module.use_rslora.get(adapter, False))
            r, alpha = int(module.r[adapter]), float(module.lora_alpha[adapter])
            expected = alpha / (r**0.5 if rslora else r)
            if abs(expected - float(module.scaling[adapter])) > 1e-12 * abs(expected):
                problems.append(
                    f'"{path}" adapter "{adapter}" has scaling {float(module.scaling[adapter])}, not '
                    f"lora_alpha / {'sqrt(r)' if rslora else 'r'} = {expected} (scale_layer?)"
                )
        parent_path, _, child = path.rpartition(".")
        layers.append((model.get_submodule(parent_path) if parent_path else model, child, path, module))
    if problems:
        raise ValueError(
            "from_peft: this PEFT model has features lorafuse does not carry over: " + "; ".join(problems)
        )
    if not layers:
        raise ValueError("from_peft: the PEFT model has no LoRA Linear layers")

    # Everything was checked above; build every new layer first, then swap them all in.
    converted = []
    for parent, child, _, old in layers:
        base = old.base_layer
        frozen = {id(p): p.requires_grad for p in base.parameters()}
        embedding = bool(old.lora_embedding_A)
        names = list(old.lora_embedding_A.keys() if embedding else old.lora_A.keys())
        magnitudes = getattr(old, "lora_magnitude_vector", {})

        def adapter_params(module, a):
            if embedding:
                return [module.lora_embedding_A[a], module.lora_embedding_B[a]]
            params = [module.lora_A[a].weight, module.lora_B[a].weight]
            return params + [module.lora_magnitude_vector[a].weight] if a in magnitudes else params

        requires = {id(p): p.requires_grad for a in names for p in adapter_params(old, a)}
        new = None
        for adapter in names:
            dropout = old.lora_dropout[adapter]
            p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
            kwargs = dict(
                r=int(old.r[adapter]),
                lora_alpha=float(old.lora_alpha[adapter]),
                lora_dropout=p,
                use_rslora=bool(old.use_rslora.get(adapter, False)),
                adapter_dtype=adapter_params(old, adapter)[0].dtype,
                task_type=_task_type(peft_model.peft_config.get(adapter)),
                bias=getattr(peft_model.peft_config.get(adapter), "bias", "none"),  # which biases save with it
                use_dora=adapter in magnitudes,
            )
            if new is None:
                new = lora_layer_class(base)(base, adapter_name=adapter, **kwargs)
            else:
                new.add_adapter(adapter, **kwargs)
            # adopt PEFT's modules: the very same parameters
            if embedding:
                new.lora_embedding_A[adapter] = old.lora_embedding_A[adapter]
                new.lora_embedding_B[adapter] = old.lora_embedding_B[adapter]
            else:
                new.lora_A[adapter] = old.lora_A[adapter]
                new.lora_B[adapter] = old.lora_B[adapter]
            if adapter in magnitudes:  # DoRA: PEFT's magnitude parameter itself
                new.lora_magnitude_vector[adapter].weight = magnitudes[adapter].weight
        active = old.active_adapters[0] if old.active_adapters else None
        if active in new.adapters:
            new.set_adapter(active)
        else:
            new.clear_active_adapter()
        if old.disable_adapters:
            new.disable_adapters()
        for p in base.parameters():
            p.requires_grad_(frozen[id(p)])
        for a in names:  # trainability as PEFT had it
            for p in adapter_params(new, a):
                p.requires_grad_(requires[id(p)])
        new.train(old.training)  # a new module starts in training mode; keep the model's mode
        converted.append((parent, child, new))
    for parent, child, old in kept_whole:  # the very same original and copies, in a lorafuse ModulesToSave
        requires = {id(p): p.requires_grad for p in old.parameters()}
        new = None
        for adapter, copy_module in old.modules_to_save.items():
            config = peft_model.peft_config.get(adapter)
            options = _C.AdapterOptions(
                int(getattr(config, "r", 8)), float(getattr(config, "lora_alpha", 8)), 0.0, False, True,
                getattr(config, "bias", "none"), None, _task_type(config), None, False,
            )
            if new is None:
                new = ModulesToSave(old.original_module, adapter, options, activate=False, copy_module=copy_module)
            else:
                new.add_adapter(adapter, options, activate=False, copy_module=copy_module)
        active = old.active_adapters[0] if old.active_adapters else None
        if active in new.adapters:
            new.set_adapter(active)
        if old.disable_adapters:
            new.disable_adapters()
        for p in new.parameters():  # trainability as PEFT had it
            p.requires_grad_(requires[id(p)])
        new.train(old.training)
        converted.append((parent, child, new))
    for parent, child, new in converted:
        setattr(parent, child, new)
    # PEFT's wrapper no longer finds its layers: its save_pretrained would write an adapter file without tensors
    peft_model.save_pretrained = _refuse_save
    return model


def _refuse_save(*args: Any, **kwargs: Any) -> None:
    raise ValueError(
        "save_pretrained: this PEFT model's LoRA layers were converted by lorafuse.from_peft, so PEFT's wrapper "
        "would write an adapter without its weights; save with lorafuse.save_adapter(model, dir, adapter_name) "
        "(PEFT's format: PeftModel.from_pretrained loads it)"
    )


__all__ = ["from_peft"]
