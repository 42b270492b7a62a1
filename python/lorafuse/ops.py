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


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    magnitude: Tensor,
    dropout_p: float = 0.0,
    base_out: Optional[Tensor] = None,
) -> Tensor:
    """A DoRA layer (PEFT's ``use_dora``): ``m / ‖W + scale·B·A‖ ⊙ (x·Wᵀ + scale·(x·Aᵀ)·Bᵀ) + b``, the row norm a
    constant (no gradient through it, as DoRA and PEFT do).

    Without dropout it is :func:`lora_linear` (bias left out) scaled per output column and the bias added: no second
    base GEMM (over a 16-bit x with float32 adapters: the base GEMM and the branch in float32, as PEFT, so that the
    gradients of A, B and m are not rounded to 16 bits), and the norm is computed as ‖W‖² + 2·scale·⟨W·Aᵀ, B⟩ + scale²·B·(A·Aᵀ)·Bᵀ per row, never forming a
    weight-sized tensor (``torch.ops.lorafuse.dora_weight_norm``). With dropout it is PEFT's form, the base output plus
    (g − 1)·dropout(x)·Wᵀ + g·scale·(dropout(x)·Aᵀ)·Bᵀ (a second base GEMM, as PEFT).

    Args:
        x, weight, bias, lora_a, lora_b, scale, dropout_p: as :func:`lora_linear`; weight may be any view [out, in]
            (Conv1D's transposed weight).
        magnitude: ``[out]``, the adapter's magnitude vector (float32 or the adapter's dtype).
        base_out: the base layer's own output for x (a base called as it is, hooks included), or None: computed here.

    Returns:
        ``[..., out]`` in x's dtype; differentiable with respect to x, bias, lora_a, lora_b, magnitude and base_out.
    """
    return torch.ops.lorafuse.dora_linear(
        x, weight, bias, lora_a, lora_b, float(scale), float(dropout_p), magnitude, base_out
    )


def lora_adapted_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """``W + scale·B·A`` in W's dtype (the product in the adapter's dtype): a base weight with an adapter added, for a
    layer that reads its weights instead of being called (``nn.MultiheadAttention``: lorafuse.nn.MultiheadAttention
    computes the attention with it). weight ``[out, in]``, lora_a ``[r, in]``, lora_b ``[out, r]``; differentiable in all
    three."""
    return torch.ops.lorafuse.lora_adapted_weight(weight, lora_a, lora_b, float(scale))


class NfWeight(NamedTuple):
    """A quantized weight (the one format of QLoRA and LQ-LoRA, see :class:`NfFormat`), with bitsandbytes' field names
    (transformers' 4-bit checkpoints name them so)."""

    packed: Tensor  #: uint8 [ceil(n*bits/8), 1]: the codes as a bit stream, most significant bit first
    absmax: Tensor  #: float32 [blocks], or uint8 [ceil(blocks*stat_bits/8)] (the statistics' codes)
    nested_absmax: Tensor  #: the statistics' scales [ceil(blocks/stat_blocksize)] with double quantization, else [0]
    offset: Tensor  #: float32 [] with double quantization, else [0]


#: A weight in NF4 as bitsandbytes stores it: :class:`NfWeight` at 4 bits.
Nf4Weight = NfWeight


class NfFormat(NamedTuple):
    """A quantized-weight format: NF-``bits`` codes (:func:`lorafuse.nf_code`) in absmax blocks of ``blocksize``
    weights, the block statistics quantized again.

    ``stat_bits`` = 0 keeps every absmax in float32 (``stat_blocksize`` 0); 8 is bitsandbytes' double quantization
    (the statistics around their mean in the dynamic 8-bit code, blocks of ``stat_blocksize``, bitsandbytes: 256);
    2 .. 7 is the LQ-LoRA reference's (above their minimum in the uniform code). Each index is taken against its
    block's exact absmax. ``NfFormat(4, 64, 8, 256)`` with float32 scales is bitsandbytes' NF4 with double
    quantization, to the bit."""

    bits: int = 4  #: 2 .. 8
    blocksize: int = 64  #: a power of two in [16, 4096]
    stat_bits: int = 8  #: 0 or 2 .. 8
    stat_blocksize: int = 256  #: a power of two in [16, 4096]; 0 with stat_bits = 0

    def bits_per_weight(self, stat_dtype: torch.dtype = torch.float32) -> float:
        """``bits + stat_bits/blocksize + (scale bits)/(blocksize*stat_blocksize)``; the one float32 offset per
        matrix is left out."""
        from . import _C

        return _C.nf_bits_per_weight(list(self), stat_dtype)


def quantize_nf(weight: Tensor, format: NfFormat = NfFormat(), stat_dtype: torch.dtype = torch.float32) -> NfWeight:
    """Quantizes ``weight`` (float32, bfloat16 or float16, any shape, read row-major, finite) in ``format``, the
    statistics' scales kept in ``stat_dtype`` (float32, bfloat16 or float16). ``quantize_nf4`` is this at 4 bits.

    Raises:
        ValueError: a format field out of range (named), a non-finite value (its flat index), an empty weight.
        TypeError: a weight or stat_dtype that is not float32, bfloat16 or float16.
    """
    return NfWeight(*torch.ops.lorafuse.quantize_nf(weight, list(format), stat_dtype))


def dequantize_nf(q: NfWeight, format: NfFormat, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight of ``shape`` in ``dtype`` that ``q`` encodes in ``format``: code · the statistic of its block in
    float32, rounded once to ``dtype``."""
    return torch.ops.lorafuse.dequantize_nf(
        q.packed, q.absmax, q.nested_absmax, q.offset, list(format), list(shape), dtype
    )


def nf_linear(x: Tensor, q: NfWeight, format: NfFormat, out_features: int, bias: Optional[Tensor] = None) -> Tensor:
    """``y = x @ W.T + bias`` for the quantized ``W`` [out_features, x.shape[-1]], dequantized a tile of rows at a
    time in x's dtype (the dense weight of a large layer never exists as a whole). Differentiable in ``x`` and
    ``bias``, never in ``W``."""
    return torch.ops.lorafuse.nf_linear(x, *q, list(format), int(out_features), bias)


def nf_lora_linear(
    x: Tensor,
    q: NfWeight,
    format: NfFormat,
    out_features: int,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """The LoRA layer over a quantized base in one op: ``nf_linear(x, q, format, out_features, bias) + scale *
    (dropout(x) @ lora_a.T) @ lora_b.T`` (the branch by ``lora_add``'s rules). Differentiable in ``x``, ``bias``,
    ``lora_a`` and ``lora_b``, never in the quantized weight."""
    return torch.ops.lorafuse.nf_lora_linear(
        x, *q, list(format), int(out_features), bias, lora_a, lora_b, float(scale), float(dropout_p)
    )


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


class LoraSegments(NamedTuple):
    """A batch's rows grouped by adapter (:func:`lora_segments`): adapter i's rows are
    ``order[offsets[i]:offsets[i + 1]]``; ``order[offsets[-1]:]`` are the rows of the base alone."""

    order: Tensor  #: int64 [rows], adapter by adapter (each adapter's rows in order), then the base's rows
    offsets: Tensor  #: int64 [adapters + 1]


def lora_segments(row_adapter: Tensor, num_adapters: int) -> LoraSegments:
    """Groups a batch's rows by adapter, once per batch (every layer of the forward reuses the result).

    Args:
        row_adapter: int64 ``[rows]``: each row's adapter index in ``[0, num_adapters)``, or -1 for the base alone.
        num_adapters: how many adapters the indices refer to.
    """
    return LoraSegments(*torch.ops.lorafuse.lora_segments(row_adapter, int(num_adapters)))


def lora_multi_add(
    base_out: Tensor,
    x: Tensor,
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    scale: Sequence[float],
    segments: LoraSegments,
    dropout_p: float = 0.0,
) -> Tensor:
    """Many adapters in one batch: ``base_out`` plus, for each row t of adapter i's segment, ``scale[i] *
    (dropout(x[t]) @ lora_a[i].T) @ lora_b[i].T`` — each row as :func:`torch.ops.lorafuse.lora_add` computes it
    (accumulation dtype, dropout mask of that row of the batch); rows without an adapter keep ``base_out``.

    Adapters may differ in rank (``lora_a[i]`` ``[r_i, in]``, ``lora_b[i]`` ``[out, r_i]``); nothing is padded.
    Differentiable in ``base_out``, ``x`` and every adapter's A and B: an adapter's gradients come from its own rows,
    as if it had been trained on them alone, so one backward trains several adapters at once.
    """
    return torch.ops.lorafuse.lora_multi_add(
        base_out, x, list(lora_a), list(lora_b), [float(s) for s in scale], segments.order, segments.offsets,
        float(dropout_p),
    )


def lora_token_add(
    base_out: Tensor,
    x: Tensor,
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    scale: Sequence[float],
    row_adapter: Tensor,
) -> Tensor:
    """Many adapters in one batch, per token (decode and serving): ``base_out`` plus, for each row t,
    ``scale[i] * (x[t] @ lora_a[i].T) @ lora_b[i].T`` with ``i = row_adapter[t]`` (int64, one per row of x; -1: the
    base alone). No dropout. The result of :func:`lora_multi_add` over :func:`lora_segments` of ``row_adapter``
    without grouping the rows first (on CUDA one kernel block per token). Differentiable."""
    return torch.ops.lorafuse.lora_token_add(
        base_out, x, list(lora_a), list(lora_b), [float(s) for s in scale], row_adapter
    )
