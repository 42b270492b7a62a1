"""Quantizing a model's frozen base: QuantConfig and quantize_model (QLoRA's first step)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from ..nn.base_kinds import DenseLinear
from ..nn.linear4bit import _COMPUTE_DTYPES, Linear4bit
from ..ops import quantize_nf4


@dataclass
class QuantConfig:
    """How :func:`quantize_model` stores a model's Linear layers (bitsandbytes' names)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: Optional[torch.dtype] = None  #: None: each layer's weight dtype
    modules_to_not_convert: List[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self) -> None:
        if self.quant_type != "nf4":
            raise ValueError(f'quant_type: expected "nf4", found {self.quant_type!r}')
        if self.compute_dtype is not None and self.compute_dtype not in _COMPUTE_DTYPES:
            raise TypeError(f"compute_dtype: expected torch.float32, bfloat16 or float16, found {self.compute_dtype}")
        quantize_nf4(torch.empty(2, device="meta"), self.blocksize, self.double_quant)  # checks the blocksize


def quantize_model(model: nn.Module, config: Optional[QuantConfig] = None) -> nn.Module:
    """Replaces, in place, every plain ``nn.Linear`` of ``model`` by a :class:`Linear4bit` holding its weight in
    NF4 — except modules whose name or path ends with an entry of ``config.modules_to_not_convert`` — one layer
    at a time, so peak memory stays near the model's own. Then ``inject_lora`` adds adapters as usual (QLoRA).
    Returns ``model``."""
    config = config or QuantConfig()
    dense = DenseLinear()
    skip = tuple(config.modules_to_not_convert)
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            full = f"{path}.{name}" if path else name
            if not dense.matches(child) or any(full == s or full.endswith("." + s) for s in skip):
                continue
            setattr(
                module,
                name,
                Linear4bit.from_linear(child, config.compute_dtype, config.blocksize, config.double_quant),
            )
    return model


__all__ = ["QuantConfig", "quantize_model"]
