"""The LoRA layer over an ``nn.Embedding`` (PEFT's ``lora.Embedding``): the same adapters, rules and merges as
:class:`lorafuse.nn.Linear`, with the factors kept as PEFT keeps an embedding's."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .lora_linear import Linear


class _Factor:
    """What a route holds for one factor: ``weight`` is the Parameter in the layer's dict when forward runs (FSDP and
    load_state_dict(assign=True) put new ones in)."""

    __slots__ = ("params", "name")

    def __init__(self, params: nn.ParameterDict, name: str) -> None:
        self.params, self.name = params, name

    @property
    def weight(self) -> Tensor:
        return self.params[self.name]


class Embedding(Linear):
    """A frozen ``nn.Embedding`` with named LoRA adapters: ``y = E[x] + scale · (Aᵀ[x]) · Bᵀ``.

    As PEFT's: ``lora_embedding_A[name]`` [r, num_embeddings] and ``lora_embedding_B[name]`` [embedding_dim, r]
    (Parameters, saved as ``...lora_embedding_A`` / ``...lora_embedding_B``), started with A zeros and B normal(0, 1)
    (both normal with ``init_lora_weights=False``); float32 for a float16/bfloat16 base. The branch is
    ``torch.ops.lorafuse.lora_embedding`` (A's rows looked up as the base looks up its own, with its padding_idx,
    scale_grad_by_freq and sparse). As in PEFT, lora_dropout does not act on an embedding's branch. Merging adds
    scale·(B·A)ᵀ to the embedding matrix and unmerge restores it bit for bit. Not with DoRA, LoftQ, PiSSA or OLoRA
    (refused by name), nor in batches with one adapter per row.
    """

    _embedding = True

    def __init__(self, base_layer: nn.Embedding, adapter_name: str = "default", **kwargs) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)

    def _init_storage(self) -> None:
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _new_factors(self, name: str, r: int, device, dtype) -> tuple:
        a = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        b = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))

        def register() -> None:
            self.lora_embedding_A[name], self.lora_embedding_B[name] = a, b

        return a, b, register

    def _factors(self, name: str) -> Tuple[Tensor, Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _route_factors(self, name: str) -> tuple:
        return _Factor(self.lora_embedding_A, name), _Factor(self.lora_embedding_B, name)

    def _drop_factors(self, name: str) -> None:
        del self.lora_embedding_A[name], self.lora_embedding_B[name]

    @property
    def bias(self) -> Optional[Tensor]:
        return None

    def _routed_forward(self, x: Tensor, route: Optional[list]) -> Tensor:
        base = self.base_layer
        out = base(x)
        if route is None:
            return out
        lora_a, lora_b, scale, _dropout, _magnitude = route
        if not isinstance(out, Tensor) or out.shape != (*x.shape, self.out_features):
            raise ValueError(
                f"{type(base).__name__} returned {getattr(out, 'shape', type(out).__name__)} for indices of shape "
                f"{list(x.shape)}; an embedding's LoRA branch gives [..., {self.out_features}], so lorafuse will not add "
                "them"
            )
        padding_idx = -1 if base.padding_idx is None else int(base.padding_idx)
        return torch.ops.lorafuse.lora_embedding(
            out, x, lora_a.weight, lora_b.weight, scale, padding_idx, base.scale_grad_by_freq, base.sparse
        )

    def _mixed_forward(self, x: Tensor, mixed) -> Tensor:
        present, _, _, uniform = mixed.rows.plan(self._table, list(self._routes), [*x.shape, 1], x.device)
        if not present:
            return self.base_layer(x)
        if uniform:
            return self._routed_forward(x, self._routes[present[0]])
        raise ValueError(
            f"use_adapter({list(mixed.names)}): an embedding layer's adapters ({', '.join(present)}) in a batch with "
            "one adapter per row are not supported yet; run each adapter's rows in a batch of their own"
        )


__all__ = ["Embedding"]
