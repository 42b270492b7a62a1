"""Python front of the lorafuse operators (backed by ``torch.ops.lorafuse``)."""

from typing import NamedTuple, Optional, Sequence

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


class Nf4Weight(NamedTuple):
    """A weight in NF4 as bitsandbytes stores it (and transformers' 4-bit checkpoints name it)."""

    packed: Tensor  #: uint8 [ceil(n/2), 1]: two 4-bit codes per byte, the first element in the high nibble
    absmax: Tensor  #: float32 [blocks], or uint8 [blocks] (8-bit codes) with double quantization
    nested_absmax: Tensor  #: float32 [ceil(blocks/256)] with double quantization, else [0]
    offset: Tensor  #: float32 [] (mean of the first-level absmax) with double quantization, else [0]


def quantize_nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> Nf4Weight:
    """NF4 (4-bit NormalFloat) quantization with bitsandbytes' exact bytes: the same as
    ``bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4",
    compress_statistics=double_quant)`` on the CPU.

    The weight (float32, bfloat16 or float16, any shape, read row-major) is split into blocks of ``blocksize``
    (32, 64, ..., 4096) elements; each block keeps its absmax and each element the nearest of the 16 NF4 codes of
    ``w / absmax`` (ties to the lower code). With ``double_quant`` the block statistics are stored again in 8 bits
    (blocks of 256) around their mean: 4.127 bits per weight at blocksize 64.

    Raises:
        ValueError: a non-finite value (the message gives its flat index), an empty weight, a blocksize
            bitsandbytes does not allow.
        TypeError: a weight that is not float32, bfloat16 or float16.
    """
    return Nf4Weight(*torch.ops.lorafuse.quantize_nf4(weight, int(blocksize), bool(double_quant)))


def dequantize_nf4(
    q: Nf4Weight, shape: Sequence[int], dtype: torch.dtype = torch.float32, blocksize: int = 64
) -> Tensor:
    """The weight of ``shape`` in ``dtype`` that ``q`` encodes: code · absmax of its block in float32 (the
    statistics decoded first when double-quantized), rounded once to ``dtype`` — bitsandbytes' dequantize_4bit."""
    # without double quantization nested_absmax and offset are empty, which the ops read as "not nested"
    return torch.ops.lorafuse.dequantize_nf4(
        q.packed, q.absmax, q.nested_absmax, q.offset, int(blocksize), list(shape), dtype
    )


def nf4_linear(x: Tensor, q: Nf4Weight, out_features: int, bias: Optional[Tensor] = None, blocksize: int = 64) -> Tensor:
    """``y = x @ W.T + bias`` for the NF4 weight ``W`` [out_features, x.shape[-1]] that ``q`` holds, dequantized a
    tile of rows at a time in x's dtype (at most ~16 MiB of float32 in a per-thread scratch buffer on the CPU: the dense
    weight of a large layer never exists as a whole). Differentiable in ``x`` and
    ``bias``, never in ``W``. The QLoRA layer in one op is :func:`nf4_lora_linear`."""
    return torch.ops.lorafuse.nf4_linear(
        x, q.packed, q.absmax, q.nested_absmax, q.offset, int(blocksize), int(out_features), bias
    )


def nf4_lora_linear(
    x: Tensor,
    q: Nf4Weight,
    out_features: int,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    blocksize: int = 64,
) -> Tensor:
    """The QLoRA layer in one op: ``nf4_linear(x, q, out_features, bias) + scale * (dropout(x) @ lora_a.T) @ lora_b.T``,
    ``lora_a`` [r, in] and ``lora_b`` [out_features, r] in x's dtype or float32 (the branch accumulates in float32,
    float64 for float64). Differentiable in ``x``, ``bias``, ``lora_a`` and ``lora_b``, never in the 4-bit weight. On
    the CPU one kernel: the branch is added into the base's output in place and dX's two terms are summed into one
    buffer. No autocast rule of its own (the base computes in x's dtype, as ``nf4_linear``); the 4-bit LoRA layers
    call ``lora_linear4bit``, which under autocast computes the base in its compute dtype and the branch as
    ``lora_add`` does."""
    return torch.ops.lorafuse.nf4_lora_linear(
        x, *q, int(blocksize), int(out_features), bias, lora_a, lora_b, float(scale), float(dropout_p)
    )
