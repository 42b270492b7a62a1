"""LoraConfig: which layers get LoRA and how, with PEFT's names, meanings and defaults."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from . import _C


@dataclass
class LoraConfig:
    """The LoRA configuration of one adapter (PEFT's ``LoraConfig`` fields).

    Attributes:
        r: rank of every adapter (unless ``rank_pattern`` overrides it); > 0.
        lora_alpha: scale = lora_alpha / r (lora_alpha / sqrt(r) with ``use_rslora``); > 0.
        lora_dropout: dropout on the LoRA branch while training, in [0, 1).
        target_modules: which Linear (or ``nn.Embedding``) layers get the adapter: a list of names (a module matches
            when its path equals an entry or ends with ``"." + entry``), a regular expression that the whole path
            must match, or ``"all-linear"`` (Linear layers only) (every Linear except a transformers model's output layer, its
            ``get_output_embeddings()``, as PEFT). ``None``: PEFT's defaults for the model's type
            (``model.config.model_type``; :func:`lorafuse.default_target_modules`), an error for a model of
            another type or none.
        exclude_modules: layers to leave alone even if selected (same forms), or ``None``.
        bias: which biases train: ``"none"``, ``"all"`` or ``"lora_only"``.
        use_rslora: rank-stabilised scaling lora_alpha / sqrt(r).
        rank_pattern: per-module ranks ``{pattern: r}``; the first pattern P with the path matching
            ``(.*\\.)?(P)$`` applies (PEFT's rule).
        alpha_pattern: per-module lora_alpha, the same way.
        init_lora_weights: ``True`` (A kaiming-uniform, B zeros: a new adapter changes nothing),
            ``"gaussian"`` (A normal(0, 1/r), B zeros), ``False`` (both random) or ``"loftq"``: LoftQ, on the CPU
            too (PEFT's needs CUDA): each targeted layer's full-precision weight W is replaced by its quantized value
            Q (NF-``loftq_bits`` in blocks of 64: at 4 bits bitsandbytes' NF4 without double quantization, as PEFT)
            and the adapter starts at the rank-r approximation of W − Q, so that Q + scale·B·A ≈ W. PEFT sets A and B
            without the scale (the same when lora_alpha = r). Layers whose base is already quantized refuse it;
            ``quantize_model(model, QuantConfig(double_quant=False))`` afterwards stores Q's exact NF4 bytes. An
            adapter loaded from a file takes its weights: LoftQ does not run again.
            ``"pissa"`` (PiSSA: A and B from W's r principal singular directions, exact SVD) and ``"olora"``
            (OLoRA: from W's QR decomposition) start as PEFT computes them, W keeping the residual W − scale·B·A (so
            the model's outputs do not change); like LoftQ they need a full-precision nn.Linear base, and an adapter
            loaded from a file takes its weights. ``"pissa_niter_N"``: PiSSA by a randomized SVD with N subspace
            iterations (torch.svd_lowrank's algorithm and random draws, as PEFT: over a float32 base the same A and B
            for the same seed).
        layers_to_transform: with ``target_modules`` a list of names, only modules inside these layer indices get
            the adapter (an int or a list; None: every layer), as PEFT: a module's layer index is the first number in
            its path after a ``layers_pattern`` entry ("model.layers.3.self_attn.q_proj" → 3 for "layers"), or
            without a pattern the first number that follows two path components; a path named exactly in
            ``target_modules`` is selected whatever its layer.
        layers_pattern: the names of the module lists that hold the layers ("layers", "h", ...; each a regular
            expression), a str or a list; only with ``layers_to_transform``.
        fan_in_fan_out: PEFT's flag for weights stored [in, out] (transformers' ``Conv1D``, GPT-2). As in PEFT, each
            layer's kind decides (Conv1D layers compute transposed, Linear layers do not), so it may be left False;
            an adapter saved over Conv1D layers has it set in adapter_config.json.
        use_dora: DoRA (weight-decomposed LoRA, PEFT's ``use_dora`` with its numerics): each adapter also trains a
            magnitude vector m [out], started at the row norms of W + scale·B·A, and the layer computes
            m / ‖W + scale·B·A‖ ⊙ (x·Wᵀ + scale·(x·Aᵀ)·Bᵀ) + b with the norm a constant. Over nn.Linear and
            transformers' Conv1D layers (refused over quantized bases and Linear subclasses with their own forward);
            saved as ``lora_magnitude_vector`` in PEFT's files; merges as PEFT does.
        loftq_config: with ``"loftq"``: ``{"loftq_bits": 4, "loftq_iter": 1}`` (the defaults; bits 2 .. 8, where
            PEFT's 8 is bitsandbytes' int8 code and lorafuse's NF8) or a :class:`LoftQConfig` (or PEFT's).
        task_type: PEFT's task type (a str or ``peft.TaskType``): ``None``, ``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``,
            ``"FEATURE_EXTRACTION"``, ``"SEQ_CLS"``, ``"TOKEN_CLS"`` or ``"QUESTION_ANS"``; saved in adapter_config.json
            and read from it. As PEFT's task models do, ``"SEQ_CLS"`` and ``"TOKEN_CLS"`` add the task heads
            ``"classifier"`` and ``"score"`` to ``modules_to_save``, ``"QUESTION_ANS"`` adds ``"qa_outputs"`` (the GLUE
            recipe: the classification head trains and is saved with the adapter); the others change nothing.
        modules_to_save: modules that train whole with this adapter and are saved with it (PEFT's field), e.g.
            ``["classifier"]``: each module whose path ends with an entry (PEFT's rule, a plain string suffix) is
            wrapped in a :class:`lorafuse.nn.ModulesToSave` (the original frozen, a trainable copy per adapter; the
            active adapter's copy runs), and LoRA leaves the layers inside it alone. Saved in PEFT's format
            (``base_model.model.classifier.weight``); ``merge_and_unload`` and ``unload`` put the trained copy in
            place. ``None``: none (but the task type's heads).

    The rules are checked (and applied by :func:`lorafuse.inject_lora`) by the same C++ code that the
    C++ ``lorafuse::LoraConfig`` uses. Bad values raise ValueError / TypeError naming the field.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[List[str], str]] = None
    exclude_modules: Optional[Union[List[str], str]] = None
    bias: str = "none"
    use_rslora: bool = False
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    init_lora_weights: Union[bool, str] = True
    task_type: Optional[str] = None
    modules_to_save: Optional[List[str]] = None
    layers_to_transform: Optional[Union[int, List[int]]] = None
    layers_pattern: Optional[Union[str, List[str]]] = None
    fan_in_fan_out: bool = False
    use_dora: bool = False
    loftq_config: Union[Dict[str, int], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.task_type = getattr(self.task_type, "value", self.task_type)  # peft.TaskType: its name
        if self.task_type is not None and not isinstance(self.task_type, str):
            kind = type(self.task_type).__name__
            raise TypeError(f"task_type: expected a str (PEFT's task type) or None, found {kind}")
        _check_number("r", self.r, int)
        _check_number("lora_alpha", self.lora_alpha, (int, float))
        _check_number("lora_dropout", self.lora_dropout, (int, float))
        if not isinstance(self.bias, str):
            raise TypeError(f"bias: expected a str, found {type(self.bias).__name__}")
        for name in ("use_rslora", "fan_in_fan_out", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, found {type(getattr(self, name)).__name__}")
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, {})
            elif not isinstance(value, dict):
                raise TypeError(f"{name}: expected a dict {{pattern: value}}, found {type(value).__name__}")
            for key, v in value.items():
                if not isinstance(key, str):
                    raise TypeError(f"{name}: expected str patterns, found {type(key).__name__} ({key!r})")
                _check_number(f"{name}[{key!r}]", v, int if name == "rank_pattern" else (int, float))
        layers = self.layers_to_transform
        items = [layers] if isinstance(layers, int) else layers if isinstance(layers, (list, tuple)) else None
        if layers is not None:
            if items is None or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
                raise TypeError(
                    f"layers_to_transform: expected a layer index (int), a list of them or None, found {layers!r}"
                )
        pattern = self.layers_pattern
        if pattern is not None and not isinstance(pattern, str):
            if not isinstance(pattern, (list, tuple)) or not all(isinstance(v, str) for v in pattern):
                raise TypeError(f"layers_pattern: expected a str, a list of str or None, found {pattern!r}")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is None or (isinstance(value, str) and name != "modules_to_save"):
                continue
            if isinstance(value, str) or not isinstance(value, (list, tuple, set)):
                forms = "a list of module names or None" if name == "modules_to_save" else (
                    'a list of module names, a regular expression (str) or "all-linear"'
                )
                raise TypeError(f"{name}: expected {forms}, found {type(value).__name__} ({value!r})")
            for item in value:
                if not isinstance(item, str):
                    raise TypeError(f"{name}: expected module names (str), found {type(item).__name__}")
        if self.modules_to_save is not None:
            saved = self.modules_to_save
            self.modules_to_save = sorted(saved) if isinstance(saved, set) else list(saved)
        init = self.init_lora_weights
        if not isinstance(init, (bool, str)):
            raise TypeError(
                'init_lora_weights: expected True, False, "gaussian", "loftq", "pissa", "pissa_niter_N" or "olora", found '
                f"{type(init).__name__}"
            )
        loftq = self.loftq_config
        if loftq is None:
            loftq = {}
        elif not isinstance(loftq, dict):  # lorafuse.LoftQConfig or PEFT's: its fields
            if not hasattr(loftq, "loftq_bits"):
                raise TypeError(
                    "loftq_config: expected a dict {loftq_bits, loftq_iter} or a LoftQConfig, found "
                    f"{type(loftq).__name__}"
                )
            loftq = {"loftq_bits": loftq.loftq_bits, "loftq_iter": loftq.loftq_iter}
        for key, value in loftq.items():
            _check_number(f"loftq_config[{key!r}]", value, int)
        self.loftq_config = dict(loftq)
        _C._validate_lora_config(self._to_json())

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a dict."""
        return dataclasses.asdict(self)

    def _to_json(self) -> str:
        """The fields as PEFT's JSON, which the C++ rules read (lorafuse::lora_config_from_peft_json, the
        one mapping of these names); ``target_modules=None`` stays null (the model type's defaults)."""
        fields = self.to_dict()
        if fields["init_lora_weights"] in ("true", "false"):  # the spelling lorafuse.nn.Linear accepts too
            fields["init_lora_weights"] = fields["init_lora_weights"] == "true"
        for name in ("target_modules", "exclude_modules"):
            if isinstance(fields[name], (tuple, set)):
                fields[name] = sorted(fields[name]) if isinstance(fields[name], set) else list(fields[name])
        return json.dumps(fields)


@dataclass
class LoftQConfig:
    """PEFT's LoftQConfig: how ``init_lora_weights="loftq"`` quantizes (see :class:`LoraConfig`)."""

    loftq_bits: int = 4  #: NF code bits, 2 .. 8
    loftq_iter: int = 1  #: alternating iterations (quantize, then the SVD of what is left), >= 1


def config_fields(config_json: str, file_layers: Optional[List[str]]) -> Dict[str, Any]:
    """The LoraConfig fields of an adapter_config.json text; ``file_layers``: the paths of the file's layers when they
    are the targets (the config names none), which ``target_modules`` then lists (``LoraConfig(**fields)`` selects
    them; None would mean the model type's defaults)."""
    j = json.loads(config_json)
    defaults = LoraConfig.__dataclass_fields__
    out: Dict[str, Any] = {}
    for name, f in defaults.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[name] = j.get(name, default)
    if file_layers is not None:
        out["target_modules"] = list(file_layers)
        out["layers_to_transform"] = out["layers_pattern"] = None  # they narrow names; these are the exact paths
    return out


def _check_number(name: str, value: Any, kinds: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = "an int" if kinds is int else "a number"
        raise TypeError(f"{name}: expected {expected}, found {type(value).__name__} ({value!r})")
    if isinstance(value, float) and not math.isfinite(value):  # JSON (the fields' way to C++) has no NaN
        raise ValueError(f"{name}: expected a finite number, found {value!r}")
