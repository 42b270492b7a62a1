"""lorafuse: fused LoRA linear layers for PyTorch, with CPU and CUDA kernels.

Importing this package registers the ``torch.ops.lorafuse.*`` operators.
"""

import torch  # noqa: F401  (loads libtorch before lorafuse's native library)

from . import _C, models, nn, peft, pretrained, quant
from .config import LoftQConfig, LoraConfig
from .ops import (
    NfFormat,
    NfWeight,
    Nf4Weight,
    dequantize_nf,
    dequantize_nf4,
    dora_linear,
    LoraSegments,
    lora_linear,
    lora_multi_add,
    lora_token_add,
    lora_segments,
    nf4_linear,
    nf4_lora_linear,
    nf_linear,
    nf_lora_linear,
    quantize_nf,
    quantize_nf4,
)
from .quant import (
    BitAllocation,
    LqDecomposition,
    LqLoraConfig,
    LqLoraReport,
    lq_lora,
    QuantConfig,
    allocate_bits,
    load_checkpoint,
    lq_decompose,
    quantize_model,
    save_checkpoint,
)
from .peft import (
    active_adapter,
    adapter_names,
    add_adapter,
    default_target_modules,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    from_peft,
    inject_lora,
    load_adapter,
    lora_layers,
    merge,
    merge_and_unload,
    unload,
    print_trainable_parameters,
    read_adapter,
    save_adapter,
    set_adapter,
    trainable_parameters,
    unmerge,
    use_adapter,
)

__version__: str = _C.__version__


def has_cuda_kernels() -> bool:
    """Whether this build of lorafuse has its CUDA kernels (``LORAFUSE_CUDA`` at build time)."""
    return bool(_C.has_cuda_kernels())


__all__ = [
    "lora_linear",
    "dora_linear",
    "LoraSegments",
    "lora_segments",
    "lora_multi_add",
    "lora_token_add",
    "quantize_nf4",
    "dequantize_nf4",
    "nf4_linear",
    "nf4_lora_linear",
    "Nf4Weight",
    "NfFormat",
    "NfWeight",
    "quantize_nf",
    "dequantize_nf",
    "nf_linear",
    "nf_lora_linear",
    "QuantConfig",
    "quantize_model",
    "lq_decompose",
    "LqDecomposition",
    "lq_lora",
    "LqLoraConfig",
    "LqLoraReport",
    "load_checkpoint",
    "save_checkpoint",
    "allocate_bits",
    "BitAllocation",
    "quant",
    "has_cuda_kernels",
    "__version__",
    "nn",
    "models",
    "pretrained",
    "peft",
    "LoftQConfig",
    "LoraConfig",
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
    "adapter_names",
    "active_adapter",
    "from_peft",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "use_adapter",
]
