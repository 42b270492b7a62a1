"""LQ-LoRA on a model: each targeted Linear weight decomposed as W ≈ Q + L1·L2, Q stored in the quantization
configuration the bit allocation gives that matrix (a :class:`lorafuse.nn.Linear4bit` in that format), L1·L2 the
LoRA adapter's starting point (Guo et al., "LQ-LoRA", 2023). The numerics are C++ (lorafuse::lq_plan); this file
selects the layers, swaps them and injects the adapter."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import _C
from .._cpp import cpp_module_of as _cpp
from ..config import LoraConfig
from ..nn.base_kinds import DenseLinear
from ..nn.linear4bit import Linear4bit
from ..ops import NfFormat, NfWeight
from .bit_allocation import BitAllocation

#: A quantization configuration: a format and the dtype of its statistic scales.
QuantChoice = Tuple[NfFormat, torch.dtype]


def lq_default_grid() -> List[QuantChoice]:
    """NF-b with b in {2, 3, 4, 8}, first-level blocks of 16, 32 and 64, the statistics in bitsandbytes' 8-bit double
    quantization (blocks of 256, float32 scales): 12 configurations from 2.127 to 8.508 bits per weight."""
    return [(NfFormat(*f), d) for f, d in _C._lq_grid("default")]


def lq_paper_grid() -> List[QuantChoice]:
    """The LQ-LoRA paper's 432 configurations: b in {2, 3, 4, 8}, B0 in {16, 32, 64}, b0 in {2, 3, 4, 8}, B1 in
    {16, 64, 256}, scales in float32, float16 or bfloat16."""
    return [(NfFormat(*f), d) for f, d in _C._lq_grid("paper")]


def quant_choice_name(choice: QuantChoice) -> str:
    """``"nf3-b64-s8x256-fp32"``: bits, blocksize, statistics' bits x blocksize and scale dtype."""
    fmt, dtype = choice
    return _C._quant_choice_name(list(fmt), dtype)


@dataclass
class LqLoraConfig:
    """How :func:`lq_lora` quantizes and initialises a model (field names as PEFT's LoraConfig where they exist)."""

    #: Average bits per weight of the quantized matrices (the LoRA factors not counted); None: ``configs`` holds one
    #: configuration used for every matrix (uniform quantization, e.g. NF3).
    budget_bits: Optional[float] = 2.75
    r: int = 64
    lora_alpha: float = 16.0
    target_modules: Union[str, List[str]] = "all-linear"
    lora_dropout: float = 0.0
    #: The candidates; None: :func:`lq_default_grid`.
    configs: Optional[Sequence[QuantChoice]] = None
    #: Module path → its diagonal empirical Fisher [out, in] (:func:`empirical_fisher`); matrices without one are
    #: not weighted.
    fisher: Optional[Dict[str, Tensor]] = None
    max_iters: int = 20
    tol: float = 1e-3
    oversampling: int = 10
    power_iters: int = 2
    seed: int = 0
    #: A JSON file caching the cost table: a second budget on the same model costs only the allocation.
    cache_path: Optional[str] = None
    #: The dtype the quantized layers compute in; None: each layer's weight dtype.
    compute_dtype: Optional[torch.dtype] = None
    adapter_name: str = "default"
    #: Matrices decomposed at once: 0, as many as torch's intra-op threads (``torch.get_num_threads()``); 1, one after
    #: another, each with every thread for its own ops. Results are the same but for the last bits of float sums.
    threads: int = 0
    #: Progress bars (stderr) over the matrices.
    progress: bool = True
    _choices: List[Tuple[List[int], torch.dtype]] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        configs = lq_default_grid() if self.configs is None else list(self.configs)
        choices = []
        for i, c in enumerate(configs):
            if not (isinstance(c, tuple) and len(c) == 2 and isinstance(c[1], torch.dtype)):
                raise TypeError(f"LqLoraConfig: configs[{i}]: expected (NfFormat, stat dtype), found {c!r}")
            choices.append(([int(v) for v in c[0]], c[1]))
        self._choices = choices
        _C._validate_lq_lora_config(
            None if self.budget_bits is None else float(self.budget_bits), int(self.r), float(self.lora_alpha),
            choices, int(self.max_iters), float(self.tol), int(self.oversampling), int(self.power_iters),
            int(self.seed), int(self.threads),
        )
        self._lora_config()  # the adapter's fields checked now

    def _lora_config(self, targets: Union[str, List[str], None] = None) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules if targets is None else targets,
        )


@dataclass(frozen=True)
class LqMatrixReport:
    """What LQ-LoRA chose for one weight matrix."""

    name: str
    out_features: int
    in_features: int
    config: str  #: :func:`quant_choice_name` of its configuration
    bits: float  #: bits per weight of Q
    relative_error: float  #: ‖W − (Q + L1·L2)‖_F / ‖W‖_F (Fisher-weighted if a Fisher was given)
    iterations: int
    best_iteration: int


@dataclass(frozen=True)
class LqLoraReport:
    """What :func:`lq_lora` did."""

    matrices: List[LqMatrixReport]
    average_bits: float  #: bits per weight of the quantized matrices
    average_bits_with_lora: float  #: ... with the float32 LoRA factors counted
    allocation: Optional[BitAllocation]  #: the solver's result (None for uniform quantization)
    from_cache: bool  #: whether the cost table came from ``cache_path``
    seconds: float  #: wall time of the whole call

    def summary(self) -> str:
        """A few lines: the bits achieved, how the configurations were shared out, the solver's gap."""
        counts: Dict[str, int] = {}
        for m in self.matrices:
            counts[m.config] = counts.get(m.config, 0) + 1
        lines = [
            f"LQ-LoRA: {len(self.matrices)} matrices, {self.average_bits:.3f} bits per weight "
            f"({self.average_bits_with_lora:.3f} with the LoRA factors), {self.seconds:.1f} s"
            + (" (cost table from the cache)" if self.from_cache else "")
        ]
        for name, n in sorted(counts.items()):
            lines.append(f"  {name}: {n} matrices")
        if self.allocation is not None:
            a = self.allocation
            lines.append(f"  allocation: {'optimal' if a.optimal else f'gap {a.gap:.2e}'}, {a.nodes} nodes")
        return "\n".join(lines)

    def to_json(self) -> str:
        out = {
            "average_bits": self.average_bits,
            "average_bits_with_lora": self.average_bits_with_lora,
            "from_cache": self.from_cache,
            "seconds": self.seconds,
            "allocation": None if self.allocation is None else self.allocation.__dict__,
            "matrices": [m.__dict__ for m in self.matrices],
        }
        return json.dumps(out, indent=1)


class _Progress:
    """tqdm bars per stage when ``show``; nothing otherwise."""

    def __init__(self, show: bool) -> None:
        self.show, self.bars = show, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.show:
            return
        try:
            from tqdm import tqdm
        except ImportError:  # no progress bars without tqdm (transformers brings it)
            self.show = False
            return

        label = {"cost": "LQ-LoRA cost table", "decompose": "LQ-LoRA decompositions"}.get(stage, stage)
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=label, file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _targets(model: nn.Module, config: LqLoraConfig) -> List[Tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, name, path, linear) of the plain nn.Linear layers the config's target_modules select."""
    from ..peft.model_tree import _select, _sites

    sites = list(_sites(model))
    chosen, _ = _select(model, sites, config._lora_config()._to_json())  # LQ-LoRA configs keep no module whole
    dense = DenseLinear()
    out = []
    for index, _ in chosen:
        parent, name, path, module = sites[index]
        if not dense.matches(module):
            raise ValueError(
                f'lq_lora: "{path}" is a {type(module).__name__}; LQ-LoRA decomposes the dense weight of a plain '
                "torch.nn.Linear (quantize or inject after lq_lora, not before)"
            )
        out.append((parent, name, path, module))
    return out


def lq_lora(model: nn.Module, config: Optional[LqLoraConfig] = None) -> LqLoraReport:
    """LQ-LoRA on ``model``, in place: every Linear that ``config.target_modules`` selects has its weight decomposed
    as W ≈ Q + L1·L2 (:func:`lorafuse.lq_decompose`) under the quantization configuration that the bit allocation
    (:func:`lorafuse.allocate_bits`, exact) gives it within ``config.budget_bits`` — the least total decomposition
    error — and becomes a :class:`lorafuse.nn.Linear4bit` holding Q in that format, wrapped in a lorafuse LoRA layer
    whose adapter ``config.adapter_name`` starts at s·B·A = L1·L2 (s = lora_alpha / r; lora_A = L2/√s,
    lora_B = L1/√s). So before any training the model computes with Q + L1·L2 ≈ W. Then train the adapter as
    usual; only A and B (and nothing of Q) train.

    Returns:
        :class:`LqLoraReport`: per matrix its configuration, bits and error; the average bits with and without the
        LoRA factors; the solver's result.

    Raises:
        ValueError / TypeError: a bad config (the field named), a target that is not a plain nn.Linear, a budget no
            allocation meets (the smallest and largest average printed), a rank too large for a matrix, a Fisher of
            the wrong shape. The model is unchanged when an error is raised.
    """
    config = config or LqLoraConfig()
    if not isinstance(config, LqLoraConfig):
        raise TypeError(f"config: expected a lorafuse.LqLoraConfig, found {type(config).__name__}")
    start = time.perf_counter()
    if not isinstance(config.adapter_name, str):
        raise TypeError(f"LqLoraConfig: adapter_name: expected a str, found {type(config.adapter_name).__name__}")
    if config.compute_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"LqLoraConfig: compute_dtype: expected None, torch.float32, bfloat16 or float16, found "
                        f"{config.compute_dtype}")
    _C._validate_adapter(config.adapter_name, int(config.r), float(config.lora_alpha), float(config.lora_dropout))
    cpp = _cpp(model)
    if cpp is not None:  # a bound C++ model (the reference Llama): lorafuse::lq_lora does it all
        progress = _Progress(config.progress)
        try:
            plan = _C._cpp_lq_lora(
                cpp, *_numeric_fields(config), config._lora_config()._to_json(), config.adapter_name,
                dict(config.fisher or {}), progress,
            )
        finally:
            progress.close()
        return _report(plan, config, start)
    from ..peft.model_tree import _tables, lora_layers

    _C._rules_check_new_adapter(_tables(lora_layers(model)), config.adapter_name, "")  # before anything changes
    targets = _targets(model, config)
    if not targets:
        raise ValueError("lq_lora: target_modules selects no Linear layer")
    fisher = dict(config.fisher or {})
    unknown = sorted(set(fisher) - {path for _, _, path, _ in targets})
    if unknown:
        raise ValueError(f"lq_lora: fisher: {unknown} are not targeted Linear layers")
    matrices = [(path, lin.weight.detach(), fisher.get(path)) for _, _, path, lin in targets]
    progress = _Progress(config.progress)
    try:
        plan = _C._lq_plan(matrices, *_numeric_fields(config), progress)
    finally:
        progress.close()
    rows = plan[0]
    # Nothing of the model changed above. Swap the layers, then inject and initialise the adapter.
    factors = {}
    for (parent, name, path, lin), row in zip(targets, rows):
        _, out_f, in_f, index, _, _, _, _, _, l1, l2, q = row
        fmt, stat_dtype = config._choices[index]
        compute = config.compute_dtype or lin.weight.dtype
        bias = None if lin.bias is None else lin.bias.detach().to(compute).clone()
        layer = Linear4bit._from_parts(
            (in_f, out_f, compute, fmt[1], fmt[2] > 0, (fmt[0], fmt[2] or 8, fmt[3] or 256, stat_dtype), *q, bias)
        )
        layer.to(lin.weight.device)
        setattr(parent, name, layer)
        factors[path] = (l1, l2)
    from ..peft.inject import inject_lora

    inject_lora(model, config._lora_config([path for _, _, path, _ in targets]), config.adapter_name)
    root = (config.lora_alpha / config.r) ** 0.5
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, (l1, l2) in factors.items():
            layer = modules[path]
            a = layer.lora_A[config.adapter_name].weight
            b = layer.lora_B[config.adapter_name].weight
            a.copy_((l2 / root).to(a))
            b.copy_((l1 / root).to(b))
    return _report(plan, config, start)


def _numeric_fields(config: LqLoraConfig) -> tuple:
    """(budget_bits, r, lora_alpha, configs, max_iters, tol, oversampling, power_iters, seed, cache_path, threads) as
    the C++ bindings take them."""
    return (
        None if config.budget_bits is None else float(config.budget_bits),
        int(config.r),
        float(config.lora_alpha),
        config._choices,
        int(config.max_iters),
        float(config.tol),
        int(config.oversampling),
        int(config.power_iters),
        int(config.seed),
        config.cache_path or "",
        int(config.threads),
    )


def _report(plan: tuple, config: LqLoraConfig, start: float) -> LqLoraReport:
    rows, _, _, allocation, avg, avg_lora, from_cache = plan
    matrices = []
    for name, out_f, in_f, index, bits, _, rel, iters, best, *_ in rows:
        fmt, stat_dtype = config._choices[index]
        matrices.append(
            LqMatrixReport(name, out_f, in_f, quant_choice_name((NfFormat(*fmt), stat_dtype)), bits, rel, iters, best)
        )
    return LqLoraReport(
        matrices,
        avg,
        avg_lora,
        None if allocation is None else BitAllocation(*allocation),
        from_cache,
        time.perf_counter() - start,
    )


__all__ = [
    "LqLoraConfig",
    "LqLoraReport",
    "LqMatrixReport",
    "QuantChoice",
    "lq_default_grid",
    "lq_paper_grid",
    "lq_lora",
    "quant_choice_name",
]


def empirical_fisher(
    model: nn.Module, batches, target_modules: Union[str, List[str]] = "all-linear"
) -> Dict[str, Tensor]:
    """The diagonal empirical Fisher of each targeted plain ``nn.Linear`` weight: the sum over examples of the squared
    gradient of that example's loss (float32 [out, in], on the weight's device), for :attr:`LqLoraConfig.fisher`.

    ``batches``: an iterable of keyword-argument dicts for ``model(**batch)`` whose output has a ``loss`` (a Hugging
    Face model given ``labels``), each example of a batch run on its own so that its gradient is its own. The model's
    parameters keep their ``requires_grad`` and its gradients are left as they were."""
    selector = LqLoraConfig(budget_bits=None, configs=[(NfFormat(4, 64, 8, 256), torch.float32)], r=1,
                            target_modules=target_modules, progress=False)
    targets = _targets(model, selector)
    weights = {path: lin.weight for _, _, path, lin in targets}
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    saved_grads = {path: w.grad for path, w in weights.items()}
    fisher = {path: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for path, w in weights.items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            n = next(v for v in batch.values() if isinstance(v, Tensor)).shape[0]
            for i in range(n):
                one = {k: (v[i : i + 1] if isinstance(v, Tensor) else v) for k, v in batch.items()}
                grads = torch.autograd.grad(model(**one).loss, list(weights.values()))
                for path, g in zip(weights, grads):
                    fisher[path] += g.float().square()
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
        for path, w in weights.items():
            w.grad = saved_grads[path]
    return fisher


__all__.append("empirical_fisher")
