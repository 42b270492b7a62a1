"""Which models are bound C++ modules: the one place that decides "C++ model or Python model"."""

from __future__ import annotations

import torch
from torch import nn


def cpp_module_of(model: nn.Module):
    """The C++ module behind a bound lorafuse C++ module (lorafuse.models.Llama, ...), else None."""
    return model.cpp_module if isinstance(model, torch.nn.cpp.ModuleWrapper) else None
