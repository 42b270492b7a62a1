"""Merging into a quantized (4-bit) base, part of every Python LoRA layer (lorafuse.nn.Linear): merge(requantize=True)
through lorafuse.nf_merge with the unmerged bytes kept for an exact unmerge, and merge_and_unload's dense layer."""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import nn

from .base_kinds import base_kind_of

_NF4_UNMERGED = ("packed_unmerged", "absmax_unmerged", "nested_absmax_unmerged", "offset_unmerged")


class MergeError(NamedTuple):
    """What merging into a 4-bit base cost (``merge(requantize=True)``; lorafuse.nf4_merge), with W' = dequant(W) +
    the adapters and Ŵ what the new 4 bits encode."""

    #: ‖Ŵ − W'‖ / ‖W'‖: the relative change of the layer's outputs for inputs with uncorrelated features
    output_error: float
    #: ‖Ŵ − W'‖ / ‖W' − dequant(W)‖: the rounding against what the adapters add (1.0: as large)
    adapter_error: float


class QuantizedMerge:
    """The 4-bit side of a LoRA layer's merges (it uses the layer's base_layer, _table, _merge_inputs, _refresh_route,
    in_features and out_features)."""

    @property
    def _unmerged_nf4(self) -> Optional[tuple]:
        """(packed, absmax, nested_absmax, offset) of a 4-bit base before a requantized merge, else None."""
        if self.packed_unmerged is None:
            return None
        return tuple(getattr(self, name) for name in _NF4_UNMERGED)

    @_unmerged_nf4.setter
    def _unmerged_nf4(self, state: Optional[tuple]) -> None:
        for name, tensor in zip(_NF4_UNMERGED, state or (None,) * len(_NF4_UNMERGED)):
            setattr(self, name, tensor)

    @property
    def merge_error(self) -> Optional["MergeError"]:
        """What re-quantizing the current merge cost (a 4-bit base merged with ``requantize=True``), else None."""
        return self._merge_error

    def _fold_4bit(self, kind, everything: List[str]) -> None:
        """merge(requantize=True) over a quantized base: lorafuse.nf_merge from the unmerged bytes (kept for
        unmerge)."""
        base = self.base_layer
        current = kind.quantized_state(base)
        packed, absmax, nested, offset = self._unmerged_nf4 if self.merged else current[:4]
        with torch.no_grad():
            *state, error = torch.ops.lorafuse.nf_merge(
                packed,
                absmax,
                nested,
                offset,
                current[4],
                [self.out_features, self.in_features],
                *self._merge_inputs(everything)[:3],  # no DoRA over a 4-bit base
            )
        kind.set_quantized_state(base, *state)
        if not self.merged:
            self._unmerged_nf4 = tuple(current[:4])
        self._merge_error = MergeError(*error.tolist())
        self._table.set_merged(everything)
        self._refresh_route()

    def _unloaded_dense(self) -> Optional[nn.Linear]:
        """For a 4-bit base: a new dense ``nn.Linear`` (compute dtype) holding dequant(W) + the adapter that
        merge_and_unload folds in (with a requantized merge, from the unmerged bytes and the merged adapters), summed
        in float32 and rounded once; None for bases merged in place. Changes nothing."""
        base = self.base_layer
        kind = base_kind_of(base)
        if kind is None or kind.quantized_state(base) is None:
            return None
        everything = self._table.unloaded_adapters()
        if self._unmerged_nf4 is not None:
            weight = torch.ops.lorafuse.dequantize_nf(
                *self._unmerged_nf4,
                kind.quantized_state(base)[4],
                [self.out_features, self.in_features],
                torch.float32,
            )
        else:
            weight = kind.dense_weight(base)
        with torch.no_grad():
            if everything:
                weight = torch.ops.lorafuse.lora_merge(weight, *self._merge_inputs(everything))
            dense = nn.Linear(
                self.in_features,
                self.out_features,
                bias=base.bias is not None,
                device=weight.device,
                dtype=kind.weight_dtype(base),
            )
            dense.weight.copy_(weight)
            dense.weight.requires_grad_(False)
            if base.bias is not None:
                dense.bias.copy_(base.bias)
                dense.bias.requires_grad_(base.bias.requires_grad)
        return dense
