"""A frozen linear layer whose weight is stored quantized: 4-bit NF4 (QLoRA's base) or another format of the family
(LQ-LoRA's 2 .. 8-bit bases)."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from .. import _C
from ..ops import NfFormat, NfWeight, quantize_nf, quantize_nf4

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Linear4bit(nn.Module):
    """``y = x @ W.T + b`` with ``W`` [out_features, in_features] kept in NF4 as bitsandbytes stores it (the
    buffers ``packed``, ``absmax``, ``nested_absmax``, ``offset``: the bytes of
    ``bitsandbytes.functional.quantize_4bit(W, quant_type="nf4")``). The weight is frozen: it has no gradient and
    no Parameter; the bias, if any, is a Parameter (frozen by inject_lora unless a ``bias`` mode trains it).

    The input is cast to ``compute_dtype`` (float32, bfloat16 or float16) and the output back to the input's
    dtype, as ``bitsandbytes.nn.Linear4bit`` does (``torch.ops.lorafuse.linear_nf``, which the C++ Linear4bit runs
    too); ``nf_linear`` computes it a tile of rows at a time. Make one with :meth:`from_linear` or
    :func:`lorafuse.quantize_model`.

    ``bits``, ``stat_bits``, ``stat_blocksize`` and ``stat_dtype`` choose another format of the family
    (:class:`lorafuse.NfFormat`; LQ-LoRA's bases, :func:`lorafuse.lq_lora`); the defaults are bitsandbytes' NF4.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        blocksize: int = 64,
        double_quant: bool = True,
        device: Optional[torch.device] = None,
        *,
        bits: int = 4,
        stat_bits: int = 8,
        stat_blocksize: int = 256,
        stat_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if compute_dtype not in _COMPUTE_DTYPES:
            raise TypeError(f"compute_dtype: expected torch.float32, bfloat16 or float16, found {compute_dtype}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.compute_dtype = compute_dtype
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        self.bits, self.stat_bits, self.stat_blocksize = int(bits), int(stat_bits), int(stat_blocksize)
        self.stat_dtype = stat_dtype
        meta = torch.zeros(self.out_features, self.in_features, device="meta")
        if self.is_nf4:  # bitsandbytes' block sizes checked by name
            q = quantize_nf4(meta, blocksize, double_quant)
        else:
            q = quantize_nf(meta, self.nf_format, stat_dtype)
        for name, t in zip(NfWeight._fields, q):
            self.register_buffer(name, torch.empty(t.shape, dtype=t.dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=compute_dtype)) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compute_dtype: Optional[torch.dtype] = None,
        blocksize: int = 64,
        double_quant: bool = True,
        **format_fields,
    ) -> "Linear4bit":
        """``linear``'s weight quantized to NF4 (kept on its device, see :meth:`from_weight`), its bias in
        ``compute_dtype``, which defaults to the weight's dtype. ``format_fields``: ``bits``, ``stat_bits``,
        ``stat_blocksize``, ``stat_dtype`` for another format."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, found {type(linear).__name__}")
        return cls.from_weight(linear.weight, linear.bias, compute_dtype, blocksize, double_quant, **format_fields)

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Optional[Tensor] = None,
        compute_dtype: Optional[torch.dtype] = None,
        blocksize: int = 64,
        double_quant: bool = True,
        *,
        bits: int = 4,
        stat_bits: int = 8,
        stat_blocksize: int = 256,
        stat_dtype: torch.dtype = torch.float32,
    ) -> "Linear4bit":
        """A layer holding ``weight`` [out_features, in_features] in NF4 (on its device; a CUDA weight is quantized by the
        CUDA kernels, or through the CPU in a build without them: the same bytes) and ``bias`` (None for none; a frozen copy in ``compute_dtype`` unless it requires grad), with
        ``compute_dtype`` defaulting to the weight's dtype."""
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            found = list(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(f"weight: expected a tensor [out_features, in_features], found {found}")
        if compute_dtype is not None and compute_dtype not in _COMPUTE_DTYPES:
            raise TypeError(f"compute_dtype: expected torch.float32, bfloat16 or float16, found {compute_dtype}")
        # lorafuse::nn::Linear4bitImpl::from_weight: where it quantizes (a CUDA weight through the CPU in a build
        # without CUDA kernels: the same bytes), the bias's dtype and requires_grad
        parts = _C._linear4bit_from_weight(
            weight.detach(), bias, compute_dtype, blocksize, double_quant, bits, stat_bits, stat_blocksize, stat_dtype
        )
        return cls._from_parts(parts)

    @classmethod
    def _from_parts(cls, parts: tuple) -> "Linear4bit":
        """The layer from a C++ Linear4bit's parts (in, out, compute_dtype, blocksize, double_quant, (bits, stat_bits,
        stat_blocksize, stat_dtype), packed, absmax, nested_absmax, offset, bias or None), its tensors taken as they
        are."""
        in_features, out_features, compute_dtype, blocksize, double_quant, fields, *quantized, bias = parts
        bits, stat_bits, stat_blocksize, stat_dtype = fields
        layer = cls(
            in_features, out_features, bias is not None, compute_dtype, blocksize, double_quant, "meta",
            bits=bits, stat_bits=stat_bits, stat_blocksize=stat_blocksize, stat_dtype=stat_dtype,
        )
        layer.packed, layer.absmax, layer.nested_absmax, layer.offset = quantized
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=bias.requires_grad)
        return layer

    @property
    def quantized(self) -> NfWeight:
        return NfWeight(self.packed, self.absmax, self.nested_absmax, self.offset)

    @property
    def nf_format(self) -> NfFormat:
        """The quantized-weight format (the statistics' fields 0 without double quantization)."""
        dq = self.double_quant
        return NfFormat(self.bits, self.blocksize, self.stat_bits if dq else 0, self.stat_blocksize if dq else 0)

    @property
    def format(self) -> List[int]:
        """:attr:`nf_format` as the ops take it."""
        return list(self.nf_format)

    @property
    def is_nf4(self) -> bool:
        """Whether the weight is bitsandbytes' NF4 (4 bits; its double quantization or none): what its checkpoints
        hold (lorafuse::is_bnb_nf4)."""
        return _C._is_bnb_nf4(self.format, self.stat_dtype)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dense weight [out, in] that the quantized bytes encode (a new tensor), in ``dtype`` (default
        compute_dtype)."""
        return torch.ops.lorafuse.dequantize_nf(
            *self.quantized, self.format, [self.out_features, self.in_features], dtype or self.compute_dtype
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.lorafuse.linear_nf(
            x, *self.quantized, self.format, self.out_features, self.bias, self.compute_dtype
        )

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "weight":
                raise
        # code written for nn.Linear asks for it: say where the weight is instead
        raise AttributeError(
            "Linear4bit has no dense 'weight': it holds W quantized (the buffers packed, absmax, nested_absmax, "
            "offset); dequantized_weight(dtype) gives a dense copy, compute_dtype the dtype it computes in"
        )

    def extra_repr(self) -> str:
        kind = "nf4" if self.is_nf4 else f"nf{self.bits}"
        stats = ""
        if not self.is_nf4 and self.double_quant:
            stats = f", stat_bits={self.stat_bits}, stat_blocksize={self.stat_blocksize}, stat_dtype={self.stat_dtype}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{kind}, blocksize={self.blocksize}, double_quant={self.double_quant}{stats}, "
            f"compute_dtype={self.compute_dtype}"
        )


__all__ = ["Linear4bit"]
