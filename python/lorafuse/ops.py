"""Python front of the lorafuse operators (backed by ``torch.ops.lorafuse``)."""

from typing import Optional

import torch
from torch import Tensor


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """``y = x @ weight.T + bias + scale * (dropout(x) @ lora_a.T) @ lora_b.T`` in one fused op.

    Args:
        x: input ``[..., in]`` (float32, float16, bfloat16; float64 too).
        weight: the frozen base weight ``[out, in]``, x's dtype. It never receives a gradient and must
            not require one.
        bias: ``[out]`` in x's dtype, or ``None``.
        lora_a: ``[r, in]``, x's dtype or float32 (adapters may be kept in float32).
        lora_b: ``[out, r]``, lora_a's dtype.
        scale: the LoRA scale, ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).
        dropout_p: dropout probability in ``[0, 1)`` on the LoRA branch only. The mask follows torch's
            default generator for x's device (``torch.manual_seed`` reproduces it) and backward
            regenerates exactly the forward's mask.

    Returns:
        ``[..., out]`` in x's dtype. Differentiable with respect to x, bias, lora_a and lora_b; works
        under ``torch.compile(fullgraph=True)`` and on the meta device.

    Raises:
        ValueError: a shape, device or value does not fit (the message names the argument).
        TypeError: a dtype does not fit.
    """
    return torch.ops.lorafuse.lora_linear(x, weight, bias, lora_a, lora_b, float(scale), float(dropout_p))
