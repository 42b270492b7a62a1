"""Model-wide LoRA: inject_lora and the adapter functions (PEFT's LoraModel), adapter files in PEFT's format,
per-thread adapter routing, and conversion of PEFT models. On a bound C++ model every function runs the C++
implementation (the switch is :func:`lorafuse.peft.model_tree._model_wide`)."""

from .files import load_adapter, read_adapter, save_adapter
from .from_peft import from_peft
from .inject import add_adapter, delete_adapter, disable_adapters, enable_adapters, inject_lora, set_adapter
from .merging import merge, merge_and_unload, unload, unmerge
from .model_tree import (
    active_adapter,
    adapter_names,
    default_target_modules,
    lora_layers,
    print_trainable_parameters,
    saved_modules,
    trainable_parameters,
)
from .routing import use_adapter

__all__ = [
    "inject_lora",
    "default_target_modules",
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
    "unload",
    "lora_layers",
    "saved_modules",
    "adapter_names",
    "active_adapter",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "use_adapter",
    "from_peft",
]
