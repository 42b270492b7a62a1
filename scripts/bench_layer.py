"""Layer level of scripts/bench.py (--level layer): one LoRA linear layer, forward (under no_grad) and
forward + backward, the variants side by side for every shape (T tokens, in, out, rank r), reported as
ratios to the base layer:

  base            F.linear(x, W, b): the frozen layer alone (backward gives dX and dbias)
  lorafuse        lorafuse.lora_linear(x, W, b, A, B, scale, dropout_p): the fused op
  lorafuse_layer  lorafuse.nn.Linear around an nn.Linear: the module inject_lora puts into a model
  peft_chain      the unfused ATen chain PEFT runs, written out:
                  F.linear(x, W, b) + F.linear(F.linear(dropout(x), A), B) * scale
                  (dropout is nn.Identity when p == 0, as in PEFT)
  peft            the real PEFT layer: a peft.tuners.lora.Linear made by peft.get_peft_model on a
                  module holding one nn.Linear
  lorafuse_dora   DoRA (use_dora=True): lorafuse.nn.Linear, i.e. torch.ops.lorafuse.dora_linear (the fused op,
                  the row norm of W + scale·B·A without a weight-sized temporary)
  peft_dora       PEFT's DoRA layer (use_dora=True), which PEFT documents as much slower than its LoRA

All LoRA variants use the same W, b, A, B and scale (lora_alpha / r = 2) and differentiate x, bias, A and
B (the DoRA variants also their magnitude vector, the same in both). Before a shape is timed, lorafuse's output and
gradients are compared with every other LoRA variant, and lorafuse's DoRA with PEFT's (dropout off); a mismatch
aborts the run, since timing a wrong result is worthless. A shape that would
not fit in the free memory is skipped. Caches stay warm between calls (no L2 flush).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    CpuContention,
    Timer,
    TimingOptions,
    available_bytes,
    grouped_bars,
    import_lorafuse,
    is_oom,
    medians,
    plot_title,
    pyplot,
    rounded,
    time_variants,
)
from torch import Tensor, nn

LORA_VARIANTS = ("lorafuse", "lorafuse_layer", "peft_chain", "peft")
DORA_VARIANTS = ("lorafuse_dora", "peft_dora")
# each group is checked against its first variant
GROUPS = (LORA_VARIANTS, DORA_VARIANTS)
ALL_VARIANTS = LORA_VARIANTS + DORA_VARIANTS
DESCRIPTIONS = {
    "base": "F.linear(x, W, b)",
    "lorafuse": "lorafuse.lora_linear (fused op)",
    "lorafuse_layer": "lorafuse.nn.Linear(nn.Linear)",
    "peft_chain": "F.linear(x, W, b) + F.linear(F.linear(dropout(x), A), B) * scale",
    "peft": "peft.tuners.lora.Linear from peft.get_peft_model",
    "lorafuse_dora": "lorafuse.nn.Linear(nn.Linear, use_dora=True) (torch.ops.lorafuse.dora_linear)",
    "peft_dora": "peft.tuners.lora.Linear with use_dora=True",
}
LABELS = {
    "lorafuse": "lorafuse op",
    "lorafuse_layer": "lorafuse.nn.Linear",
    "peft_chain": "PEFT-style chain",
    "peft": "PEFT (peft.tuners.lora.Linear)",
    "lorafuse_dora": "lorafuse DoRA",
    "peft_dora": "PEFT DoRA",
}
COLORS = {"lorafuse": "tab:blue", "lorafuse_layer": "tab:cyan", "peft_chain": "tab:orange", "peft": "tab:red",
          "lorafuse_dora": "tab:green", "peft_dora": "tab:purple"}
# Correctness check of lorafuse against the other variants: max |difference| / max |reference|.
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
CHECK_LABELS = ("out", "dx", "dbias", "dlora_a", "dlora_b", "dmagnitude")
SCALE = 2.0  # lora_alpha = 2r, a common choice; the value does not change the timings

# shapes and timing by (--quick, device type)
GRID = {
    (False, "cuda"): {
        "tokens": [1, 16, 4096, 8192, 16384],
        "dims": ["1024", "2048", "4096", "8192"],
        "ranks": [8, 16, 64],
    },
    (False, "cpu"): {"tokens": [1, 16, 512, 2048], "dims": ["512", "1024"], "ranks": [8, 16, 64]},
    (True, "cuda"): {"tokens": [16, 4096], "dims": ["4096"], "ranks": [16]},
    (True, "cpu"): {"tokens": [16, 256], "dims": ["256"], "ranks": [16]},
}
# Warm-up lasts at least warmup_ms per variant: on small VMs a second core can take a few hundred ms of
# steady load before it stops adding multi-ms wake-up stalls to every call.
TIMING = {
    (False, "cpu"): TimingOptions(repeats=9, warmup=2, warmup_ms=300.0, min_repeat_ms=20.0),
    (False, "cuda"): TimingOptions(repeats=20, warmup=5, warmup_ms=50.0, min_repeat_ms=10.0),
    (True, "cpu"): TimingOptions(repeats=3, warmup=1, warmup_ms=20.0, min_repeat_ms=5.0),
    (True, "cuda"): TimingOptions(repeats=5, warmup=2, warmup_ms=20.0, min_repeat_ms=5.0),
}

Variants = dict[str, tuple[Callable[[], Tensor], list[Tensor]]]


@dataclass(frozen=True)
class Shape:
    tokens: int
    d_in: int
    d_out: int
    rank: int

    def label(self) -> str:
        return f"T={self.tokens} in={self.d_in} out={self.d_out} r={self.rank}"


def estimated_bytes(s: Shape, dtype: torch.dtype) -> int:
    """A generous bound on what one shape needs: inputs, outputs, gradients and the chain's temporaries."""
    e = torch.empty((), dtype=dtype).element_size()
    act = s.tokens * max(s.d_in, s.d_out)
    # x, dX, dY, y, plus the unfused chain's base / lora / scaled / sum / dropout tensors and autograd copies
    return e * (14 * act + s.d_in * s.d_out + 2 * s.rank * (s.d_in + s.d_out)) + 4 * 4 * s.tokens * s.rank


def parse_dims(items: Sequence[str]) -> list[tuple[int, int]]:
    """'4096' means in = out = 4096; '4096x11008' means in = 4096, out = 11008."""
    out = []
    for item in items:
        parts = item.lower().split("x")
        if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--dims: cannot read {item!r} (want D or INxOUT)")
        out.append((int(parts[0]), int(parts[-1])))
    return out


# ---------------------------------------------------------------- the variants


@dataclass
class Problem:
    x: Tensor  # [T, in], requires grad
    weight: Tensor  # [out, in], frozen
    bias: Tensor  # [out], requires grad
    lora_a: Tensor  # [r, in]
    lora_b: Tensor  # [out, r]
    grad_out: Tensor  # [T, out]
    scale: float = SCALE


def make_problem(s: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """Inputs scaled so the base output and the LoRA term are both O(1): a wrong LoRA term shows."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size: int, std: float, grad: bool) -> Tensor:
        t = (torch.randn(*size, generator=g) * std).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    return Problem(
        x=randn(s.tokens, s.d_in, std=1.0, grad=True),
        weight=randn(s.d_out, s.d_in, std=s.d_in**-0.5, grad=False),
        bias=randn(s.d_out, std=1.0, grad=True),
        lora_a=randn(s.rank, s.d_in, std=s.d_in**-0.5, grad=True),
        lora_b=randn(s.d_out, s.rank, std=s.rank**-0.5, grad=True),
        grad_out=randn(s.tokens, s.d_out, std=1.0, grad=False),
    )


def _frozen_linear(p: Problem) -> nn.Linear:
    """An nn.Linear holding the problem's weight (frozen) and bias (trainable), sharing their storage."""
    lin = nn.Linear(p.weight.shape[1], p.weight.shape[0], device="meta")
    lin.weight = nn.Parameter(p.weight.detach(), requires_grad=False)
    lin.bias = nn.Parameter(p.bias.detach(), requires_grad=True)
    return lin


class _OneLinear(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


def _with_problem_adapter(layer: nn.Module, bias: nn.Parameter, p: Problem) -> list[Tensor]:
    """Gives a LoRA layer (lorafuse's or PEFT's, same attribute names) the problem's A and B; returns the
    tensors its backward differentiates."""
    layer.lora_A["default"].weight = nn.Parameter(p.lora_a.detach())
    layer.lora_B["default"].weight = nn.Parameter(p.lora_b.detach())
    bias.requires_grad_(True)  # the layer froze it; the other variants differentiate the bias
    return [p.x, bias, layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def lorafuse_layer_fn(p: Problem, dropout_p: float) -> tuple[Callable[[], Tensor], list[Tensor]]:
    """lorafuse.nn.Linear around an nn.Linear, with the problem's A and B."""
    lorafuse = import_lorafuse()
    rank = p.lora_a.shape[0]
    base = _frozen_linear(p)
    layer = lorafuse.nn.Linear(
        base, r=rank, lora_alpha=p.scale * rank, lora_dropout=dropout_p, adapter_dtype=p.lora_a.dtype
    )
    return (lambda: layer(p.x)), _with_problem_adapter(layer, base.bias, p)


def peft_layer_fn(p: Problem, dropout_p: float) -> tuple[Callable[[], Tensor], list[Tensor]]:
    """The real peft.tuners.lora.Linear (from peft.get_peft_model), with the problem's A and B."""
    import peft
    from peft.tuners.lora import Linear as PeftLinear

    rank = p.lora_a.shape[0]
    config = peft.LoraConfig(
        r=rank, lora_alpha=p.scale * rank, lora_dropout=dropout_p, target_modules=["lin"]
    )
    model = peft.get_peft_model(_OneLinear(_frozen_linear(p)), config)
    layer = model.base_model.model.lin
    if type(layer) is not PeftLinear:
        raise SystemExit(f"peft.get_peft_model made a {type(layer).__name__}, not a peft.tuners.lora.Linear")
    if abs(layer.scaling["default"] - p.scale) > 1e-12:
        raise SystemExit(f"PEFT's scaling is {layer.scaling['default']}, expected {p.scale}")
    return (lambda: layer(p.x)), _with_problem_adapter(layer, layer.base_layer.bias, p)


def dora_fns(p: Problem, dropout_p: float) -> Variants:
    """lorafuse's and PEFT's DoRA layers over the same nn.Linear weights with the problem's A and B and the same
    magnitude (PEFT's start, ‖W‖); each differentiates x, bias, A, B and its magnitude."""
    import peft

    lorafuse = import_lorafuse()
    rank = p.lora_a.shape[0]
    config = peft.LoraConfig(
        r=rank, lora_alpha=p.scale * rank, lora_dropout=dropout_p, target_modules=["lin"], use_dora=True
    )
    theirs = peft.get_peft_model(_OneLinear(_frozen_linear(p)), config).base_model.model.lin
    if not theirs.use_dora.get("default"):
        raise SystemExit(f"peft.get_peft_model made a {type(theirs).__name__} without DoRA")
    their_inputs = _with_problem_adapter(theirs, theirs.base_layer.bias, p)
    base = _frozen_linear(p)
    ours = lorafuse.nn.Linear(
        base, r=rank, lora_alpha=p.scale * rank, lora_dropout=dropout_p, adapter_dtype=p.lora_a.dtype, use_dora=True
    )
    our_inputs = _with_problem_adapter(ours, base.bias, p)
    magnitude = theirs.lora_magnitude_vector["default"].weight
    ours.lora_magnitude_vector["default"].weight = nn.Parameter(magnitude.detach().clone())
    return {
        "lorafuse_dora": ((lambda: ours(p.x)), [*our_inputs, ours.lora_magnitude_vector["default"].weight]),
        "peft_dora": ((lambda: theirs(p.x)), [*their_inputs, magnitude]),
    }


def variant_fns(p: Problem, dropout_p: float) -> Variants:
    """Each variant's forward and the tensors its backward differentiates."""
    lorafuse = import_lorafuse()
    dropout: nn.Module = nn.Identity() if dropout_p == 0.0 else nn.Dropout(dropout_p)

    def base() -> Tensor:
        return F.linear(p.x, p.weight, p.bias)

    def fused() -> Tensor:
        return lorafuse.lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scale, dropout_p)

    def peft_chain() -> Tensor:
        result = F.linear(p.x, p.weight, p.bias)
        return result + F.linear(F.linear(dropout(p.x), p.lora_a), p.lora_b) * p.scale

    lora_inputs = [p.x, p.bias, p.lora_a, p.lora_b]
    return {
        "base": (base, [p.x, p.bias]),
        "lorafuse": (fused, lora_inputs),
        "lorafuse_layer": lorafuse_layer_fn(p, dropout_p),
        "peft_chain": (peft_chain, lora_inputs),
        "peft": peft_layer_fn(p, dropout_p),
        **dora_fns(p, dropout_p),
    }


def forward_step(fn: Callable[[], Tensor]) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            fn()

    return step


def fwd_bwd_step(fn: Callable[[], Tensor], inputs: list[Tensor], grad_out: Tensor) -> Callable[[], None]:
    # autograd.grad returns the gradients instead of accumulating into .grad: no zeroing between steps.
    def step() -> None:
        torch.autograd.grad(fn(), inputs, grad_out)

    return step


def time_modes(
    fns: Variants, grad_out: Tensor, timer: Timer, timing: TimingOptions
) -> tuple[dict[str, dict[str, list[float]]], dict[str, int]]:
    """Every variant timed forward (no_grad) and forward + backward: per mode, ms per call per repeat and the
    calls per repeat."""
    results: dict[str, dict[str, list[float]]] = {}
    iters: dict[str, int] = {}
    for mode in ("forward", "fwd_bwd"):
        if mode == "forward":
            steps = {n: forward_step(fn) for n, (fn, _) in fns.items()}
        else:
            steps = {n: fwd_bwd_step(fn, inputs, grad_out) for n, (fn, inputs) in fns.items()}
        results[mode], iters[mode] = time_variants(steps, timer, timing)
    return results, iters


def plot_ratios(path: Path, report: dict[str, Any], rows: list[dict[str, Any]], ticks: list[str], ratios,
                names: Sequence[str], colors: dict[str, str], labels: dict[str, str], ylabel: str, what: str) -> None:
    """Bars of ratios[row][mode][name] per shape, forward + backward above, forward below."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.62 * len(rows) + 3), 8.5), sharex=True)
    for ax, mode, title in zip(
        axes, ("fwd_bwd", "forward"), ("forward + backward", "forward (no_grad)"), strict=True
    ):
        series = {n: [ratios(r)[mode][n] for r in rows] for n in names}
        grouped_bars(ax, series, ticks, colors, labels, legend=mode == "fwd_bwd")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    fig.suptitle(plot_title(what, report), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- check and measure one shape


def check_variants(
    fns: Variants, grad_out: Tensor, dtype: torch.dtype, what: str
) -> dict[str, dict[str, float]]:
    """lorafuse against every other LoRA variant, and lorafuse's DoRA against PEFT's (dropout off): for the output and
    each gradient, max|lorafuse - other| / max|other|. A mismatch or a failing lorafuse call aborts the run
    (SystemExit)."""
    got: dict[str, list[Tensor]] = {}
    for name in ALL_VARIANTS:
        fn, inputs = fns[name]
        try:
            y = fn()
            got[name] = [y.detach(), *torch.autograd.grad(y, inputs, grad_out)]
        except RuntimeError as err:
            if is_oom(err) or not name.startswith("lorafuse"):
                raise
            raise SystemExit(f"ABORT: {name} failed at {what}: {err}") from err
    errors: dict[str, dict[str, float]] = {}
    bad: list[str] = []
    for group in GROUPS:
        for other in group[1:]:
            errors[other] = {}
            for label, a, b in zip(CHECK_LABELS, got[group[0]], got[other]):
                if a.shape != b.shape:
                    raise SystemExit(
                        f"ABORT at {what}: lorafuse's {label} has shape {tuple(a.shape)}, "
                        f"{other}'s {tuple(b.shape)}"
                    )
                ref = b.double().abs().max().item()
                diff = (a.double() - b.double()).abs().max().item()
                err = diff / max(ref, 1e-30)
                errors[other][label] = err
                if not err <= CHECK_TOL[dtype]:  # `not <=` also catches NaN
                    bad.append(f"{other} {label}={err:.3g}")
    if bad:
        raise SystemExit(
            f"ABORT at {what}: lorafuse does not match the other variants "
            f"(relative max error, tolerance {CHECK_TOL[dtype]:g} for {dtype}): " + ", ".join(bad)
        )
    return errors


def measure_shape(
    s: Shape, dtype: torch.dtype, device: torch.device, timing: TimingOptions, dropout: float
) -> dict[str, Any]:
    """Check lorafuse against the other variants once, then time every variant forward and forward +
    backward."""
    p = make_problem(s, dtype, device)
    check = check_variants(variant_fns(p, 0.0), p.grad_out, dtype, f"{s.label()} {dtype}")
    fns = variant_fns(p, dropout)
    timer = Timer(device)
    results, iters = time_modes(fns, p.grad_out, timer, timing)
    med = {m: medians(r) for m, r in results.items()}
    return {
        "status": "ok",
        "check_rel_err": check,
        "iters_per_repeat": iters,
        "median_ms": med,
        "ratio": {m: {n: med[m][n] / med[m]["base"] for n in ALL_VARIANTS} for m in med},
        "samples_ms": {m: rounded(r) for m, r in results.items()},
    }


def bench_shape(
    s: Shape, dtype: torch.dtype, device: torch.device, timing: TimingOptions, dropout: float
) -> dict[str, Any]:
    """One row of the report: measured, or skipped when it would not fit in memory."""
    row: dict[str, Any] = {"tokens": s.tokens, "d_in": s.d_in, "d_out": s.d_out, "rank": s.rank}
    if device.type == "cuda":
        torch.cuda.empty_cache()  # free memory as the driver sees it, without the previous shape's cache
    need, free = estimated_bytes(s, dtype), available_bytes(device)
    if need > 0.8 * free:
        row.update(status="skipped", reason=f"needs ~{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")
        return row
    contention = CpuContention()
    try:
        row.update(measure_shape(s, dtype, device, timing, dropout))
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not is_oom(err):
            raise
        row.update(status="skipped", reason="out of memory")
    row["cpu_share_others"] = contention.others_share()
    return row


def print_header() -> None:
    cells = "".join(f" {n[:15]:>15}" for n in ALL_VARIANTS)
    line = f"{'T':>7} {'in':>5} {'out':>5} {'r':>3} | {'fwd base':>9}{cells} | {'f+b base':>9}{cells}"
    print(line)
    print("-" * len(line))


def print_row(row: dict[str, Any]) -> None:
    head = f"{row['tokens']:>7} {row['d_in']:>5} {row['d_out']:>5} {row['rank']:>3} |"
    if row["status"] != "ok":
        print(f"{head} skipped: {row['reason']}")
        return
    cells = []
    for mode in ("forward", "fwd_bwd"):
        m, r = row["median_ms"][mode], row["ratio"][mode]
        cells.append(
            f" {m['base']:>7.3f}ms" + "".join(f" {m[n]:>7.3f} ({r[n]:4.2f}x)" for n in ALL_VARIANTS)
        )
    others = row.get("cpu_share_others")
    busy = f"  * others took {others:.0%} CPU" if others is not None and others > 0.10 else ""
    print(head + " |".join(cells) + busy, flush=True)


# ---------------------------------------------------------------- the level


def run(device: torch.device, dtype: torch.dtype, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
    """Every shape of the grid (or of --tokens, --dims, --ranks): the report's "layer" section."""
    kind = device.type
    grid = GRID[(quick, kind)]
    tokens = args.tokens or grid["tokens"]
    dims = parse_dims(args.dims or grid["dims"])
    ranks = args.ranks or grid["ranks"]
    t = TIMING[(quick, kind)]
    timing = TimingOptions(
        repeats=args.repeats or t.repeats,
        warmup=t.warmup if args.warmup is None else args.warmup,
        warmup_ms=t.warmup_ms if args.warmup_ms is None else args.warmup_ms,
        min_repeat_ms=t.min_repeat_ms if args.min_repeat_ms is None else args.min_repeat_ms,
    )
    section: dict[str, Any] = {
        "variants": ["base", *ALL_VARIANTS],
        "variant_descriptions": DESCRIPTIONS,
        "scale": SCALE,
        "dropout_p": args.dropout,
        "timing": vars(timing),
        "timer": "cuda events" if kind == "cuda" else "time.perf_counter",
        "statistic": "median over repeats of ms per call; ratio = median / base median",
        "forward_mode": "torch.no_grad()",
        "fwd_bwd_grads": {
            "base": ["x", "bias"],
            "lora variants": ["x", "bias", "lora_a", "lora_b"],
            "dora variants": ["x", "bias", "lora_a", "lora_b", "magnitude"],
        },
        "check": (
            "before timing each shape (dropout 0): lorafuse vs every other LoRA variant and lorafuse_dora vs "
            f"peft_dora, output and gradients, max|diff|/max|other| <= {CHECK_TOL[dtype]:g}"
        ),
        "results": [],
    }
    print(
        f"\n== layer level: {len(tokens) * len(dims) * len(ranks)} shapes, "
        f"repeats {timing.repeats} (median), "
        f"warm-up {timing.warmup} calls / {timing.warmup_ms:g} ms; ratios are time / base time"
    )
    print_header()
    t0 = time.perf_counter()
    for d_in, d_out in dims:
        for rank in ranks:
            for n in tokens:
                row = bench_shape(Shape(n, d_in, d_out, rank), dtype, device, timing, args.dropout)
                section["results"].append(row)
                print_row(row)
    section["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return section


def plot(path: Path, report: dict[str, Any]) -> bool:
    """Bars of time / base time per shape and variant, forward + backward above, forward below."""
    plt = pyplot()
    rows = [r for r in report["layer"]["results"] if r["status"] == "ok"]
    if plt is None or not rows:
        return False
    labels = [
        f"T={r['tokens']}\nd={r['d_in']}"
        + (f"x{r['d_out']}" if r["d_in"] != r["d_out"] else "")
        + f"\nr={r['rank']}"
        for r in rows
    ]
    plot_ratios(path, report, rows, labels, lambda r: r["ratio"], ALL_VARIANTS, COLORS, LABELS,
                "time / base linear time", "LoRA linear layer")
    return True
