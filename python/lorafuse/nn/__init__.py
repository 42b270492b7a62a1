"""LoRA layers for models written in Python (Hugging Face transformers and any torch.nn.Module), the base
kinds they wrap, and the C++ layer bound from LibTorch."""

from .. import _C
from .base_kinds import BASE_KINDS, BaseKind, base_kind_of
from .linear4bit import Linear4bit
from .lora_embedding import Embedding
from .lora_attention import MultiheadAttention
from .lora_linear import AdapterOptions, Linear, MergeError
from .modules_to_save import ModulesToSave

# The C++ layer (lorafuse::nn::LoraLinear) bound with torch::python::bind_module: a torch.nn.Module whose
# keyword arguments are the C++ LoraLinearOptions fields (in_features, out_features, bias, adapter_name, r,
# lora_alpha, lora_dropout, use_rslora, init_lora_weights, adapter_dtype).
LoraLinear = _C.LoraLinear
LoraLinear.__module__ = __name__


def is_lora_layer(module) -> bool:
    """Whether ``module`` is a lorafuse LoRA layer of a Python model (the one place that asks)."""
    return isinstance(module, Linear)


def lora_layer_class(base: object) -> type:
    """The lorafuse layer that wraps ``base``: :class:`Embedding` for an embedding kind, :class:`MultiheadAttention`
    for an attention, else :class:`Linear`."""
    kind = base_kind_of(base)
    if kind is not None and kind.attention:
        return MultiheadAttention
    return Embedding if kind is not None and kind.embedding else Linear


__all__ = [
    "MergeError",
    "Linear",
    "Embedding",
    "ModulesToSave",
    "MultiheadAttention",
    "Linear4bit",
    "LoraLinear",
    "AdapterOptions",
    "BASE_KINDS",
    "BaseKind",
    "base_kind_of",
    "is_lora_layer",
    "lora_layer_class",
]
