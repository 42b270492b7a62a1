"""Quantizing a model's frozen base: QuantConfig and quantize_model (QLoRA's first step); LQ-LoRA's bit
allocation (allocate_bits), decomposition of a matrix (lq_decompose) and the whole method on a model (lq_lora)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from .. import _C
from .._cpp import cpp_module_of as _cpp
from ..nn.base_kinds import DenseLinear
from ..nn.linear4bit import Linear4bit


@dataclass
class QuantConfig:
    """How :func:`quantize_model` stores a model's Linear layers (bitsandbytes' names)."""

    quant_type: str = "nf4"  #: or "nf2", "nf3", "nf5" ... "nf8": the same family, which only lorafuse loads
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: Optional[torch.dtype] = None  #: None: each layer's weight dtype
    modules_to_not_convert: List[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self) -> None:
        self.modules_to_not_convert = list(self.modules_to_not_convert)
        _C._validate_quant_config(*self._fields())  # the C++ QuantConfig's rules

    @property
    def bits(self) -> int:
        """The bits of quant_type ("nf3" → 3; the C++ QuantConfig::bits)."""
        return _C._validate_quant_config(*self._fields())

    def _fields(self) -> tuple:
        return self.quant_type, self.blocksize, self.double_quant, self.compute_dtype, self.modules_to_not_convert


def quantize_model(model: nn.Module, config: Optional[QuantConfig] = None) -> nn.Module:
    """Replaces, in place, every plain ``nn.Linear`` of ``model`` by a :class:`Linear4bit` holding its weight in
    NF4 — except modules whose name or path ends with an entry of ``config.modules_to_not_convert`` — one layer
    at a time, so peak memory stays near the model's own. Then ``inject_lora`` adds adapters as usual (QLoRA).
    Returns ``model``."""
    config = config or QuantConfig()
    cpp = _cpp(model)
    if cpp is not None:  # a bound C++ model (the reference Llama): lorafuse::quantize_model
        _C._cpp_quantize_model(cpp, *config._fields())
        return model
    dense = DenseLinear()
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            full = f"{path}.{name}" if path else name
            if not dense.matches(child) or _C._quant_keeps_dense(full, config.modules_to_not_convert):
                continue
            setattr(
                module,
                name,
                Linear4bit.from_linear(
                    child, config.compute_dtype, config.blocksize, config.double_quant, bits=config.bits
                ),
            )
    return model


from .bit_allocation import BitAllocation, allocate_bits  # noqa: E402
from .decompose import LqDecomposition, lq_decompose  # noqa: E402
from .lq_lora import (  # noqa: E402
    LqLoraConfig,
    LqLoraReport,
    LqMatrixReport,
    empirical_fisher,
    lq_default_grid,
    lq_lora,
    lq_paper_grid,
    quant_choice_name,
)
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402  (it takes QuantConfig from here)

__all__ = [
    "QuantConfig",
    "quantize_model",
    "load_checkpoint",
    "save_checkpoint",
    "BitAllocation",
    "allocate_bits",
    "LqDecomposition",
    "lq_decompose",
    "LqLoraConfig",
    "LqLoraReport",
    "LqMatrixReport",
    "empirical_fisher",
    "lq_default_grid",
    "lq_lora",
    "lq_paper_grid",
    "quant_choice_name",
]
