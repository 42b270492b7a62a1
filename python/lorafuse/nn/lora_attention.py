"""LoRA on torch.nn.MultiheadAttention (PEFT's ``lora.MultiheadAttention``)."""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _C
from ..ops import lora_adapted_weight
from .base_kinds import _has_hooks, base_kind_of
from .lora_linear import Linear
from .scope import MixedBatch


class MultiheadAttention(Linear):
    """A frozen ``nn.MultiheadAttention`` with named LoRA adapters on its packed q/k/v projection and its output
    projection, as PEFT's ``lora.MultiheadAttention`` adapts it.

    ``lora_A[name]`` [r, E] and ``lora_B[name]`` [3·E, r] adapt ``in_proj_weight`` [3·E, E]; the attention's
    ``out_proj`` becomes a :class:`lorafuse.nn.Linear` over it (``base_layer.out_proj``, as PEFT places it; its
    ``weight`` and ``bias`` are the original's) holding the output projection's ``lora_A[name]`` [r, E] and
    ``lora_B[name]`` [E, r] (in PEFT's files: ``<path>.base_layer.out_proj.lora_A.weight``).
    The attention reads those weights without calling a module, so the layer computes the attention itself
    (``F.multi_head_attention_forward``, the module's own path) with the adapted weights W + scale·B·A
    (``torch.ops.lorafuse.lora_adapted_weight``), which carry
    the gradients to A and B; it writes nothing into the module, so threads may run their own adapters at once.
    PEFT 0.21 adds the output projection's delta twice (W + 2·scale·B·A, in its forward and its merges; its pull
    request #3774 fixes that): lorafuse computes W + scale·B·A, what LoRA and the fixed PEFT compute. As in PEFT, ``lora_dropout`` does not act on these adapters (a warning says so), DoRA and LoftQ/PiSSA/OLoRA are refused,
    and one adapter per row of a batch is refused. Merges fold both adapters into the two weights (and unmerge
    restores them exactly); ``merge_and_unload`` returns the ``nn.MultiheadAttention``.
    """

    _attention = True

    def __init__(self, base_layer: nn.MultiheadAttention, adapter_name: str = "default", **kwargs) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        # PyTorch's fused transformer paths (TransformerEncoderLayer in eval mode) read the attention's weights and skip
        # its forward unless a hook is attached: a no-op pre-hook keeps them on the path that calls this layer
        self.register_forward_pre_hook(_calls_forward)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        if name == "in_proj_weight":
            raise AttributeError(
                "lorafuse.nn.MultiheadAttention: in_proj_weight is adapted (W + scale·B·A) inside forward; "
                "base_layer.in_proj_weight is the frozen base weight (nn.TransformerEncoder reads it for its nested-tensor "
                "path: build it with enable_nested_tensor=False)"
            )
        modules = self.__dict__.get("_modules", {})
        if "base_layer" in modules:  # embed_dim, num_heads, batch_first, in_proj_bias, ... of the attention, as PEFT
            return getattr(modules["base_layer"], name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def add_adapter(
        self,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights=True,
        adapter_dtype: Optional[torch.dtype] = None,
        bias: str = "none",
        task_type: Optional[str] = None,
        loftq_config=None,
        use_dora: bool = False,
        *,
        activate: bool = True,
    ) -> None:
        """Adds adapter ``adapter_name`` to both projections (see :meth:`lorafuse.nn.Linear.add_adapter`)."""
        base = self.base_layer
        kind = base_kind_of(base)
        what = f'add_adapter("{adapter_name}")'
        why = kind.refusal(base)
        if why is not None:
            raise ValueError(f"{what}: nn.MultiheadAttention: {why}")
        if use_dora:
            raise ValueError(f"{what}: use_dora=True: {kind.dora_refusal(base)}")
        if isinstance(init_lora_weights, str) and _C._init_changes_base(init_lora_weights):
            raise ValueError(
                f'{what}: init_lora_weights "{init_lora_weights}" starts from a plain nn.Linear weight; '
                "nn.MultiheadAttention's adapters start as PEFT's default does (init_lora_weights=True)"
            )
        options = dict(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
            init_lora_weights=init_lora_weights, adapter_dtype=adapter_dtype, bias=bias, task_type=task_type,
        )
        out = base.out_proj if isinstance(base.out_proj, Linear) else None
        super().add_adapter(adapter_name, **options, activate=activate)
        if out is None:  # the first adapter: the output projection's layer, over the attention's own out_proj
            out = Linear(base.out_proj, adapter_name, **options)
            if not activate:
                out.clear_active_adapter()
            out.train(base.out_proj.training)
            base.out_proj = out
        else:
            out.add_adapter(adapter_name, **options, activate=activate)
        if float(lora_dropout) > 0:
            warnings.warn(
                f"{what}: lora_dropout={lora_dropout} does not act on nn.MultiheadAttention's adapters: the attention "
                "computes with the adapted weights whole (as in PEFT)",
                UserWarning,
                stacklevel=2,
            )

    @property
    def out_proj_layer(self) -> Linear:
        """The output projection's LoRA layer (the attention's ``out_proj``)."""
        return self.base_layer.out_proj

    # ---- both projections follow the same table -------------------------------------------------
    def set_adapter(self, adapter_name: str) -> None:
        super().set_adapter(adapter_name)
        self.out_proj_layer.set_adapter(adapter_name)

    def clear_active_adapter(self) -> None:
        super().clear_active_adapter()
        self.out_proj_layer.clear_active_adapter()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.out_proj_layer.adapters:  # merge_and_unload empties the output projection first
            self.out_proj_layer.delete_adapter(adapter_name)

    def disable_adapters(self) -> None:
        super().disable_adapters()
        self.out_proj_layer.disable_adapters()

    def enable_adapters(self) -> None:
        super().enable_adapters()
        self.out_proj_layer.enable_adapters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.out_proj_layer.reset_parameters()

    def merge(self, adapter_names=None, requantize: bool = False) -> None:
        """Folds the adapters into ``in_proj_weight`` and ``out_proj.weight``; both or neither."""
        before = list(self.merged_adapters)
        super().merge(adapter_names, requantize)
        try:
            self.out_proj_layer.merge(adapter_names, requantize)
        except BaseException:
            if self.merged:
                super().unmerge()
            if before:
                super().merge(before)
            raise

    def unmerge(self) -> None:
        super().unmerge()
        self.out_proj_layer.unmerge()

    def merge_and_unload(self) -> nn.MultiheadAttention:
        """Merges the active adapter for good into both weights and returns the ``nn.MultiheadAttention`` (its own
        out_proj back in place)."""
        out = self.out_proj_layer.merge_and_unload()
        base = super().merge_and_unload()
        base.out_proj = out
        return base

    def unloaded_base(self) -> nn.MultiheadAttention:
        """The ``nn.MultiheadAttention`` with its own out_proj back in place, the adapters dropped (unload)."""
        base = self.base_layer
        base.out_proj = self.out_proj_layer.base_layer
        return base

    # ---- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        base = self.base_layer
        route, out_route = self._route_now(), self.out_proj_layer._route_now()
        if isinstance(route, MixedBatch) or isinstance(out_route, MixedBatch):
            raise ValueError(
                "use_adapter with one adapter per row: nn.MultiheadAttention's adapters adapt its weights, one set per "
                "call, so lorafuse (as PEFT) does not run them per row; run each adapter's rows in a batch of their own"
            )
        if route is None and out_route is None:  # the base alone: the module as it is (its fast path, its hooks)
            return base(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average_attn_weights, is_causal=is_causal,
            )
        if _has_hooks(base):
            raise ValueError(
                "nn.MultiheadAttention has forward hooks (or a replaced forward): lorafuse computes the adapted "
                "attention itself, so they would not run; remove them, or leave the attention out of target_modules"
            )
        return _attention(
            base, query, key, value, _adapted(base.in_proj_weight, route), _adapted(base.out_proj.weight, out_route),
            key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal,
        )


def _calls_forward(module: nn.Module, args: tuple) -> None:
    """The pre-hook that declines PyTorch's fused transformer paths for an adapted attention (it changes nothing)."""
    return None


def _adapted(weight: Tensor, route: Optional[list]) -> Tensor:
    """W + scale·B·A in W's dtype (op ``lora_adapted_weight``, the C++ layer's too); W alone for no route."""
    if route is None:
        return weight
    return lora_adapted_weight(weight, route[0].weight, route[1].weight, route[2])


def _attention(base, query, key, value, in_proj_weight, out_proj_weight, key_padding_mask, need_weights, attn_mask,
               average_attn_weights, is_causal):
    """nn.MultiheadAttention.forward's own computation (query, key and value of one embed_dim) with these weights."""
    is_batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype,
        check_other=False,
    )
    if base.batch_first and is_batched:  # keeping "query is key is value", which lets the projection run packed
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    out, weights = F.multi_head_attention_forward(
        query, key, value, base.embed_dim, base.num_heads, in_proj_weight, base.in_proj_bias, base.bias_k, base.bias_v,
        base.add_zero_attn, base.dropout, out_proj_weight, base.out_proj.bias, training=base.training,
        key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
        average_attn_weights=average_attn_weights, is_causal=is_causal,
    )
    if base.batch_first and is_batched:
        return out.transpose(1, 0), weights
    return out, weights


__all__ = ["MultiheadAttention"]
