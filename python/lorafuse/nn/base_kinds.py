"""The one list of base layers that a lorafuse LoRA layer can wrap (as PEFT's dispatcher list).

Each kind says whether it takes a module, how the LoRA layer runs over it and whether adapters can be
merged into it. :func:`base_kind_of` asks the kinds in order; nothing else in lorafuse asks "which kind of
linear layer is this".

Kinds today:

``linear``
    ``torch.nn.Linear`` and subclasses that keep ``nn.Linear.forward`` (or whose own forward is known to compute
    x·Wᵀ + b exactly: transformers' ``FalconLinear``).
    Computed by the fused ``torch.ops.lorafuse.lora_linear`` (one pass, no second GEMM), unless the base has
    forward hooks or pre-hooks at call time (accelerate's offloading relies on them) or its weight requires
    grad: then the base is called as it is (hooks run once) and ``lora_add`` adds the branch. Mergeable while
    it has no hooks (a hook could transform what a merged weight computes).
``custom_linear``
    any other ``nn.Linear`` subclass (its own ``forward``: transformers' ``AutoBitLinear``,
    ``2 * linear(x) + 1`` ...): always called as it is, the branch added by ``lora_add``. Merging is
    refused: folding B·A into its weight would not equal ``base(x) + LoRA(x)`` for a forward lorafuse does
    not know.

``conv1d``
    transformers' ``Conv1D`` (GPT-2): the weight stored [in, out] (PEFT's ``fan_in_fan_out``), computed by the fused
    op on its transposed view; merges write into it transposed.
``embedding``
    ``torch.nn.Embedding`` (PEFT's embedding LoRA): wrapped by ``lorafuse.nn.Embedding``, the branch added by
    ``lora_embedding``; merges go into the embedding matrix.
``linear4bit``
    ``lorafuse.nn.Linear4bit`` (the weight in NF4, QLoRA): the layer and its branch in one op, ``lora_linear4bit``
    (called as it is, the branch added by ``lora_add``, when it has hooks); merging into the 4 bits only when asked (``requantize=True``, its error reported).
``bnb_linear4bit``
    ``bitsandbytes.nn.Linear4bit`` with an NF4 weight (transformers' 4-bit models): lorafuse's kernels on
    bitsandbytes' own bytes, the branch in the same op (``lora_linear4bit``); merging as ``linear4bit``.

``multihead_attention``
    ``torch.nn.MultiheadAttention`` itself, with one embed_dim for query, key and value (PEFT's
    ``lora.MultiheadAttention``): wrapped by ``lorafuse.nn.MultiheadAttention``, which adapts its packed q/k/v
    projection ``in_proj_weight`` [3·E, E] (in E, out 3·E) and its output projection, and computes the attention with
    the adapted weights. Selected only when named (never by "all-linear"), as PEFT.
``attention_out_proj``
    the ``out_proj`` of such an attention (a ``NonDynamicallyQuantizableLinear``, whose weight the attention reads
    without calling the module): never selected itself (a LoRA branch on it would never run; selecting it is an
    error, "all-linear" leaves it alone); only ``lorafuse.nn.MultiheadAttention`` wraps it, for its output projection.

Not taken: a Linear with an integer weight (a quantized base is its own kind).

The C++ list is ``lorafuse::nn::base_kinds()`` (<lorafuse/nn/base_kind.h>).
"""

from __future__ import annotations

import sys
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _C


class BaseKind:
    """One kind of base layer. Subclasses override the methods; :data:`BASE_KINDS` lists one of each."""

    name = "?"
    #: the weight is stored [in, out] (PEFT's fan_in_fan_out: a config adapting such layers says so in its file)
    fan_in_fan_out = False
    #: an embedding layer (lorafuse.nn.Embedding wraps it; files name its factors lora_embedding_A / _B)
    embedding = False
    #: a multi-head attention (lorafuse.nn.MultiheadAttention wraps it; selected only when named)
    attention = False
    #: target_modules may select it (False: only a lorafuse layer wraps it, for a part of its own base)
    selectable = True

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def fused(self, module: nn.Module) -> bool:
        """Whether the fused op may compute ``module`` right now (else it is called as it is)."""
        return False

    def refusal(self, module: nn.Module) -> Optional[str]:
        """Why lorafuse cannot adapt this module of the kind at all, or None."""
        return None

    def merge_refusal(self, module: nn.Module) -> Optional[str]:
        """Why adapters cannot be merged into ``module``, or None when they can."""
        return None

    def lora_forward(self, module: nn.Module, x: Tensor, a: Tensor, b: Tensor, scale: float, p: float) -> Tensor:
        """The LoRA layer's output when :meth:`fused` says the kind computes it: base(x) + scale·(drop(x)·Aᵀ)·Bᵀ."""
        raise NotImplementedError

    def quantized_state(self, module: nn.Module) -> Optional[tuple]:
        """For a quantized base: (packed, absmax, nested_absmax, offset, format) as the quantized-weight ops
        (``dequantize_nf``, ``nf_merge``, ...) take them; else None."""
        return None

    def set_quantized_state(
        self, module: nn.Module, packed: Tensor, absmax: Tensor, nested: Tensor, offset: Tensor
    ) -> None:
        """Puts other bytes and statistics (same shapes and format) into a quantized base."""
        raise NotImplementedError

    def nf4_state(self, module: nn.Module) -> Optional[tuple]:
        """For a base in bitsandbytes' NF4: (packed, absmax, nested_absmax, offset, blocksize) as the NF4 ops (and
        its checkpoints) take them; None for a dense base; ValueError for a quantized base in another format."""
        state = self.quantized_state(module)
        if state is None:
            return None
        fmt = list(state[4])
        stat_dtype = torch.float32 if state[2] is None or state[2].numel() == 0 else state[2].dtype
        if not _C._is_bnb_nf4(fmt, stat_dtype):
            raise ValueError(
                f"{type(module).__name__}: its weight is in format {fmt} (lorafuse.NfFormat), not bitsandbytes' NF4 "
                "([4, blocksize, 8, 256] with float32 scales, or [4, blocksize, 0, 0]), which this needs"
            )
        return (*state[:4], fmt[1])

    def dense_weight(self, module: nn.Module) -> Optional[Tensor]:
        """For a base that merge_and_unload replaces by a dense ``nn.Linear`` (a 4-bit base): its weight in float32,
        a new tensor. None for a base that adapters merge into in place."""
        return None

    def features(self, module: nn.Module) -> Tuple[int, int]:
        """(in_features, out_features) of the base."""
        return module.in_features, module.out_features

    def merge_weight(self, module: nn.Module) -> Tensor:
        """The weight that merges change in place, as [out, in] (a view of the module's own weight)."""
        return module.weight

    def dora_weight(self, module: nn.Module) -> Optional[Tensor]:
        """The full-precision weight W as [out, in] (a view) that DoRA rescales, where the base computes x·Wᵀ + b;
        None: DoRA is refused over this kind (:meth:`dora_refusal` says why)."""
        return None

    def dora_refusal(self, module: nn.Module) -> str:
        return (
            f"the base is a {type(module).__name__} (lorafuse base kind {self.name!r}), whose weight lorafuse cannot "
            "rescale: DoRA goes on a plain nn.Linear or transformers' Conv1D (a quantized base: not supported yet)"
        )

    def weight_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype the base computes in (adapters are made in it, or in float32 for a 16-bit base)."""
        return module.weight.dtype

    def device(self, module: nn.Module) -> torch.device:
        return module.weight.device

    def freeze(self, module: nn.Module) -> None:
        """Freezes the base's weight and bias (a LoRA layer trains only its adapters)."""
        module.weight.requires_grad_(False)
        if module.bias is not None:
            module.bias.requires_grad_(False)


def _has_hooks(module: nn.Module) -> bool:
    """Forward or backward hooks on the module or global ones, or a forward replaced on the instance
    (accelerate's add_hook_to_module does that): then only calling the module computes what the model
    computes, and runs what the user registered."""
    hooks = torch.nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
        or "forward" in module.__dict__
    )


def _wrappable_linear(module: nn.Module) -> bool:
    """An nn.Linear with a floating-point weight that its parent calls (nn.MultiheadAttention never calls its
    out_proj: it reads the weight itself)."""
    return (
        isinstance(module, nn.Linear)
        and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)
        and module.weight.is_floating_point()
    )


# nn.Linear subclasses whose own forward computes exactly x·Wᵀ + b (read from their source): lorafuse treats them as
# nn.Linear (fused op, merges), as PEFT does every Linear.
_PLAIN_LINEAR_SUBCLASSES = {
    ("transformers.models.falcon.modeling_falcon", "FalconLinear"),  # input @ weight.T (+ bias)
}


def _computes_nn_linear(cls: type) -> bool:
    return cls.forward is nn.Linear.forward or (cls.__module__, cls.__qualname__) in _PLAIN_LINEAR_SUBCLASSES


class DenseLinear(BaseKind):
    name = "linear"

    def matches(self, module: nn.Module) -> bool:
        return _wrappable_linear(module) and _computes_nn_linear(type(module))

    def fused(self, module: nn.Module) -> bool:
        return not _has_hooks(module) and not module.weight.requires_grad

    def lora_forward(self, module: nn.Module, x: Tensor, a: Tensor, b: Tensor, scale: float, p: float) -> Tensor:
        return torch.ops.lorafuse.lora_linear(x, module.weight, module.bias, a, b, scale, p)

    def dora_weight(self, module: nn.Module) -> Optional[Tensor]:
        return module.weight

    def merge_refusal(self, module: nn.Module) -> Optional[str]:
        if _has_hooks(module):
            return (
                f"{type(module).__name__} has forward hooks (or a replaced forward); a hook may transform "
                "the base's output or input, and then B·A folded into the weight would pass through it, "
                "unlike the separate branch. Remove the hooks to merge"
            )
        return None


class CustomLinear(BaseKind):
    name = "custom_linear"

    def matches(self, module: nn.Module) -> bool:
        return _wrappable_linear(module)

    def dora_refusal(self, module: nn.Module) -> str:
        return (
            f"{type(module).__name__} has its own forward, so x·Wᵀ + b is not what it computes and DoRA's rescaled "
            "weight would not be its output either"
        )

    def merge_refusal(self, module: nn.Module) -> Optional[str]:
        return (
            f"{type(module).__name__} has its own forward; folding B·A into its weight would not give "
            "base(x) + LoRA(x), so lorafuse does not merge into it (the adapter stays a separate branch)"
        )


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` itself (GPT-2's layers: weight [in, out], ``addmm(bias, x, weight)``), not a subclass
    with another forward."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return (
        conv1d is not None
        and isinstance(module, conv1d)
        and type(module).forward is conv1d.forward
        and module.weight.is_floating_point()
    )


class TransformersConv1D(BaseKind):
    """transformers' ``Conv1D`` (GPT-2, GPT-BigCode ...): a linear layer whose weight is stored [in, out] (PEFT's
    ``fan_in_fan_out``). Computed by the fused ``lora_linear`` on the weight's transposed view (no copy); merges
    write B·A transposed into it. Adapters keep PEFT's shapes, A [r, in] and B [out, r]."""

    name = "conv1d"
    fan_in_fan_out = True

    def matches(self, module: nn.Module) -> bool:
        return _is_conv1d(module)

    def features(self, module: nn.Module) -> Tuple[int, int]:
        return module.weight.shape[0], module.weight.shape[1]

    def merge_weight(self, module: nn.Module) -> Tensor:
        return module.weight.t()

    def dora_weight(self, module: nn.Module) -> Optional[Tensor]:
        return module.weight.t()

    def fused(self, module: nn.Module) -> bool:
        return not _has_hooks(module) and not module.weight.requires_grad

    def lora_forward(self, module: nn.Module, x: Tensor, a: Tensor, b: Tensor, scale: float, p: float) -> Tensor:
        return torch.ops.lorafuse.lora_linear(x, module.weight.t(), module.bias, a, b, scale, p)

    def merge_refusal(self, module: nn.Module) -> Optional[str]:
        return DenseLinear().merge_refusal(module)


class TorchEmbedding(BaseKind):
    """``torch.nn.Embedding`` itself (PEFT's ``lora.Embedding``): wrapped by :class:`lorafuse.nn.Embedding`, the base
    called as it is and ``lora_embedding`` adding the branch; in and out are num_embeddings and embedding_dim, so the
    [out, in] weight that merges change is the embedding matrix transposed. Not taken: a subclass with its own forward,
    an embedding with ``max_norm`` (its lookups renormalise rows in place)."""

    name = "embedding"
    embedding = True

    def matches(self, module: nn.Module) -> bool:
        return (
            isinstance(module, nn.Embedding)
            and type(module).forward is nn.Embedding.forward
            and module.max_norm is None
            and module.weight.is_floating_point()
        )

    def features(self, module: nn.Module) -> Tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def merge_weight(self, module: nn.Module) -> Tensor:
        return module.weight.t()

    def freeze(self, module: nn.Module) -> None:
        module.weight.requires_grad_(False)

    def dora_refusal(self, module: nn.Module) -> str:
        return "DoRA on embedding layers (PEFT's DoraEmbeddingLayer) is not supported by lorafuse yet"

    def merge_refusal(self, module: nn.Module) -> Optional[str]:
        return DenseLinear().merge_refusal(module)


class TorchMultiheadAttention(BaseKind):
    """``torch.nn.MultiheadAttention`` itself (PEFT's ``lora.MultiheadAttention``): the adapted weight, which merges
    change, is the packed q/k/v projection ``in_proj_weight`` [3·E, E]; its output projection's adapters live in an
    inner layer over ``out_proj`` (the ``attention_out_proj`` kind). Query, key and value of other sizes (separate
    q/k/v weights) are refused by name, as PEFT does."""

    name = "multihead_attention"
    attention = True

    def matches(self, module: nn.Module) -> bool:
        return type(module) is nn.MultiheadAttention and module.out_proj.weight.is_floating_point()

    def out_proj(self, module: nn.Module) -> nn.Module:
        """The attention's own out_proj (under the LoRA layer that lorafuse.nn.MultiheadAttention puts there)."""
        out = module.out_proj
        return out.base_layer if hasattr(out, "base_layer") else out

    def features(self, module: nn.Module) -> Tuple[int, int]:
        return module.embed_dim, 3 * module.embed_dim

    def merge_weight(self, module: nn.Module) -> Tensor:
        return module.in_proj_weight

    def weight_dtype(self, module: nn.Module) -> torch.dtype:
        return module.in_proj_weight.dtype

    def device(self, module: nn.Module) -> torch.device:
        return module.in_proj_weight.device

    def freeze(self, module: nn.Module) -> None:
        out = self.out_proj(module)
        for p in (module.in_proj_weight, module.in_proj_bias, module.bias_k, module.bias_v, out.weight, out.bias):
            if p is not None:
                p.requires_grad_(False)

    def refusal(self, module: nn.Module) -> Optional[str]:
        """Why lorafuse cannot adapt this attention at all, or None."""
        if not module._qkv_same_embed_dim:
            return (
                f"its key and value sizes (kdim={module.kdim}, vdim={module.vdim}) differ from embed_dim="
                f"{module.embed_dim}, so it keeps separate q/k/v weights; lorafuse (as PEFT) adapts the packed "
                "in_proj_weight of an attention whose query, key and value share embed_dim"
            )
        return None

    def dora_refusal(self, module: nn.Module) -> str:
        return "DoRA on nn.MultiheadAttention is not supported (PEFT's MultiheadAttention has no DoRA either)"

    def merge_refusal(self, module: nn.Module) -> Optional[str]:
        return DenseLinear().merge_refusal(module)


class AttentionOutProj(BaseKind):
    """The ``out_proj`` of an ``nn.MultiheadAttention``: the attention reads its weight and bias without calling it.
    Never selected; :class:`lorafuse.nn.MultiheadAttention` wraps it for its output projection's adapters and folds
    them into the weight that the attention reads."""

    name = "attention_out_proj"
    selectable = False

    def matches(self, module: nn.Module) -> bool:
        return (
            type(module) is nn.modules.linear.NonDynamicallyQuantizableLinear and module.weight.is_floating_point()
        )

    def merge_refusal(self, module: nn.Module) -> Optional[str]:
        return DenseLinear().merge_refusal(module)


class Nf4Linear(BaseKind):
    """lorafuse.nn.Linear4bit: the weight quantized, NF4 (QLoRA) or another format of the family (LQ-LoRA). The layer
    and its branch in one op, ``lora_linear_nf`` (``nf_lora_linear``: the weight dequantized a tile of rows at a
    time, the branch added in place), unless the layer has hooks (then it is called as it is, ``lora_add`` adding the
    branch); merging rounds to the format again, so it is refused unless asked for (``merge(requantize=True)``)."""

    name = "linear4bit"

    def matches(self, module: nn.Module) -> bool:
        from .linear4bit import Linear4bit

        return type(module) is Linear4bit

    def weight_dtype(self, module: nn.Module) -> torch.dtype:
        return module.compute_dtype

    def device(self, module: nn.Module) -> torch.device:
        return module.packed.device

    def freeze(self, module: nn.Module) -> None:
        if module.bias is not None:  # the 4-bit weight is buffers: never trainable
            module.bias.requires_grad_(False)

    def fused(self, module: nn.Module) -> bool:
        return not _has_hooks(module)

    def lora_forward(self, module: nn.Module, x: Tensor, a: Tensor, b: Tensor, scale: float, p: float) -> Tensor:
        return torch.ops.lorafuse.lora_linear_nf(
            x, *module.quantized, module.format, module.out_features, module.bias, module.compute_dtype, a, b, scale, p
        )

    def merge_refusal(self, module: nn.Module) -> Optional[str]:
        return (
            "the base is 4-bit (lorafuse.nn.Linear4bit); merging into 4 bits rounds W + scale·B·A to 4 bits again "
            "(its quantized format) and changes its outputs. Ask for it with requantize=True (the layer's merge_error then reports the "
            "cost; unmerge restores the bytes exactly), keep the adapter as a separate branch, or merge_and_unload "
            "for a dense model holding dequantized W + the adapter"
        )

    def quantized_state(self, module: nn.Module) -> Optional[tuple]:
        return module.packed, module.absmax, module.nested_absmax, module.offset, module.format

    def set_quantized_state(
        self, module: nn.Module, packed: Tensor, absmax: Tensor, nested: Tensor, offset: Tensor
    ) -> None:
        module.packed, module.absmax, module.nested_absmax, module.offset = packed, absmax, nested, offset

    def dense_weight(self, module: nn.Module) -> Optional[Tensor]:
        return module.dequantized_weight(torch.float32)


def _repacked_for_cpu(module: nn.Module) -> bool:
    return bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False))


def _is_bnb_nf4(module: nn.Module) -> bool:
    cls = type(module)
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return (
        cls.__name__ == "Linear4bit"
        and cls.__module__.startswith("bitsandbytes")
        and state is not None
        and state.quant_type == "nf4"
        and (not state.nested or state.state2.blocksize == 256 or getattr(state, "packing_format_for_cpu", False))
    )


class BnbNf4Linear(BaseKind):
    """bitsandbytes' own ``Linear4bit`` holding an NF4 weight (a transformers model loaded with
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``): lorafuse's ``nf4_linear`` computes it
    from bitsandbytes' packed bytes and quantization state as they are (same format, no copy), with the branch in the
    same op (``lora_linear4bit``); the input is cast to the layer's compute dtype and the base output back, as bitsandbytes does.
    With hooks (accelerate), or once bitsandbytes has repacked the weight into its own CPU layout (an inference
    forward of its own on an AVX512-BF16 CPU), it is called as it is. Merging into 4 bits only when asked
    (``requantize=True``)."""

    name = "bnb_linear4bit"

    def matches(self, module: nn.Module) -> bool:
        return _is_bnb_nf4(module)

    def fused(self, module: nn.Module) -> bool:
        # bitsandbytes repacks the weight into its own CPU layout on an inference forward (AVX512-BF16 machines,
        # quant_state.packing_format_for_cpu): then only its own forward reads it
        return not _has_hooks(module) and not _repacked_for_cpu(module)

    def weight_dtype(self, module: nn.Module) -> torch.dtype:
        return module.compute_dtype or torch.float32

    def freeze(self, module: nn.Module) -> None:
        module.weight.requires_grad_(False)
        if module.bias is not None:
            module.bias.requires_grad_(False)

    def merge_refusal(self, module: nn.Module) -> Optional[str]:
        return Nf4Linear().merge_refusal(module).replace("lorafuse.nn.Linear4bit", "bitsandbytes' Linear4bit")

    def quantized_state(self, module: nn.Module) -> Optional[tuple]:
        _to_standard_layout(module)
        return _bnb_nf4_state(module)

    def set_quantized_state(
        self, module: nn.Module, packed: Tensor, absmax: Tensor, nested: Tensor, offset: Tensor
    ) -> None:
        _to_standard_layout(module)
        state = module.weight.quant_state
        # bitsandbytes' quant_storage dtype (uint8 by default): the same bytes, [bytes / itemsize, 1]
        module.weight.data = packed.reshape(-1).view(module.weight.dtype).reshape(-1, 1)
        if state.nested:
            state.absmax, state.state2.absmax, state.offset = absmax, nested, offset.reshape(state.offset.shape)
        else:
            state.absmax = absmax

    def lora_forward(self, module: nn.Module, x: Tensor, a: Tensor, b: Tensor, scale: float, p: float) -> Tensor:
        return torch.ops.lorafuse.lora_linear_nf(
            x,
            *_bnb_nf4_state(module),
            module.out_features,
            module.bias,
            module.compute_dtype or x.dtype,
            a,
            b,
            scale,
            p,
        )

    def dense_weight(self, module: nn.Module) -> Optional[Tensor]:
        _to_standard_layout(module)
        return torch.ops.lorafuse.dequantize_nf(
            *_bnb_nf4_state(module), [module.out_features, module.in_features], torch.float32
        )


def _to_standard_layout(module: nn.Module) -> None:
    """A bitsandbytes layer repacked into its CPU layout back to the standard one, as bitsandbytes does before it saves
    (its inverse re-quantizes the statistics it had turned into bfloat16: the layer keeps computing as before)."""
    if _repacked_for_cpu(module):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, module.weight.quant_state
        )


def _bnb_nf4_state(module: nn.Module) -> tuple:
    """(packed, absmax, nested_absmax, offset, format) of a bitsandbytes NF4 layer, as the quantized-weight ops take
    them: format [4, blocksize, 8, 256] with double quantization (bitsandbytes' 256 statistics per scale), else
    [4, blocksize, 0, 0]."""
    state = module.weight.quant_state
    packed = module.weight.data
    packed = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)  # quant_storage other than uint8
    nested = state.state2.absmax if state.nested else None
    offset = state.offset.reshape(()) if state.nested else None
    fmt = [4, state.blocksize, 8, 256] if state.nested else [4, state.blocksize, 0, 0]
    return packed, state.absmax, nested, offset, fmt


def lora_add(out: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: float, p: float) -> Tensor:
    """The LoRA branch added to a base's output (``lora_branch``: x is cast to the adapter's dtype unless it is x's or
    float32; the rule the C++ layers follow too)."""
    return torch.ops.lorafuse.lora_branch(out, x, a, b, scale, p)


BASE_KINDS: List[BaseKind] = [
    DenseLinear(), CustomLinear(), TransformersConv1D(), TorchEmbedding(), TorchMultiheadAttention(),
    AttentionOutProj(), Nf4Linear(), BnbNf4Linear(),
]


def base_kind_of(module: nn.Module) -> Optional[BaseKind]:
    """The first kind in :data:`BASE_KINDS` that takes ``module``, or None."""
    for kind in BASE_KINDS:
        if kind.matches(module):
            return kind
    return None


def check_base_output(out: object, module: nn.Module, x: Tensor, out_features: int) -> Tensor:
    """The output of a base called as it is, checked to be what a linear layer returns."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{type(module).__name__} returned {type(out).__name__}, not a Tensor: lorafuse adds the LoRA "
            "branch to a linear layer's output and will not guess which part of it to add to"
        )
    if out.shape[:-1] != x.shape[:-1] or out.shape[-1] != out_features:
        raise ValueError(
            f"{type(module).__name__} returned shape {list(out.shape)} for input {list(x.shape)}; the LoRA "
            f"branch gives [..., {out_features}], so lorafuse will not add them"
        )
    return out


__all__ = [
    "BaseKind",
    "DenseLinear",
    "CustomLinear",
    "TransformersConv1D",
    "TorchEmbedding",
    "TorchMultiheadAttention",
    "AttentionOutProj",
    "Nf4Linear",
    "BnbNf4Linear",
    "BASE_KINDS",
    "base_kind_of",
]
