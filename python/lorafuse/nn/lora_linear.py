"""The LoRA layer for models written in Python (Hugging Face transformers and any torch.nn.Module)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import _C
from .base_kinds import base_kind_of, check_base_output


@dataclass(frozen=True)
class AdapterOptions:
    """One adapter's hyperparameters (PEFT's names)."""

    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    bias: str = "none"

    @property
    def scale(self) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


# Per-thread adapter choice: lorafuse.use_adapter opens a C++ AdapterScope (what C++ layers read) and, in
# the same call, pushes the name onto this thread's stack here (what Python layers read: a Python value, so
# that torch.compile can trace and guard it). _open_scopes counts the scopes open on any thread, so that
# forward looks at the thread-local stack only while some scope is open.
_thread_scope = threading.local()
_open_scopes = 0


def _scope_enter(name: str) -> object:
    """Pushes ``name`` on this thread's stack; returns the token that removes it."""
    global _open_scopes
    stack = getattr(_thread_scope, "stack", None)
    if stack is None:
        stack = _thread_scope.stack = []
    token = object()
    stack.append((token, name))
    _open_scopes += 1
    return token


def _scope_exit(token: object) -> None:
    """Removes the entry of ``token`` wherever it is (generators may close scopes out of order)."""
    global _open_scopes
    stack = getattr(_thread_scope, "stack", [])
    for i in range(len(stack) - 1, -1, -1):
        if stack[i][0] is token:
            del stack[i]
            break
    _open_scopes -= 1


def _init_kind(init: Union[bool, str]) -> str:
    if init is True or init == "true":
        return "true"
    if init is False or init == "false":
        return "false"
    if init == "gaussian":
        return "gaussian"
    raise ValueError(f'init_lora_weights: expected True, False or "gaussian", found {init!r}')


class Linear(nn.Module):
    """A frozen linear base layer with named LoRA adapters.

    ``y = base_layer(x) + scale * (dropout(x) @ A.T) @ B.T`` for the active adapter. What the base may be
    and how it runs is its base kind (:mod:`lorafuse.nn.base_kinds`): a plain ``nn.Linear`` is computed by the
    fused ``torch.ops.lorafuse.lora_linear``; a subclass with its own forward, or a base with forward hooks,
    is called as it is and ``torch.ops.lorafuse.lora_add`` adds the branch. The base layer is
    wrapped, not copied (its weight and bias are frozen). Adapters are kept as PEFT keeps them:
    ``lora_A[name].weight`` [r, in] and ``lora_B[name].weight`` [out, r]; float32 for a
    float16/bfloat16 base. While adapters are disabled, when none is active, or when the active one is
    merged, the layer is its base. ``merge`` folds scale·B·A into the base weight (float32 math) and
    keeps the unmerged weight so that ``unmerge`` restores it bit for bit.

    Args:
        base_layer: the ``nn.Linear`` to wrap.
        adapter_name: the first adapter's name.
        r, lora_alpha, lora_dropout, use_rslora, init_lora_weights: the first adapter's options.
        adapter_dtype: dtype of A and B (the base weight's dtype or float32); ``None`` picks as above.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        adapter_name: str = "default",
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        adapter_dtype: Optional[torch.dtype] = None,
        bias: str = "none",
    ) -> None:
        super().__init__()
        kind = base_kind_of(base_layer)
        if kind is None:
            raise TypeError(f"base_layer: expected a torch.nn.Linear, found {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.adapters: Dict[str, AdapterOptions] = {}
        self.active_adapter: Optional[str] = None
        self.adapters_enabled = True
        self.merged_adapters: List[str] = []
        # What forward reads: None (the base alone) or [A, B, scale, dropout]. Kept apart from the adapter
        # names so that torch.compile guards on tensors and numbers, not on the active adapter's name:
        # switching between adapters of the same shapes and scale does not recompile.
        self._route: Optional[list] = None
        # Every adapter's [A, B, scale, dropout], replaced as a whole when adapters come and go, so that
        # forward on other threads (use_adapter) reads a consistent table.
        self._routes: Dict[str, list] = {}
        self.register_buffer(
            "weight_unmerged", torch.empty(0, device=base_layer.weight.device), persistent=False
        )
        self.add_adapter(
            adapter_name,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            init_lora_weights=init_lora_weights,
            adapter_dtype=adapter_dtype,
            bias=bias,
        )
        # frozen only once the adapter is valid: a bad argument leaves the caller's layer as it was
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (model code that reads ``layer.weight`` keeps working, as with PEFT)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        """The base layer's bias."""
        return self.base_layer.bias

    def reset_parameters(self) -> None:
        """Re-initialises every adapter as its init_lora_weights says (e.g. after ``to_empty()`` of a model
        injected on the meta device); the base layer is untouched."""
        for name, opts in self.adapters.items():
            self._init_adapter(name, _init_kind(opts.init_lora_weights))

    # ---- adapters --------------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        adapter_dtype: Optional[torch.dtype] = None,
        bias: str = "none",
        *,
        activate: bool = True,
    ) -> None:
        """Adds adapter ``adapter_name``. The first adapter becomes active (unless ``activate`` is False:
        then a layer without an active adapter keeps none); a later one waits (frozen)."""
        if not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name: expected a str, found {type(adapter_name).__name__}")
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError(f"r: expected an int, found {type(r).__name__} ({r!r})")
        _C._validate_adapter(adapter_name, r, float(lora_alpha), float(lora_dropout))
        init = _init_kind(init_lora_weights)
        if bias not in ("none", "all", "lora_only"):
            raise ValueError(f'bias: expected "none", "all" or "lora_only", found {bias!r}')
        if adapter_name in self.adapters:
            raise ValueError(
                f'adapter_name: an adapter named "{adapter_name}" already exists; '
                f"this layer has {list(self.adapters)}"
            )
        weight = self.base_layer.weight
        if not weight.is_floating_point():
            raise TypeError(
                f"base_layer: its weight is {weight.dtype}; lorafuse wraps floating-point linear layers "
                "(a quantized base needs its own base kind)"
            )
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        elif adapter_dtype not in (weight.dtype, torch.float32):
            raise TypeError(
                f"adapter_dtype: lora_A and lora_B must have the base weight's dtype ({weight.dtype}) or "
                f"torch.float32, found {adapter_dtype}"
            )
        kw = dict(bias=False, device=weight.device, dtype=adapter_dtype)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, **kw)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, **kw)
        self.adapters[adapter_name] = AdapterOptions(
            r, float(lora_alpha), float(lora_dropout), bool(use_rslora), init_lora_weights, bias
        )
        self._init_adapter(adapter_name, init)
        if self.active_adapter is None and activate:
            self.active_adapter = adapter_name
            self._apply_trainability()
        else:  # only the new adapter's flags: other threads may be running the others
            self.lora_A[adapter_name].weight.requires_grad_(False)
            self.lora_B[adapter_name].weight.requires_grad_(False)
            self._refresh_route()

    def _init_adapter(self, name: str, init: str) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, 0.0, 1.0 / self.adapters[name].r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if init == "false":
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                nn.init.zeros_(b)

    def _known(self, name: str, what: str) -> AdapterOptions:
        if name not in self.adapters:
            raise ValueError(f'{what}: no adapter named "{name}"; this layer has {list(self.adapters)}')
        return self.adapters[name]

    def _apply_trainability(self) -> None:
        for name in self.adapters:
            train = name == self.active_adapter
            self.lora_A[name].weight.requires_grad_(train)
            self.lora_B[name].weight.requires_grad_(train)
        self._refresh_route()

    def _refresh_route(self) -> None:
        self._routes = {
            n: [self.lora_A[n], self.lora_B[n], o.scale, o.lora_dropout] for n, o in self.adapters.items()
        }
        name = self.active_adapter
        if not self.adapters_enabled or name is None or name in self.merged_adapters:
            self._route = None
        else:
            opts = self.adapters[name]
            self._route = [self.lora_A[name], self.lora_B[name], opts.scale, opts.lora_dropout]

    def set_adapter(self, adapter_name: str) -> None:
        """Activates ``adapter_name`` (only its A and B require grad); moves no data. Switching away from
        a merged adapter unmerges first, as PEFT does."""
        self._known(adapter_name, "set_adapter")
        if self.merged_adapters and adapter_name != self.active_adapter:
            self.unmerge()
        self.active_adapter = adapter_name
        self._apply_trainability()

    def clear_active_adapter(self) -> None:
        """No adapter active: the layer is its base (unmerging first)."""
        if self.merged_adapters:
            self.unmerge()
        self.active_adapter = None
        self._apply_trainability()

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes ``adapter_name`` (a merged adapter must be unmerged first)."""
        self._known(adapter_name, "delete_adapter")
        if adapter_name in self.merged_adapters:
            raise ValueError(f'delete_adapter: adapter "{adapter_name}" is merged; unmerge() first')
        del self.adapters[adapter_name]
        was_active = self.active_adapter == adapter_name
        if was_active:
            self.active_adapter = next(iter(self.adapters), None)
        self._refresh_route()  # forward stops seeing it before its modules go
        del self.lora_A[adapter_name], self.lora_B[adapter_name]
        if was_active:
            self._apply_trainability()

    def disable_adapters(self) -> None:
        """The base alone from now on (unmerging first)."""
        if self.merged_adapters:
            self.unmerge()
        self.adapters_enabled = False
        self._refresh_route()

    def enable_adapters(self) -> None:
        self.adapters_enabled = True
        self._refresh_route()

    def delta_weight(self, adapter_name: str) -> Tensor:
        """scale · B · A in float32 (float64 for float64 adapters) [out, in] (op ``lora_delta_weight``)."""
        opts = self._known(adapter_name, "delta_weight")
        with torch.no_grad():
            return torch.ops.lorafuse.lora_delta_weight(
                self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight, opts.scale
            )

    # ---- merging ---------------------------------------------------------------------------------
    def merge(self, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Folds the named adapters (default: the active one) into the base weight, in float32 from the
        unmerged weight. Errors: unknown, already merged or repeated names; disabled adapters;
        non-finite weights (the weight is then left unchanged)."""
        if not self.adapters_enabled:
            raise ValueError("merge: adapters are disabled in this layer; enable_adapters() first")
        self._merge(adapter_names)

    def _merge(self, adapter_names: Optional[Sequence[str]]) -> None:
        if adapter_names is None:
            if self.active_adapter is None:
                raise ValueError("merge: this layer has no active adapter; name the adapters to merge")
            adapter_names = [self.active_adapter]
        names = list(adapter_names)
        for i, name in enumerate(names):
            self._known(name, "merge")
            if name in self.merged_adapters:
                raise ValueError(f'merge: adapter "{name}" is already merged')
            if name in names[:i]:
                raise ValueError(f'merge: adapter "{name}" is named twice')
        kind = base_kind_of(self.base_layer)
        refusal = (
            kind.merge_refusal(self.base_layer)
            if kind is not None
            else f"{type(self.base_layer).__name__} is no base kind lorafuse can merge into"
        )
        if refusal is not None:
            raise ValueError(f"merge: {refusal}")
        weight = self.base_layer.weight
        everything = self.merged_adapters + names
        with torch.no_grad():
            # from the unmerged weight, so merging adapters one by one rounds once; the op checks finiteness
            original = self.weight_unmerged if self.merged_adapters else weight
            merged = torch.ops.lorafuse.lora_merge(
                original,
                [self.lora_A[n].weight for n in everything],
                [self.lora_B[n].weight for n in everything],
                [self.adapters[n].scale for n in everything],
            )
            if not self.merged_adapters:
                self.weight_unmerged = weight.detach().clone()
            weight.copy_(merged)
        self.merged_adapters = everything
        self._refresh_route()

    def unmerge(self) -> None:
        """Restores the unmerged base weight exactly. An error when nothing is merged."""
        if not self.merged_adapters:
            raise ValueError("unmerge: nothing is merged in this layer")
        with torch.no_grad():
            self.base_layer.weight.copy_(self.weight_unmerged)
        self._drop_unmerged_copy()

    def _drop_unmerged_copy(self) -> None:
        self.weight_unmerged = torch.empty(0, device=self.base_layer.weight.device)
        self.merged_adapters = []
        self._refresh_route()

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge_and_unload(self) -> nn.Linear:
        """Merges the active adapter for good (also while disabled) and returns the plain base layer."""
        if self.active_adapter is not None and self.active_adapter not in self.merged_adapters:
            self._merge([self.active_adapter])
        if self.merged_adapters:
            self._drop_unmerged_copy()
        for name in list(self.adapters):
            self.delete_adapter(name)
        return self.base_layer

    # ---- forward ---------------------------------------------------------------------------------
    def _scoped_route(self, name: str) -> Optional[list]:
        if not self.adapters_enabled:
            return None
        if self.merged_adapters:
            if name != self.active_adapter:
                raise ValueError(
                    f'use_adapter("{name}"): this layer has {self.merged_adapters} merged into its weight; '
                    "unmerge first to run other adapters per thread"
                )
            if name in self.merged_adapters:
                return None
        return self._routes.get(name) if name else None

    def forward(self, x: Tensor) -> Tensor:
        route = self._route
        if _open_scopes:
            stack = getattr(_thread_scope, "stack", None)
            if stack:
                route = self._scoped_route(stack[-1][1])
        base = self.base_layer
        if route is None:
            return base(x)
        lora_a, lora_b, scale, dropout = route
        # read the weights now: FSDP and load_state_dict(assign=True) put new Parameters in the modules
        a, b = lora_a.weight, lora_b.weight
        p = dropout if self.training else 0.0
        kind = base_kind_of(base)  # asked per call: the base may have been replaced or hooked since
        if kind is not None and kind.fused(base):
            return torch.ops.lorafuse.lora_linear(x, base.weight, base.bias, a, b, scale, p)
        # the base as it is (its own forward, its hooks, a thawed weight), the branch added by lora_add
        out = check_base_output(base(x), base, x, self.out_features)
        xa = x if a.dtype in (x.dtype, torch.float32) else x.to(a.dtype)
        return torch.ops.lorafuse.lora_add(out, xa, a, b, scale, p)

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}(r={o.r}, lora_alpha={o.lora_alpha:g}, lora_dropout={o.lora_dropout:g}"
            + (", use_rslora=True" if o.use_rslora else "")
            + ")"
            for n, o in self.adapters.items()
        )
        out = f"adapters=[{adapters}], active={self.active_adapter}"
        if not self.adapters_enabled:
            out += ", disabled"
        if self.merged_adapters:
            out += f", merged={self.merged_adapters}"
        return out


__all__ = ["Linear", "AdapterOptions"]
