"""DoRA's per-adapter state in a Python LoRA layer (the numerics are the ops dora_weight_norm and dora_linear)."""

from __future__ import annotations

import torch
from torch import nn

class DoraMagnitude(nn.Module):
    """A DoRA adapter's magnitude vector: the parameter ``weight`` [out] (PEFT's ``lora_magnitude_vector[name].weight``,
    saved in files as ``lora_magnitude_vector``)."""

    def __init__(self, out_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"
