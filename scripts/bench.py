#!/usr/bin/env python3
"""lorafuse benchmarks, layer level and model level, on the CPU and on CUDA when present.

Layer level (--level layer): one LoRA linear layer, forward (under no_grad) and forward + backward, the
variants side by side for every shape (T tokens, in, out, rank r), reported as ratios to the base layer:

  base            F.linear(x, W, b): the frozen layer alone (backward gives dX and dbias)
  lorafuse        lorafuse.lora_linear(x, W, b, A, B, scale, dropout_p): the fused op
  lorafuse_layer  lorafuse.nn.Linear around an nn.Linear: the module inject_lora puts into a model
  peft_chain      the unfused ATen chain PEFT runs, written out (as in scripts/bench_lora_linear.py)
  peft            the real PEFT layer: a peft.tuners.lora.Linear made by peft.get_peft_model on a
                  module holding one nn.Linear

All LoRA variants use the same W, b, A, B and scale (lora_alpha / r = 2) and differentiate x, bias, A and
B. Before a shape is timed, lorafuse's output and gradients are compared with every other LoRA variant
(dropout off); a mismatch aborts the run.

Model level (--level model): training steps of a Hugging Face transformers LlamaForCausalLM built from a
small config (nothing is downloaded), LoRA r=16 (lora_alpha 32) on q_proj+v_proj and on all linear
layers. Two copies of the same model get the same adapter weights, one through lorafuse.inject_lora and
one through peft.get_peft_model. A step is forward + causal-LM loss + backward + AdamW step on the adapter
parameters; the report gives each copy's median step time, tokens/s and the ratio lorafuse / PEFT of
tokens/s. Before timing, both copies compute loss and adapter gradients on the same batch (eval mode,
dropout off), and they must agree. Peak memory: on CUDA torch.cuda.max_memory_allocated during one step
of each variant; on the CPU the peak resident set size of a separate process that builds and trains only
that variant (--cpu-memory; off with --quick).

Timing: medians over repeats after warm-up; within each repeat the variants are interleaved (rotated
from repeat to repeat) so that load drift hits all of them alike. CUDA events on a GPU,
time.perf_counter on the CPU.

Output: one JSON per run in --out DIR, named <UTC timestamp>_<device slug>_<commit7>.json (device, torch
and lorafuse versions, git commit, date, load average, shapes, dtype, medians, ratios), and PNG plots
beside it: <same name>_layer.png (ratio to base per shape) and <same name>_model.png (tokens/s).

Examples:
  python scripts/bench.py --quick --out /tmp/bench      # smoke run: small shapes, a tiny Llama
  python scripts/bench.py --level layer --device cpu --tokens 2048 --dims 1024 --ranks 16
  python scripts/bench.py                                # both levels, full grid, CUDA when present
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import bench_lora_linear as bll
from bench_common import (
    DEFAULT_OUT_DIR,
    DTYPES,
    CpuContention,
    Timer,
    TimingOptions,
    import_lorafuse,
    is_oom,
    load_average,
    medians,
    pyplot,
    resolve_device,
    result_stem,
    rounded,
    run_metadata,
    time_variants,
    write_json,
)

LAYER_VARIANTS = ("lorafuse", "lorafuse_layer", "peft_chain", "peft")
MODEL_VARIANTS = ("lorafuse", "peft")
LABELS = {
    "lorafuse": "lorafuse op",
    "lorafuse_layer": "lorafuse.nn.Linear",
    "peft_chain": "PEFT-style chain",
    "peft": "PEFT (peft.tuners.lora.Linear)",
}

# ---- layer level: grids and timing (the full grids are bench_lora_linear's)
LAYER_GRID = {
    False: bll.DEFAULT_GRID,
    True: {
        "cuda": {"tokens": [16, 4096], "dims": ["4096"], "ranks": [16]},
        "cpu": {"tokens": [16, 256], "dims": ["256"], "ranks": [16]},
    },
}
LAYER_TIMING = {
    (False, "cpu"): TimingOptions(repeats=9, warmup=2, warmup_ms=300.0, min_repeat_ms=20.0),
    (False, "cuda"): TimingOptions(repeats=20, warmup=5, warmup_ms=50.0, min_repeat_ms=10.0),
    (True, "cpu"): TimingOptions(repeats=3, warmup=1, warmup_ms=20.0, min_repeat_ms=5.0),
    (True, "cuda"): TimingOptions(repeats=5, warmup=2, warmup_ms=20.0, min_repeat_ms=5.0),
}

# ---- model level: Llama shapes (transformers.LlamaConfig fields) and batches
MODEL_PRESETS = {
    (False, "cpu"): dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4096,
        batch=4,
        seq=128,
    ),
    (True, "cpu"): dict(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        batch=2,
        seq=32,
    ),
    (False, "cuda"): dict(
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        batch=8,
        seq=512,
    ),
    (True, "cuda"): dict(
        hidden_size=1024,
        intermediate_size=2752,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        batch=4,
        seq=256,
    ),
}
LLAMA_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
MODEL_TIMING = {
    (False, "cpu"): TimingOptions(repeats=7, warmup=2, warmup_ms=0.0, min_repeat_ms=0.0),
    (False, "cuda"): TimingOptions(repeats=20, warmup=5, warmup_ms=0.0, min_repeat_ms=50.0),
    (True, "cpu"): TimingOptions(repeats=3, warmup=1, warmup_ms=0.0, min_repeat_ms=0.0),
    (True, "cuda"): TimingOptions(repeats=5, warmup=2, warmup_ms=0.0, min_repeat_ms=20.0),
}
DEFAULT_TARGETS = ["q_proj,v_proj", "all-linear"]
MODEL_RANK = 16
LEARNING_RATE = 1e-4
# Model-level check, lorafuse vs PEFT: |loss difference| / |loss| and, over every adapted layer,
# max|grad difference| / max|PEFT grad| of lora_A and lora_B.
MODEL_LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
MODEL_GRAD_TOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}
PROBE_PREFIX = "LORAFUSE_MEMORY_PROBE "


# ---------------------------------------------------------------- layer level


def _frozen_linear(p: bll.Problem) -> nn.Linear:
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


def lorafuse_layer_fn(p: bll.Problem, dropout_p: float) -> tuple[Callable[[], Tensor], list[Tensor]]:
    """lorafuse.nn.Linear around an nn.Linear, with the problem's A and B."""
    lorafuse = import_lorafuse()
    rank = p.lora_a.shape[0]
    base = _frozen_linear(p)
    layer = lorafuse.nn.Linear(
        base, r=rank, lora_alpha=p.scale * rank, lora_dropout=dropout_p, adapter_dtype=p.lora_a.dtype
    )
    layer.lora_A["default"].weight = nn.Parameter(p.lora_a.detach())
    layer.lora_B["default"].weight = nn.Parameter(p.lora_b.detach())
    base.bias.requires_grad_(True)  # the layer froze it; the other variants differentiate the bias
    inputs = [p.x, base.bias, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return (lambda: layer(p.x)), inputs


def peft_layer_fn(p: bll.Problem, dropout_p: float) -> tuple[Callable[[], Tensor], list[Tensor]]:
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
    layer.lora_A["default"].weight = nn.Parameter(p.lora_a.detach())
    layer.lora_B["default"].weight = nn.Parameter(p.lora_b.detach())
    layer.base_layer.bias.requires_grad_(True)  # PEFT froze it; the other variants differentiate the bias
    inputs = [p.x, layer.base_layer.bias, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return (lambda: layer(p.x)), inputs


def layer_variant_fns(p: bll.Problem, dropout_p: float) -> bll.Variants:
    fns = bll.variant_fns(p, dropout_p)
    fns["lorafuse_layer"] = lorafuse_layer_fn(p, dropout_p)
    fns["peft"] = peft_layer_fn(p, dropout_p)
    return fns


def run_layer_level(
    device: torch.device, dtype: torch.dtype, args: argparse.Namespace, quick: bool
) -> dict[str, Any]:
    kind = device.type
    grid = LAYER_GRID[quick][kind]
    tokens = args.tokens or grid["tokens"]
    dims = bll.parse_dims(args.dims or grid["dims"])
    ranks = args.ranks or grid["ranks"]
    if min(tokens) < 1 or min(ranks) < 1:
        raise SystemExit("--tokens and --ranks must be >= 1")
    t = LAYER_TIMING[(quick, kind)]
    timing = TimingOptions(
        repeats=args.repeats or t.repeats,
        warmup=t.warmup if args.warmup is None else args.warmup,
        warmup_ms=t.warmup_ms if args.warmup_ms is None else args.warmup_ms,
        min_repeat_ms=t.min_repeat_ms if args.min_repeat_ms is None else args.min_repeat_ms,
    )
    opts = argparse.Namespace(**vars(timing), dropout=args.dropout)
    section: dict[str, Any] = {
        "variants": ["base", *LAYER_VARIANTS],
        "variant_descriptions": {
            "base": "F.linear(x, W, b)",
            "lorafuse": "lorafuse.lora_linear (fused op)",
            "lorafuse_layer": "lorafuse.nn.Linear(nn.Linear)",
            "peft_chain": "F.linear(x, W, b) + F.linear(F.linear(dropout(x), A), B) * scale",
            "peft": "peft.tuners.lora.Linear from peft.get_peft_model",
        },
        "scale": bll.SCALE,
        "dropout_p": args.dropout,
        "timing": vars(timing),
        "timer": "cuda events" if kind == "cuda" else "time.perf_counter",
        "statistic": "median over repeats of ms per call; ratio = median / base median",
        "forward_mode": "torch.no_grad()",
        "fwd_bwd_grads": {"base": ["x", "bias"], "lora variants": ["x", "bias", "lora_a", "lora_b"]},
        "check": (
            "before timing each shape (dropout 0): lorafuse vs every other LoRA variant, output and "
            f"gradients, max|diff|/max|other| <= {bll.CHECK_TOL[dtype]:g}"
        ),
        "results": [],
    }
    print(
        f"\n== layer level: {len(tokens) * len(dims) * len(ranks)} shapes, "
        f"repeats {timing.repeats} (median), "
        f"warm-up {timing.warmup} calls / {timing.warmup_ms:g} ms; ratios are time / base time"
    )
    bll.print_header(LAYER_VARIANTS)
    t0 = time.perf_counter()
    for d_in, d_out in dims:
        for rank in ranks:
            for n in tokens:
                shape = bll.Shape(n, d_in, d_out, rank)
                row = bll.bench_shape(shape, dtype, device, opts, layer_variant_fns, LAYER_VARIANTS)
                section["results"].append(row)
                bll.print_row(row, LAYER_VARIANTS)
    section["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return section


# ---------------------------------------------------------------- model level


def parse_targets(spec: str) -> str | list[str]:
    return "all-linear" if spec == "all-linear" else [t for t in spec.split(",") if t]


def build_llama(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        **{k: cfg[k] for k in LLAMA_KEYS},
        max_position_embeddings=cfg["seq"],
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype=dtype)


def add_lorafuse(model: nn.Module, targets: str | list[str], rank: int, dropout: float) -> nn.Module:
    lorafuse = import_lorafuse()
    config = lorafuse.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=targets)
    return lorafuse.inject_lora(model, config)


def add_peft(model: nn.Module, targets: str | list[str], rank: int, dropout: float) -> nn.Module:
    import peft

    config = peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(model, config)


def adapter_pairs(lf_model: nn.Module, peft_model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(path, lorafuse layer, PEFT layer) for every adapted layer; both must adapt the same layers."""
    from peft.tuners.lora import LoraLayer

    lorafuse = import_lorafuse()
    lf = dict(lorafuse.lora_layers(lf_model))
    inner = peft_model.base_model.model
    pe = {path: m for path, m in inner.named_modules() if isinstance(m, LoraLayer)}
    if sorted(lf) != sorted(pe):
        raise SystemExit(
            f"ABORT: lorafuse and PEFT adapt different layers: only lorafuse {sorted(set(lf) - set(pe))}, "
            f"only PEFT {sorted(set(pe) - set(lf))}"
        )
    return [(path, lf[path], pe[path]) for path in sorted(lf)]


def copy_same_adapters(pairs: list[tuple[str, nn.Module, nn.Module]], seed: int) -> None:
    """Random A and B, the same in both models (B is not zero, so the LoRA term counts in the check)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for path, lf, pe in pairs:
            for which in ("lora_A", "lora_B"):
                a = getattr(lf, which)["default"].weight
                b = getattr(pe, which)["default"].weight
                if a.shape != b.shape or a.dtype != b.dtype:
                    raise SystemExit(
                        f"ABORT: {path}.{which}: lorafuse has {tuple(a.shape)} {a.dtype}, "
                        f"PEFT {tuple(b.shape)} {b.dtype}"
                    )
                w = torch.randn(a.shape, generator=g) * a.shape[1] ** -0.5  # fan-in scaled
                a.copy_(w)
                b.copy_(w)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_batch(cfg: dict[str, Any], device: torch.device, seed: int) -> Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]), generator=g).to(device)


def loss_of(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def check_models(
    lf_model: nn.Module,
    peft_model: nn.Module,
    pairs: list[tuple[str, nn.Module, nn.Module]],
    ids: Tensor,
    dtype: torch.dtype,
    what: str,
) -> dict[str, Any]:
    """Loss and adapter gradients of both models on one batch (eval mode: dropout off); aborts on a
    mismatch."""
    losses = {}
    for name, model in (("lorafuse", lf_model), ("peft", peft_model)):
        model.eval()
        model.zero_grad(set_to_none=True)
        try:
            loss = loss_of(model, ids)
            loss.backward()
        except RuntimeError as err:
            if is_oom(err) or name != "lorafuse":
                raise
            raise SystemExit(f"ABORT: the lorafuse model failed at {what}: {err}") from err
        losses[name] = loss.item()
        model.train()
    loss_err = abs(losses["lorafuse"] - losses["peft"]) / max(abs(losses["peft"]), 1e-30)
    grad_err = 0.0
    worst = ""
    for path, lf, pe in pairs:
        for which in ("lora_A", "lora_B"):
            a = getattr(lf, which)["default"].weight.grad
            b = getattr(pe, which)["default"].weight.grad
            if a is None or b is None:
                raise SystemExit(
                    f"ABORT at {what}: {path}.{which} got no gradient (lorafuse {a is not None})"
                )
            err = (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)
            if not err <= grad_err:  # also picks NaN
                grad_err, worst = err, f"{path}.{which}"
    lf_model.zero_grad(set_to_none=True)
    peft_model.zero_grad(set_to_none=True)
    check = {
        "loss_lorafuse": losses["lorafuse"],
        "loss_peft": losses["peft"],
        "loss_rel_err": loss_err,
        "grad_max_rel_err": grad_err,
        "grad_worst_layer": worst,
    }
    if not (loss_err <= MODEL_LOSS_TOL[dtype] and grad_err <= MODEL_GRAD_TOL[dtype]):
        raise SystemExit(
            f"ABORT at {what}: the lorafuse model does not match the PEFT model: "
            f"loss {losses['lorafuse']!r} vs {losses['peft']!r} "
            f"(relative error {loss_err:.3g}, tolerance {MODEL_LOSS_TOL[dtype]:g}); "
            f"adapter gradients max relative error {grad_err:.3g} at {worst} "
            f"(tolerance {MODEL_GRAD_TOL[dtype]:g})"
        )
    return check


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: Tensor) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, ids).backward()
        optimizer.step()

    return step


def cuda_step_memory(step: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Peak allocated memory during one step (both models stay resident, so the step's own share is
    the peak minus what was allocated before it)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {
        "max_memory_allocated_mib": round(peak / 2**20, 1),
        "allocated_before_step_mib": round(before / 2**20, 1),
        "step_peak_over_before_mib": round((peak - before) / 2**20, 1),
    }


def _rss_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: builds one variant's model, trains it a few steps, reports peak RSS."""
    device = torch.device("cpu")
    dtype = DTYPES[spec["dtype"]]
    cfg = spec["config"]
    model = build_llama(cfg, device, dtype, spec["seed"])
    targets = parse_targets(spec["targets"])
    if spec["variant"] == "lorafuse":
        model = add_lorafuse(model, targets, spec["rank"], spec["dropout"])
    else:
        model = add_peft(model, targets, spec["rank"], spec["dropout"])
    model.train()
    ids = make_batch(cfg, device, spec["seed"] + 1)
    step = train_step(model, torch.optim.AdamW(trainable(model), lr=LEARNING_RATE), ids)
    gc.collect()
    built = _rss_mib("VmRSS")
    for _ in range(spec["steps"]):
        step()
    peak = _rss_mib("VmHWM")
    if peak is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return {
        "peak_rss_mib": round(peak, 1),
        "rss_after_build_mib": None if built is None else round(built, 1),
        "peak_over_built_model_mib": None if built is None else round(peak - built, 1),
        "steps": spec["steps"],
    }


def cpu_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """memory_probe in a fresh Python process (peak RSS is per process)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"error": "memory probe timed out"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PROBE_PREFIX):
            return json.loads(line[len(PROBE_PREFIX) :])
    return {"error": f"memory probe failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"}


def bench_model_targets(
    targets_spec: str,
    cfg: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    args: argparse.Namespace,
    timing: TimingOptions,
) -> dict[str, Any]:
    targets = parse_targets(targets_spec)
    row: dict[str, Any] = {"targets": targets_spec}
    what = f"model level, targets {targets_spec}"
    lf_model = build_llama(cfg, device, dtype, args.seed)
    peft_model = add_peft(copy.deepcopy(lf_model), targets, args.rank, args.dropout)
    add_lorafuse(lf_model, targets, args.rank, args.dropout)
    pairs = adapter_pairs(lf_model, peft_model)
    copy_same_adapters(pairs, args.seed + 2)
    params = {"lorafuse": trainable(lf_model), "peft": trainable(peft_model)}
    counts = {k: sum(p.numel() for p in v) for k, v in params.items()}
    if counts["lorafuse"] != counts["peft"]:
        raise SystemExit(f"ABORT at {what}: trainable parameters differ: {counts}")
    row.update(
        adapted_layers=len(pairs),
        trainable_params=counts["lorafuse"],
        all_params=sum(p.numel() for p in lf_model.parameters()),
    )
    ids = make_batch(cfg, device, args.seed + 1)
    row["check"] = check_models(lf_model, peft_model, pairs, ids, dtype, what)

    models = {"lorafuse": lf_model, "peft": peft_model}
    steps = {
        name: train_step(models[name], torch.optim.AdamW(params[name], lr=LEARNING_RATE), ids)
        for name in MODEL_VARIANTS
    }
    samples, iters = time_variants(steps, Timer(device), timing)
    med = medians(samples)
    tokens = cfg["batch"] * cfg["seq"]
    tps = {n: tokens / (ms / 1e3) for n, ms in med.items()}
    row.update(
        status="ok",
        iters_per_repeat=iters,
        median_ms=med,
        tokens_per_s=tps,
        ratio_tokens_per_s=tps["lorafuse"] / tps["peft"],
        samples_ms=rounded(samples, 3),
    )
    if device.type == "cuda":
        row["memory"] = {name: cuda_step_memory(steps[name], device) for name in MODEL_VARIANTS}
    return row


def run_model_level(
    device: torch.device, dtype: torch.dtype, args: argparse.Namespace, quick: bool
) -> dict[str, Any]:
    kind = device.type
    cfg = dict(MODEL_PRESETS[(quick, kind)])
    for key, value in (
        ("hidden_size", args.hidden),
        ("intermediate_size", args.intermediate),
        ("num_hidden_layers", args.layers),
        ("vocab_size", args.vocab),
        ("batch", args.batch),
        ("seq", args.seq),
    ):
        if value is not None:
            cfg[key] = value
    if args.heads is not None:
        cfg["num_attention_heads"] = cfg["num_key_value_heads"] = args.heads
    t = MODEL_TIMING[(quick, kind)]
    timing = TimingOptions(
        repeats=args.model_repeats or t.repeats,
        warmup=t.warmup if args.model_warmup is None else args.model_warmup,
        warmup_ms=t.warmup_ms,
        min_repeat_ms=t.min_repeat_ms,
    )
    cpu_mem = kind == "cpu" and (args.cpu_memory if args.cpu_memory is not None else not quick)
    section: dict[str, Any] = {
        "model": "transformers.LlamaForCausalLM (random weights from the config, sdpa attention)",
        "config": cfg,
        "tokens_per_step": cfg["batch"] * cfg["seq"],
        "lora": {"r": args.rank, "lora_alpha": 2 * args.rank, "lora_dropout": args.dropout},
        "variants": {
            "lorafuse": "lorafuse.inject_lora (lorafuse.nn.Linear layers)",
            "peft": "peft.get_peft_model(task_type=CAUSAL_LM) (peft.tuners.lora.Linear layers)",
        },
        "step": (
            f"optimizer.zero_grad; forward with labels (causal-LM loss); backward; AdamW(lr={LEARNING_RATE}) "
            "step on the adapter parameters; model in train mode"
        ),
        "timing": vars(timing),
        "timer": "cuda events" if kind == "cuda" else "time.perf_counter",
        "statistic": "median over repeats of ms per step; tokens/s = tokens_per_step / median step time",
        "check": (
            "before timing (eval mode, dropout off): |loss diff|/|loss| <= "
            f"{MODEL_LOSS_TOL[dtype]:g} and adapter grads max|diff|/max|PEFT grad| "
            f"<= {MODEL_GRAD_TOL[dtype]:g}"
        ),
        "memory": (
            "CUDA: torch.cuda.max_memory_allocated during one step of each variant (both models resident)"
            if kind == "cuda"
            else (
                "CPU: peak RSS (VmHWM) of a separate process that builds and trains only that variant"
                if cpu_mem
                else "CPU: not measured per variant (--cpu-memory measures it in subprocesses)"
            )
        ),
        "results": [],
    }
    print(
        f"\n== model level: Llama hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
        f"vocab {cfg['vocab_size']}, batch {cfg['batch']} x seq {cfg['seq']}, LoRA r={args.rank}; "
        f"repeats {timing.repeats} (median), warm-up {timing.warmup} steps"
    )
    t0 = time.perf_counter()
    for spec in args.targets:
        contention = CpuContention()
        try:
            row = bench_model_targets(spec, cfg, device, dtype, args, timing)
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not is_oom(err):
                raise
            row = {"targets": spec, "status": "skipped", "reason": "out of memory"}
        row["cpu_share_others"] = contention.others_share()
        gc.collect()
        if kind == "cuda":
            torch.cuda.empty_cache()
        section["results"].append(row)
        print_model_row(row)
    if cpu_mem:
        print("peak memory (separate processes, one per variant):")
        for row in section["results"]:
            if row["status"] != "ok":
                continue
            row["memory"] = {}
            for name in MODEL_VARIANTS:
                spec = {
                    "variant": name,
                    "config": cfg,
                    "targets": row["targets"],
                    "rank": args.rank,
                    "dropout": args.dropout,
                    "dtype": str(dtype).removeprefix("torch."),
                    "seed": args.seed,
                    "steps": 2,
                }
                row["memory"][name] = cpu_memory(spec)
            print(
                f"  {row['targets']:>15}: "
                + ", ".join(
                    f"{n} {m.get('peak_rss_mib', m.get('error'))} MiB peak RSS"
                    for n, m in row["memory"].items()
                )
            )
    section["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return section


def print_model_row(row: dict[str, Any]) -> None:
    if row["status"] != "ok":
        print(f"  {row['targets']:>15}: skipped: {row['reason']}")
        return
    med, tps, check = row["median_ms"], row["tokens_per_s"], row["check"]
    mem = ""
    if "memory" in row:
        mem = ", step memory " + " / ".join(
            f"{n} {m['step_peak_over_before_mib']:.0f} MiB" for n, m in row["memory"].items()
        )
    others = row.get("cpu_share_others")
    busy = f"  * others took {others:.0%} CPU" if others is not None and others > 0.10 else ""
    print(
        f"  {row['targets']:>15}: lorafuse {tps['lorafuse']:,.0f} tok/s ({med['lorafuse']:.1f} ms/step), "
        f"PEFT {tps['peft']:,.0f} tok/s ({med['peft']:.1f} ms/step), "
        f"lorafuse/PEFT {row['ratio_tokens_per_s']:.3f}x"
        f"; {row['adapted_layers']} layers, {row['trainable_params']:,} trainable; "
        f"check: loss {check['loss_rel_err']:.1e}, grads {check['grad_max_rel_err']:.1e}{mem}{busy}",
        flush=True,
    )


# ---------------------------------------------------------------- plots


def plot_layer(path: Path, report: dict[str, Any]) -> bool:
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
    width = 0.8 / len(LAYER_VARIANTS)
    fig, axes = plt.subplots(2, 1, figsize=(max(10.0, 0.62 * len(rows) + 3), 8.5), sharex=True)
    colors = {
        "lorafuse": "tab:blue",
        "lorafuse_layer": "tab:cyan",
        "peft_chain": "tab:orange",
        "peft": "tab:red",
    }
    for ax, mode, title in zip(
        axes, ("fwd_bwd", "forward"), ("forward + backward", "forward (no_grad)"), strict=True
    ):
        for i, name in enumerate(LAYER_VARIANTS):
            xs = [j + (i - (len(LAYER_VARIANTS) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(xs, [r["ratio"][mode][name] for r in rows], width, label=LABELS[name], color=colors[name])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("time / base linear time")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=4)
    axes[1].set_xticks(range(len(rows)))
    axes[1].set_xticklabels(labels, fontsize=7)
    fig.suptitle(_plot_title("LoRA linear layer", report), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_model(path: Path, report: dict[str, Any]) -> bool:
    plt = pyplot()
    section = report["model"]
    rows = [r for r in section["results"] if r["status"] == "ok"]
    if plt is None or not rows:
        return False
    has_mem = all("memory" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6.5, 4.8), squeeze=False)
    colors = {"lorafuse": "tab:blue", "peft": "tab:red"}
    ax = axes[0][0]
    for i, name in enumerate(MODEL_VARIANTS):
        xs = [j + (i - 0.5) * 0.38 for j in range(len(rows))]
        bars = ax.bar(xs, [r["tokens_per_s"][name] for r in rows], 0.38, label=name, color=colors[name])
        if name == "lorafuse":
            for bar, r in zip(bars, rows, strict=True):
                ax.annotate(
                    f"{r['ratio_tokens_per_s']:.2f}x PEFT",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['targets']}\n({r['adapted_layers']} layers)" for r in rows], fontsize=8)
    ax.set_ylabel("training tokens / s (median)")
    ax.set_title("training step: forward + loss + backward + AdamW", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    if has_mem:
        ax = axes[0][1]
        if report["device_type"] == "cuda":
            key, ylabel = "step_peak_over_before_mib", "max_memory_allocated in a step - before it (MiB)"
        else:
            key, ylabel = (
                "peak_over_built_model_mib",
                "peak RSS while training - RSS of the built model (MiB)",
            )
        for i, name in enumerate(MODEL_VARIANTS):
            xs = [j + (i - 0.5) * 0.38 for j in range(len(rows))]
            ax.bar(xs, [r["memory"][name].get(key) or 0 for r in rows], 0.38, label=name, color=colors[name])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["targets"] for r in rows], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(
            "memory of a training step"
            + (" (one process per variant)" if report["device_type"] == "cpu" else ""),
            fontsize=9,
        )
        ax.grid(True, axis="y", alpha=0.3)
    cfg = section["config"]
    fig.suptitle(
        _plot_title(
            f"Llama h={cfg['hidden_size']} L={cfg['num_hidden_layers']} V={cfg['vocab_size']} "
            f"{cfg['batch']}x{cfg['seq']} tokens, LoRA r={section['lora']['r']}",
            report,
        ),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_title(what: str, report: dict[str, Any]) -> str:
    load = report.get("load_average_start")
    return (
        f"{what}, {report['dtype']}, on {report['device']}\n"
        f"torch {report['torch_version']}, lorafuse {report['lorafuse_version']} "
        f"@ {report['git_commit'][:12]}, "
        f"{report['date'][:10]}" + (f", load average {load[0]:g} at start" if load else "")
    )


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--level", choices=("layer", "model", "all"), default="all", help="default: all")
    ap.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="auto", help="auto: cuda when usable"
    )
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument(
        "--quick", action="store_true", help="small shapes, a tiny Llama, few repeats: a smoke run"
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="output folder (default bench/results)")
    ap.add_argument("--no-plot", action="store_true", help="write no PNG")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout while timing (default 0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights and batches")
    g = ap.add_argument_group("layer level")
    g.add_argument("--tokens", type=int, nargs="+", metavar="T", help="token counts T (rows of x)")
    g.add_argument("--dims", nargs="+", metavar="D", help="layer sizes: D (in = out = D) or INxOUT")
    g.add_argument("--ranks", type=int, nargs="+", metavar="R", help="LoRA ranks")
    g.add_argument("--repeats", type=int, help="timed repeats per variant (median taken)")
    g.add_argument("--warmup", type=int, help="untimed calls per variant before timing")
    g.add_argument("--warmup-ms", type=float, help="warm-up lasts at least this long per variant")
    g.add_argument("--min-repeat-ms", type=float, help="a repeat loops the step for at least this long")
    g = ap.add_argument_group("model level")
    g.add_argument(
        "--targets",
        nargs="+",
        default=DEFAULT_TARGETS,
        help="LoRA target sets, each comma-separated names or all-linear (default: q_proj,v_proj all-linear)",
    )
    g.add_argument("--rank", type=int, default=MODEL_RANK, help="LoRA rank (lora_alpha = 2 * rank)")
    g.add_argument("--hidden", type=int, help="Llama hidden size")
    g.add_argument("--intermediate", type=int, help="Llama MLP size")
    g.add_argument("--layers", type=int, help="Llama decoder layers")
    g.add_argument("--heads", type=int, help="attention heads (= key/value heads)")
    g.add_argument("--vocab", type=int, help="vocabulary size")
    g.add_argument("--batch", type=int, help="sequences per step")
    g.add_argument("--seq", type=int, help="tokens per sequence")
    g.add_argument("--model-repeats", type=int, help="timed steps per variant (median taken)")
    g.add_argument("--model-warmup", type=int, help="untimed steps per variant before timing")
    g.add_argument(
        "--cpu-memory",
        action=argparse.BooleanOptionalAction,
        help="CPU: peak RSS per variant in separate processes (default: on, off with --quick)",
    )
    ap.add_argument("--memory-probe", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        ap.error("--dropout must be in [0, 1)")
    if args.rank < 1:
        ap.error("--rank must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_probe is not None:
        print(PROBE_PREFIX + json.dumps(memory_probe(json.loads(args.memory_probe))), flush=True)
        return 0
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    kind = device.type
    dtype = DTYPES[args.dtype or ("bf16" if kind == "cuda" else "fp32")]

    now = dt.datetime.now(dt.timezone.utc)
    report: dict[str, Any] = {"benchmark": "lorafuse (scripts/bench.py)", **run_metadata(device, dtype, now)}
    report["levels"] = ["layer", "model"] if args.level == "all" else [args.level]
    report["quick"] = args.quick
    report["command"] = " ".join(["scripts/bench.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        import peft
        import transformers

        report["peft_version"] = peft.__version__
        report["transformers_version"] = transformers.__version__
    except ImportError as err:
        raise SystemExit(
            f"scripts/bench.py compares with PEFT: {err} (pip install peft transformers)"
        ) from err
    stem = result_stem(now, report["device"], report["git_commit"])
    print(
        f"lorafuse benchmark: {report['device']}, {report['dtype']}, torch {report['torch_version']}, "
        f"lorafuse {report['lorafuse_version']} @ {report['git_commit']}, peft {report['peft_version']}, "
        f"transformers {report['transformers_version']}; load average {report['load_average_start']}"
    )

    contention = CpuContention()
    if "layer" in report["levels"]:
        report["layer"] = run_layer_level(device, dtype, args, args.quick)
    if "model" in report["levels"]:
        report["model"] = run_model_level(device, dtype, args, args.quick)
    others = contention.others_share()
    report["cpu_share_taken_by_other_processes"] = others
    report["load_average_end"] = load_average()
    if others is not None and others > 0.05:
        print(
            f"\nnote: other processes took {others:.0%} of the machine's CPU time during this run; "
            "CPU timings are noisier than on an idle machine"
        )

    report["plots"] = []
    if not args.no_plot:
        for level, plot in (("layer", plot_layer), ("model", plot_model)):
            if level in report:
                path = args.out / f"{stem}_{level}.png"
                args.out.mkdir(parents=True, exist_ok=True)
                if plot(path, report):
                    report["plots"].append(path.name)
                    print(f"wrote {path}")
    report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    json_path = args.out / f"{stem}.json"
    write_json(json_path, report)
    print(f"wrote {json_path} ({report['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
