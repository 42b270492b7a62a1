"""A frozen linear layer whose weight is stored in 4-bit NF4 (QLoRA's base)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _C
from ..ops import Nf4Weight, dequantize_nf4, quantize_nf4

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Linear4bit(nn.Module):
    """``y = x @ W.T + b`` with ``W`` [out_features, in_features] kept in NF4 as bitsandbytes stores it (the
    buffers ``packed``, ``absmax``, ``nested_absmax``, ``offset``: the bytes of
    ``bitsandbytes.functional.quantize_4bit(W, quant_type="nf4")``). The weight is frozen: it has no gradient and
    no Parameter; the bias, if any, is a Parameter (frozen by inject_lora unless a ``bias`` mode trains it).

    The input is cast to ``compute_dtype`` (float32, bfloat16 or float16) and the output back to the input's
    dtype, as ``bitsandbytes.nn.Linear4bit`` does (``torch.ops.lorafuse.linear4bit``, which the C++ Linear4bit runs
    too); ``nf4_linear`` computes it a tile of rows at a time. Make one with :meth:`from_linear` or
    :func:`lorafuse.quantize_model`.
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
    ) -> None:
        super().__init__()
        if compute_dtype not in _COMPUTE_DTYPES:
            raise TypeError(f"compute_dtype: expected torch.float32, bfloat16 or float16, found {compute_dtype}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.compute_dtype = compute_dtype
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        q = quantize_nf4(torch.zeros(self.out_features, self.in_features, device="meta"), blocksize, double_quant)
        for name, t in zip(Nf4Weight._fields, q):
            self.register_buffer(name, torch.empty(t.shape, dtype=t.dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=compute_dtype)) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compute_dtype: Optional[torch.dtype] = None,
        blocksize: int = 64,
        double_quant: bool = True,
    ) -> "Linear4bit":
        """``linear``'s weight quantized to NF4 (kept on its device, see :meth:`from_weight`), its bias in ``compute_dtype``, which defaults to the weight's dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, found {type(linear).__name__}")
        return cls.from_weight(linear.weight, linear.bias, compute_dtype, blocksize, double_quant)

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Optional[Tensor] = None,
        compute_dtype: Optional[torch.dtype] = None,
        blocksize: int = 64,
        double_quant: bool = True,
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
        return cls._from_parts(_C._linear4bit_from_weight(weight.detach(), bias, compute_dtype, blocksize, double_quant))

    @classmethod
    def _from_parts(cls, parts: tuple) -> "Linear4bit":
        """The layer from a C++ Linear4bit's parts (in, out, compute_dtype, blocksize, double_quant, packed, absmax,
        nested_absmax, offset, bias or None), its tensors taken as they are."""
        in_features, out_features, compute_dtype, blocksize, double_quant, *quantized, bias = parts
        layer = cls(in_features, out_features, bias is not None, compute_dtype, blocksize, double_quant, "meta")
        layer.packed, layer.absmax, layer.nested_absmax, layer.offset = quantized
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=bias.requires_grad)
        return layer

    @property
    def quantized(self) -> Nf4Weight:
        return Nf4Weight(self.packed, self.absmax, self.nested_absmax, self.offset)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dense weight [out, in] that the 4 bits encode (a new tensor), in ``dtype`` (default compute_dtype)."""
        return dequantize_nf4(
            self.quantized, [self.out_features, self.in_features], dtype or self.compute_dtype, self.blocksize
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.lorafuse.linear4bit(
            x, *self.quantized, self.blocksize, self.out_features, self.bias, self.compute_dtype
        )

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "weight":
                raise
        # code written for nn.Linear asks for it: say where the weight is instead
        raise AttributeError(
            "Linear4bit has no dense 'weight': it holds W in 4 bits (the buffers packed, absmax, nested_absmax, "
            "offset); dequantized_weight(dtype) gives a dense copy, compute_dtype the dtype it computes in"
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4, blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )


__all__ = ["Linear4bit"]
