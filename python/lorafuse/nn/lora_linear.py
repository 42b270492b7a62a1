"""The LoRA layer for models written in Python (Hugging Face transformers and any torch.nn.Module)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import _C
from . import scope as _scope
from .base_kinds import DenseLinear, base_kind_of, check_base_output, lora_add
from .dora import DoraMagnitude
from .quantized_merge import _NF4_UNMERGED, MergeError, QuantizedMerge
from .scope import MixedBatch
from .table_view import AdapterTableView


AdapterOptions = _C.AdapterOptions
AdapterOptions.__doc__ = """One adapter's hyperparameters (PEFT's names; C++ ``LoraAdapterOptions``): ``r``, ``lora_alpha``,
``lora_dropout``, ``use_rslora``, ``init_lora_weights``, ``bias``, ``dtype`` and ``scale`` (lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora)."""

class Linear(QuantizedMerge, AdapterTableView, nn.Module):
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

    A DoRA adapter (``use_dora=True``, PEFT's numerics) also has ``lora_magnitude_vector[name].weight`` [out], started
    at the row norms of W + scale·B·A, and the layer computes m / ‖W + scale·B·A‖ ⊙ (x·Wᵀ + scale·(x·Aᵀ)·Bᵀ) + b, the
    norm a constant (``torch.ops.lorafuse.dora_linear``: the fused op, the norm without a second weight-sized tensor).

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
        task_type: Optional[str] = None,
        loftq_config: Optional[Dict[str, int]] = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        kind = base_kind_of(base_layer)
        if kind is None or kind.embedding != self._embedding or kind.attention != self._attention:
            expected = (
                "a torch.nn.Embedding" if self._embedding
                else "a torch.nn.MultiheadAttention" if self._attention
                else "a torch.nn.Linear, transformers' Conv1D or lorafuse.nn.Linear4bit (lorafuse.nn.Embedding wraps an "
                "nn.Embedding, lorafuse.nn.MultiheadAttention an nn.MultiheadAttention)"
            )
            raise TypeError(f"base_layer: expected {expected}, found {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = kind.features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters' magnitudes
        self._init_storage()
        # The adapters and every rule over them (which is active, disabled, merged, what forward runs, what a
        # merge folds in): the C++ layer's table (lorafuse::nn::AdapterTable), so both follow the same rules.
        self._table = _C.AdapterTable()
        # What forward reads, recomputed from the table whenever it changes (_refresh_route): Python values,
        # so that torch.compile guards on tensors and numbers, not on the active adapter's name (switching
        # between adapters of the same shapes and scale does not recompile). _route: None (the base alone) or
        # [A, B, scale, dropout, DoRA magnitude module or None]; _routes: every adapter's, replaced as a whole so that forward on other threads
        # (use_adapter) reads a consistent table; _scoped: the route per scope name that has one; _scoped_ask:
        # whether a name not in _scoped must be asked of the table (which raises), else it runs the base.
        self._route: Optional[list] = None
        self._routes: Dict[str, list] = {}
        self._scoped: Dict[str, Optional[list]] = {}
        self._scoped_ask = False
        self.register_buffer("weight_unmerged", torch.empty(0, device=kind.device(base_layer)), persistent=False)
        # a 4-bit base merged with requantize=True: its bytes before the merge (buffers, so that .to() moves them),
        # and what the rounding cost
        for name in _NF4_UNMERGED:
            self.register_buffer(name, None, persistent=False)
        self._merge_error: Optional[MergeError] = None
        self.add_adapter(
            adapter_name,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_rslora=use_rslora,
            init_lora_weights=init_lora_weights,
            adapter_dtype=adapter_dtype,
            bias=bias,
            task_type=task_type,
            loftq_config=loftq_config,
            use_dora=use_dora,
        )
        # frozen only once the adapter is valid: a bad argument leaves the caller's layer as it was
        kind.freeze(base_layer)

    #: an embedding layer's adapters (lorafuse.nn.Embedding)
    _embedding = False
    #: a multi-head attention's adapters (lorafuse.nn.MultiheadAttention)
    _attention = False

    # ---- where the adapters' factors live: A [r, in] and B [out, r] (lorafuse.nn.Embedding keeps them as PEFT does) --
    def _init_storage(self) -> None:
        """Registers what holds the factors beside lora_A / lora_B (nothing for a Linear base)."""

    def _new_factors(self, name: str, r: int, device, dtype) -> tuple:
        """Adapter ``name``'s new A [r, in] and B [out, r] (not yet in the layer) and the function that registers them."""
        kw = dict(bias=False, device=device, dtype=dtype)
        a, b = nn.Linear(self.in_features, r, **kw), nn.Linear(r, self.out_features, **kw)

        def register() -> None:
            self.lora_A[name], self.lora_B[name] = a, b

        return a.weight, b.weight, register

    def _factors(self, name: str) -> Tuple[Tensor, Tensor]:
        """Adapter ``name``'s A and B as they are now."""
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _route_factors(self, name: str) -> tuple:
        """What a route holds for A and B: objects whose ``weight`` forward reads at call time (FSDP and
        load_state_dict(assign=True) put new Parameters in)."""
        return self.lora_A[name], self.lora_B[name]

    def _drop_factors(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name]

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
        for name in self._table.names:
            _C.init_adapter_weights(*self._factors(name), self._table.options(name), self._embedding)
            self._init_magnitude(name)

    def _init_magnitude(self, name: str) -> None:
        """A DoRA adapter's magnitude: the row norms of W + scale·B·A (PEFT's start; ‖W‖ when B is zero)."""
        if name in self.lora_magnitude_vector:
            base = self.base_layer
            with torch.no_grad():
                self.lora_magnitude_vector[name].weight.copy_(
                    torch.ops.lorafuse.dora_weight_norm(
                        base_kind_of(base).dora_weight(base), *self._factors(name), self._table.options(name).scale
                    )
                )

    # ---- what the table says (adapters, active_adapter, adapters_enabled: AdapterTableView) -----------
    @property
    def merged_adapters(self) -> List[str]:
        """The adapters folded into the base weight (empty: none)."""
        return list(self._table.merged)

    @property
    def merged(self) -> bool:
        return bool(self._table.merged)

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
        task_type: Optional[str] = None,
        loftq_config: Optional[Dict[str, int]] = None,
        use_dora: bool = False,
        *,
        activate: bool = True,
    ) -> None:
        """Adds adapter ``adapter_name``. The first adapter becomes active (unless ``activate`` is False:
        then a layer without an active adapter keeps none); a later one waits (frozen).

        ``init_lora_weights="loftq"`` (with ``loftq_config`` ``{"loftq_bits": 4, "loftq_iter": 1}``, the defaults):
        LoftQ replaces the dense base weight W by its quantized value Q (NF-``loftq_bits`` in blocks of 64) and
        starts the adapter at the rank-r approximation of W − Q, scaled so that Q + scale·B·A ≈ W (PEFT's LoftQ
        sets A and B without the scale: the same when lora_alpha = r). ``"pissa"`` (PiSSA, exact SVD) and ``"olora"``
        (OLoRA, QR) start A and B from W's principal part as PEFT does, W keeping the residual W − scale·B·A. A base
        without a full-precision weight (a 4-bit one) refuses them.

        ``use_dora=True``: DoRA (PEFT's numerics), over a base with a full-precision weight (an ``nn.Linear`` that
        computes x·Wᵀ + b, transformers' ``Conv1D``); its magnitude starts at the row norms of W + scale·B·A."""
        if not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name: expected a str, found {type(adapter_name).__name__}")
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError(f"r: expected an int, found {type(r).__name__} ({r!r})")
        if adapter_dtype is not None and not isinstance(adapter_dtype, torch.dtype):
            raise TypeError(f"adapter_dtype: expected a torch.dtype or None, found {adapter_dtype!r}")
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora: expected a bool, found {type(use_dora).__name__}")
        opts = AdapterOptions(
            r, float(lora_alpha), float(lora_dropout), bool(use_rslora), init_lora_weights, bias, adapter_dtype,
            task_type, None if loftq_config is None else dict(loftq_config), use_dora,
        )
        kind = base_kind_of(self.base_layer)
        if use_dora and kind.dora_weight(self.base_layer) is None:
            raise ValueError(
                f'add_adapter("{adapter_name}"): use_dora=True: DoRA rescales the rows of the base\'s full-precision '
                f"weight W; {kind.dora_refusal(self.base_layer)}"
            )
        dtype = self._table.check_add(adapter_name, opts, kind.weight_dtype(self.base_layer))
        loftq = _C._init_changes_base(opts.init_lora_weights)  # LoftQ, PiSSA, OLoRA: A and B from the base weight
        if loftq:
            self._check_loftq(adapter_name, r, opts.init_lora_weights)
        device = kind.device(self.base_layer)
        a, b, register = self._new_factors(adapter_name, r, device, dtype)
        if loftq:  # before anything of the layer changes: the decomposition fails before it writes
            _C.init_adapter_weights_from_base(self.base_layer.weight, a, b, opts)
        register()
        if use_dora:
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(self.out_features, device, dtype)
        self._table.add(adapter_name, opts, activate)
        if not loftq:
            _C.init_adapter_weights(a, b, opts, self._embedding)
        self._init_magnitude(adapter_name)  # after LoftQ/PiSSA/OLoRA changed the weight, as PEFT
        if self._table.trains(adapter_name):
            self._apply_trainability()
        else:  # only the new adapter's flags: other threads may be running the others
            for p in self._adapter_parameters(adapter_name):
                p.requires_grad_(False)
            self._refresh_route()

    def _check_loftq(self, adapter_name: str, r: int, init: str = "loftq") -> None:
        """A ValueError unless ``init`` (LoftQ, PiSSA, OLoRA) can start adapter ``adapter_name`` here: a plain nn.Linear
        base (its full-precision weight); then nn::check_loftq_weight: nothing merged into it, r <= min(out, in),
        finite."""
        kind = base_kind_of(self.base_layer)
        why = None
        if self._embedding:
            why = "lorafuse starts an embedding layer's adapter only as PEFT's default does (A zeros, B normal)"
        elif not isinstance(kind, DenseLinear):
            why = (
                f"the base is a {type(self.base_layer).__name__}, not a plain nn.Linear with a full-precision weight "
                "(a quantized base: start LoftQ from the full-precision model, then quantize it)"
            )
        elif kind.merge_refusal(self.base_layer) is not None:
            why = kind.merge_refusal(self.base_layer)
        if why is not None:
            raise ValueError(
                f'add_adapter("{adapter_name}"): init_lora_weights "{init}" changes the layer\'s full-precision '
                f"weight and starts the adapter from it; {why}"
            )
        _C._check_loftq_weight(f'add_adapter("{adapter_name}")', self.base_layer.weight, r, self._table, init)

    def _adapter_parameters(self, name: str) -> List[Tensor]:
        """Adapter ``name``'s trained tensors: A, B and (DoRA) the magnitude."""
        params = list(self._factors(name))
        if name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[name].weight)
        return params

    def _apply_trainability(self) -> None:
        for name in self._table.names:
            train = self._table.trains(name)
            for p in self._adapter_parameters(name):
                p.requires_grad_(train)
        self._refresh_route()

    def _refresh_route(self) -> None:
        table = self._table
        routes = {}
        for n in table.names:
            opts = table.options(n)
            magnitude = self.lora_magnitude_vector[n] if n in self.lora_magnitude_vector else None
            routes[n] = [*self._route_factors(n), opts.scale, opts.lora_dropout, magnitude]
        self._routes = routes
        name = table.route(None)
        self._route = routes.get(name) if name else None
        scoped: Dict[str, Optional[list]] = {}
        for n in ["", *table.names]:
            try:
                target = table.route(n)
            except ValueError:
                continue  # forward asks the table, which raises with the scope's name
            scoped[n] = routes.get(target) if target else None
        try:  # "." can name no adapter: it stands for every name this layer lacks
            table.route(".")
            ask = False
        except ValueError:
            ask = True
        self._scoped, self._scoped_ask = scoped, ask

    def set_adapter(self, adapter_name: str) -> None:
        """Activates ``adapter_name`` (only its A and B require grad); moves no data. Switching away from
        a merged adapter unmerges first, as PEFT does."""
        if self._table.check_activate(adapter_name):
            self.unmerge()
        self._table.activate(adapter_name)
        self._apply_trainability()

    def clear_active_adapter(self) -> None:
        """No adapter active: the layer is its base (unmerging first)."""
        if self._table.check_clear():
            self.unmerge()
        self._table.clear_active()
        self._apply_trainability()

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes ``adapter_name`` (a merged adapter must be unmerged first)."""
        self._table.check_remove(adapter_name)
        new_active = self._table.remove(adapter_name)
        self._refresh_route()  # forward stops seeing it before its modules go
        self._drop_factors(adapter_name)
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if new_active:
            self._apply_trainability()

    def disable_adapters(self) -> None:
        """The base alone from now on (unmerging first); every adapter is frozen until :meth:`enable_adapters` or
        :meth:`set_adapter` (PEFT's behaviour)."""
        if self.merged:
            self.unmerge()
        self._table.set_enabled(False)
        for name in self._table.names:  # as PEFT: disabling freezes every adapter (a switch activates one again)
            for p in self._adapter_parameters(name):
                p.requires_grad_(False)
        self._refresh_route()

    def enable_adapters(self) -> None:
        """The adapters again (the active one trains)."""
        self._table.set_enabled(True)
        self._apply_trainability()

    def delta_weight(self, adapter_name: str) -> Tensor:
        """scale · B · A in float32 (float64 for float64 adapters) [out, in] (op ``lora_delta_weight``)."""
        opts = self._table.options(adapter_name, "delta_weight")
        with torch.no_grad():
            return torch.ops.lorafuse.lora_delta_weight(*self._factors(adapter_name), opts.scale)

    # ---- merging ---------------------------------------------------------------------------------
    def merge(self, adapter_names: Optional[Sequence[str]] = None, requantize: bool = False) -> None:
        """Folds the named adapters (default: the active one) into the base weight, in float32 from the
        unmerged weight. Adapters merged already are left as they are, with a warning (as PEFT). Errors: unknown or
        repeated names; disabled adapters;
        non-finite weights (the weight is then left unchanged). A 4-bit base holds the merged weight only by
        rounding it to 4 bits again: refused unless ``requantize`` (then :attr:`merge_error` reports the cost and
        ``unmerge`` restores the old bytes exactly); other bases ignore ``requantize``."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        everything = self._table.plan_merge(list(adapter_names or []))
        if everything != list(self._table.merged):  # else merged already: plan_merge warned, as PEFT, no change
            self._fold(everything, requantize)

    def _fold(self, everything: List[str], requantize: bool = False) -> None:
        """Makes the base weight hold ``everything`` (a plan of the table) merged into the unmerged weight."""
        kind = base_kind_of(self.base_layer)
        if requantize and kind is not None and kind.quantized_state(self.base_layer) is not None:
            return self._fold_4bit(kind, everything)
        refusal = (
            kind.merge_refusal(self.base_layer)
            if kind is not None
            else f"{type(self.base_layer).__name__} is no base kind lorafuse can merge into"
        )
        if refusal is not None:
            raise ValueError(f"merge: {refusal}")
        weight = kind.merge_weight(self.base_layer)  # [out, in]
        table = self._table
        with torch.no_grad():
            # from the unmerged weight, so merging adapters one by one rounds once; the op checks finiteness
            original = self.weight_unmerged if self.merged else weight
            merged = torch.ops.lorafuse.lora_merge(original, *self._merge_inputs(everything))
            if not self.merged:
                self.weight_unmerged = weight.detach().clone()
            weight.copy_(merged)
        table.set_merged(everything)
        self._refresh_route()

    def _merge_inputs(self, names: List[str]) -> tuple:
        """(A, B, scale, DoRA magnitude or None) lists of the named adapters, as lorafuse.lora_merge takes them."""
        mags = self.lora_magnitude_vector
        return (
            [self._factors(n)[0] for n in names],
            [self._factors(n)[1] for n in names],
            [self._table.options(n).scale for n in names],
            [mags[n].weight if n in mags else None for n in names],
        )

    def unmerge(self) -> None:
        """Restores the unmerged base weight (or 4-bit bytes) exactly. An error when nothing is merged."""
        self._table.check_unmerge()
        if self._unmerged_nf4 is not None:
            base = self.base_layer
            base_kind_of(base).set_quantized_state(base, *self._unmerged_nf4)
        else:
            with torch.no_grad():
                base_kind_of(self.base_layer).merge_weight(self.base_layer).copy_(self.weight_unmerged)
        self._drop_unmerged_copy()

    def _drop_unmerged_copy(self) -> None:
        self.weight_unmerged = torch.empty(0, device=base_kind_of(self.base_layer).device(self.base_layer))
        self._unmerged_nf4 = None
        self._merge_error = None
        self._table.set_merged([])
        self._refresh_route()

    def unloaded_base(self) -> nn.Module:
        """The base layer as it is, for unload (merged adapters stay in it)."""
        return self.base_layer

    def merge_and_unload(self) -> nn.Linear:
        """Merges the active adapter for good (also while disabled) and returns the plain base layer; over a
        4-bit base, a new dense ``nn.Linear`` holding dequant(W) + the adapter (in the compute dtype)."""
        dense = self._unloaded_dense()
        if dense is not None:
            if self.merged:
                self.unmerge()
            for name in list(self._table.names):
                self.delete_adapter(name)
            return dense
        everything = self._table.plan_unload()
        if everything:
            self._fold(everything)
        if self.merged:
            self._drop_unmerged_copy()
        for name in list(self._table.names):
            self.delete_adapter(name)
        return self.base_layer

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        route = self._route_now()
        if isinstance(route, MixedBatch):
            return self._mixed_forward(x, route)
        return self._routed_forward(x, route)

    def _route_now(self) -> Union[None, list, MixedBatch]:
        """What this call runs: an adapter's route, None (the base alone), or the scope's per-row adapters."""
        route = self._route
        if _scope.open_scopes:
            stack = getattr(_scope.thread_scope, "stack", None)
            if stack:
                name = stack[-1][1]
                if isinstance(name, MixedBatch):
                    return name
                scoped = self._scoped  # one snapshot: other threads may refresh it meanwhile
                if name in scoped:
                    route = scoped[name]
                elif self._scoped_ask:
                    target = self._table.route(name)  # raises: another adapter than the merged one
                    route = self._routes.get(target) if target else None
                else:  # a name this layer lacks: its base
                    route = None
        return route

    def _routed_forward(self, x: Tensor, route: Optional[list]) -> Tensor:
        """The base alone (route None) or with one adapter's branch for the whole batch."""
        base = self.base_layer
        if route is None:
            return base(x)
        lora_a, lora_b, scale, dropout, magnitude = route
        # read the weights now: FSDP and load_state_dict(assign=True) put new Parameters in the modules
        a, b = lora_a.weight, lora_b.weight
        p = dropout if self.training else 0.0
        kind = base_kind_of(base)  # asked per call: the base may have been replaced or hooked since
        if magnitude is not None:  # DoRA: the fused op, or over the base's own output when it is called as it is
            if kind is None or kind.dora_weight(base) is None:
                raise ValueError(
                    f"DoRA: the base is now a {type(base).__name__}, whose weight DoRA cannot rescale "
                    "(was base_layer replaced?)"
                )
            fused = kind.fused(base)
            base_out = None if fused else check_base_output(base(x), base, x, self.out_features)
            return torch.ops.lorafuse.dora_linear(
                x, kind.dora_weight(base), base.bias, a, b, scale, p, magnitude.weight, base_out
            )
        if kind is not None and kind.fused(base):
            return kind.lora_forward(base, x, a, b, scale, p)
        # the base as it is (its own forward, its hooks, a thawed weight), the branch added by lora_add
        return lora_add(check_base_output(base(x), base, x, self.out_features), x, a, b, scale, p)

    def _mixed_forward(self, x: Tensor, mixed: MixedBatch) -> Tensor:
        """One adapter per row of x's first dimension (use_adapter with a list): the base once for the whole batch,
        then each row's adapter (lorafuse.lora_multi_add); rows whose adapter this layer lacks, and "__base__"
        rows, keep the base's output."""
        base = self.base_layer
        routes = self._routes  # one snapshot: other threads may refresh it meanwhile
        # the rules (rows and tokens of x, merged layers, rows per name, which adapters, the rows grouped) are the C++
        # RowAdapters'
        present, order, offsets, uniform = mixed.rows.plan(self._table, list(routes), list(x.shape), x.device)
        if not present:
            return base(x)
        if uniform:  # one adapter for every row: the plain path
            return self._routed_forward(x, routes[present[0]])
        chosen = [routes[n] for n in present]
        p = mixed.rows.dropout(present, [float(r[3]) for r in chosen], self.training)
        base_out = check_base_output(base(x), base, x, self.out_features)
        return torch.ops.lorafuse.lora_multi_add(
            base_out, x, [r[0].weight for r in chosen], [r[1].weight for r in chosen], [float(r[2]) for r in chosen],
            order, offsets, float(p),
        )

    def extra_repr(self) -> str:
        return self._table.describe()


__all__ = ["Linear", "AdapterOptions", "MergeError"]
