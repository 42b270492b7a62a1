"""QLoRA layer level of scripts/bench.py (--level qlora): one LoRA layer over a frozen 4-bit NF4 base (double
quantization, blocksize 64), forward (under no_grad) and forward + backward, as ratios to the LoRA layer over the
dense weight, in the run's dtype (float32 on the CPU, bfloat16 on CUDA):

  lora       lorafuse.lora_linear over the dense weight: what the 4-bit base is compared with
  base       the dense base alone, F.linear(x, W, b): the decode target (a 4-bit token should cost less than it)
  qlora      lorafuse's QLoRA layer: nf4_lora_linear(x, W4, b, A, B, scale) (what lorafuse.nn.Linear4bit under a
             LoRA layer runs), W4 dequantized a tile of rows at a time, the branch added in place
  bnb_peft   the real PEFT LoRA layer over the real bitsandbytes Linear4bit (peft.get_peft_model on a module
             holding a bitsandbytes.nn.Linear4bit), the anchor to beat

The 4-bit weight is the same bytes in both on the CPU (checked: lorafuse's and bitsandbytes' quantization of W are
compared byte for byte; on CUDA bitsandbytes' own kernel quantizes, and whether the bytes agree is recorded), A, B, b
and scale are the same; before timing, lorafuse's output and gradients (x, bias, A, B) are compared with
bitsandbytes+PEFT's. On CUDA the grid is the issue's: d = 4096, r = 16, T = 1 (decode: the GEMV on the packed
bytes) and T = 8192, in bfloat16; the model level and the loading memory run on the CPU only.

Then the model level: training steps (forward, loss, backward, AdamW on the adapters) of the model level's Llama
(scripts/bench_model.py's preset, float32) with every Linear but lm_head in NF4: lorafuse (quantize_model +
inject_lora) and PEFT over bitsandbytes' Linear4bit, same adapters (losses checked first), beside lorafuse's float32
LoRA model; tokens/s, and the bytes of the model's weights before and after quantize_model.

Then loading: the peak resident memory (VmHWM, in a fresh process per way, reset once torch, transformers and lorafuse
are imported, minus VmRSS then) of loading a Llama (LOAD_PRESET; float32) from a checkpoint folder:
  skeleton            the meta skeleton and one small NF4 op only: what any way costs beyond its weights (code pages)
  dense               transformers' from_pretrained of the float32 checkpoint, every weight read once (for scale)
  quantize_after      the same, then lorafuse.quantize_model
  quantize_loading    lorafuse.load_checkpoint(meta skeleton, float32 folder, quantize=QuantConfig()): one layer at a time
  load_4bit           lorafuse.load_checkpoint(meta skeleton, 4-bit folder written by lorafuse.save_checkpoint)
  bnb_loading         transformers' from_pretrained with BitsAndBytesConfig(load_in_4bit=True, nf4, double quant)
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import bench_model
from bench_layer import Shape, plot_ratios, time_modes
from common import (
    CpuContention,
    Timer,
    TimingOptions,
    import_lorafuse,
    medians,
    pyplot,
    rounded,
    tensor_bytes,
    time_variants,
)
from torch import Tensor, nn

VARIANTS = ("lora", "base", "qlora", "bnb_peft")
DESCRIPTIONS = {
    "lora": "lorafuse.lora_linear over the dense weight",
    "base": "F.linear(x, W, b): the dense base alone",
    "qlora": "nf4_lora_linear(x, W4, b, A, B, scale): lorafuse's QLoRA layer in one op",
    "bnb_peft": "peft.get_peft_model over bitsandbytes.nn.Linear4bit (nf4, double quantization)",
}
COLORS = {"lora": "tab:gray", "base": "tab:olive", "qlora": "tab:blue", "bnb_peft": "tab:red"}
LABELS = {"lora": "lorafuse LoRA", "base": "dense base alone", "qlora": "lorafuse QLoRA", "bnb_peft": "bitsandbytes + PEFT"}
BLOCKSIZE = 64
SCALE = 2.0
CHECK_TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # max|diff| / max|bitsandbytes+PEFT|
GRID = {
    (False, "cpu"): {"tokens": [512, 2048], "dims": [1024, 2048], "rank": 16},
    (True, "cpu"): {"tokens": [64], "dims": [256], "rank": 16},
    (False, "cuda"): {"tokens": [1, 8192], "dims": [4096], "rank": 16},
    (True, "cuda"): {"tokens": [1, 256], "dims": [1024], "rank": 16},
}
TIMING = {
    False: TimingOptions(repeats=9, warmup=2, warmup_ms=300.0, min_repeat_ms=20.0),
    True: TimingOptions(repeats=3, warmup=1, warmup_ms=20.0, min_repeat_ms=5.0),
}


class _OneLinear(nn.Module):
    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


def _bnb_linear4bit(linear: nn.Linear) -> nn.Module:
    """bitsandbytes' Linear4bit holding `linear`'s weight in NF4 (double quantization, blocksize 64), float32 compute."""
    import bitsandbytes as bnb

    lin = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=torch.float32,
        compress_statistics=True, quant_type="nf4",
    )
    lin.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(), requires_grad=False, compress_statistics=True, quant_type="nf4",
        blocksize=BLOCKSIZE,
    )._quantize("cpu")
    if linear.bias is not None:
        lin.bias = nn.Parameter(linear.bias.detach().clone())
    return lin


def _bnb_peft_layer(
    weight: Tensor, bias: Tensor, a: Tensor, b: Tensor, packed: Tensor
) -> tuple[nn.Module, nn.Parameter, bool]:
    """PEFT's LoRA layer over a bitsandbytes Linear4bit holding `weight` in NF4 on its device, computing in its dtype;
    and whether bitsandbytes' bytes are `packed` (required on the CPU, where both quantize alike)."""
    import bitsandbytes as bnb
    import peft

    out_features, in_features = weight.shape
    lin = bnb.nn.Linear4bit(
        in_features, out_features, bias=True, compute_dtype=weight.dtype, compress_statistics=True, quant_type="nf4"
    )
    lin.weight = bnb.nn.Params4bit(
        weight.detach().clone(), requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=BLOCKSIZE
    )._quantize(weight.device.type)
    same_bytes = torch.equal(lin.weight.data.reshape(-1).view(torch.uint8), packed.reshape(-1))
    if weight.device.type == "cpu" and not same_bytes:
        raise SystemExit("bitsandbytes and lorafuse quantized the weight to different bytes")
    lin.bias = nn.Parameter(bias.detach().clone())
    rank = a.shape[0]
    config = peft.LoraConfig(r=rank, lora_alpha=SCALE * rank, target_modules=["lin"])
    layer = peft.get_peft_model(_OneLinear(lin), config).base_model.model.lin
    layer.lora_A["default"].weight = nn.Parameter(a.detach().clone())
    layer.lora_B["default"].weight = nn.Parameter(b.detach().clone())
    layer.base_layer.bias.requires_grad_(True)
    return layer, layer.base_layer.bias, same_bytes


def measure_shape(s: Shape, timing: TimingOptions, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    lorafuse = import_lorafuse()
    g = torch.Generator().manual_seed(0)

    def make(*shape: int, scale: float = 1.0, grad: bool = False) -> Tensor:
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_() if grad else t

    weight = make(s.d_out, s.d_in, scale=s.d_in**-0.5)
    bias = make(s.d_out, grad=True)
    a = make(s.rank, s.d_in, scale=s.d_in**-0.5, grad=True)
    b = make(s.d_out, s.rank, scale=s.rank**-0.5, grad=True)
    x = make(s.tokens, s.d_in, grad=True)
    grad_out = make(s.tokens, s.d_out)
    q = lorafuse.quantize_nf4(weight, BLOCKSIZE, True)  # on the weight's device
    layer, bnb_bias, same_bytes = _bnb_peft_layer(weight, bias, a, b, q.packed)
    bnb_a, bnb_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def lora() -> Tensor:
        return lorafuse.lora_linear(x, weight, bias, a, b, SCALE)

    def base() -> Tensor:
        return torch.nn.functional.linear(x, weight, bias)

    def qlora() -> Tensor:
        return lorafuse.nf4_lora_linear(x, q, s.d_out, a, b, SCALE, bias, blocksize=BLOCKSIZE)

    fns = {
        "lora": (lora, [x, bias, a, b]),
        "base": (base, [x, bias]),
        "qlora": (qlora, [x, bias, a, b]),
        "bnb_peft": ((lambda: layer(x)), [x, bnb_bias, bnb_a, bnb_b]),
    }
    # lorafuse's QLoRA layer against bitsandbytes + PEFT: output and every gradient
    ours = [qlora(), *torch.autograd.grad(qlora(), fns["qlora"][1], grad_out)]
    theirs = [layer(x), *torch.autograd.grad(layer(x), fns["bnb_peft"][1], grad_out)]
    check = {
        name: ((o - t).abs().max() / t.abs().max()).item()
        for name, o, t in zip(("out", "dx", "dbias", "dlora_a", "dlora_b"), ours, theirs, strict=True)
    }
    if max(check.values()) > CHECK_TOL[dtype]:
        raise SystemExit(f"ABORT at {s.label()}: lorafuse's QLoRA layer differs from bitsandbytes+PEFT: {check}")
    results, _ = time_modes(fns, grad_out, Timer(device), timing)
    med = {m: medians(r) for m, r in results.items()}
    stored = sum(t.numel() * t.element_size() for t in q)
    return {
        "tokens": s.tokens,
        "d_in": s.d_in,
        "d_out": s.d_out,
        "rank": s.rank,
        "status": "ok",
        "check_rel_err": check,
        "bnb_same_bytes": same_bytes,
        "bits_per_weight": stored * 8 / weight.numel(),
        "median_ms": med,
        "ratio_to_lora": {m: {n: med[m][n] / med[m]["lora"] for n in VARIANTS} for m in med},
        "samples_ms": {m: rounded(r) for m, r in results.items()},
    }


MODEL_VARIANTS = ("lora", "qlora", "bnb_peft")


# |loss difference| / |loss| between the two QLoRA models. The layer level agrees exactly (d a multiple of 64); in the
# model, bitsandbytes 0.50.2's native CPU dequantize_4bit decodes down_proj (rows of 1376, not a multiple of the
# block of 64) wrongly near block boundaries, which moves its loss by ~5e-5 (lorafuse decodes the documented values).
MODEL_LOSS_TOL = 1e-4


def measure_model(targets: str, quick: bool, timing: TimingOptions) -> dict[str, Any]:
    """Training-step tokens/s of the three models for one target set (see the module docstring)."""
    lorafuse = import_lorafuse()
    cpu = torch.device("cpu")
    cfg = bench_model.PRESETS[(quick, "cpu")]
    base = bench_model.build_llama(cfg, cpu, torch.float32, seed=0)
    target_list = bench_model.parse_targets(targets)
    lora = bench_model.add_lorafuse(copy.deepcopy(base), target_list, bench_model.DEFAULT_RANK, 0.0)
    quantized = lorafuse.quantize_model(copy.deepcopy(base))
    sizes = {"float32": tensor_bytes(base), "nf4": tensor_bytes(quantized)}
    qlora = bench_model.add_lorafuse(quantized, target_list, bench_model.DEFAULT_RANK, 0.0)
    theirs = copy.deepcopy(base)
    for module in list(theirs.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                setattr(module, name, _bnb_linear4bit(child))
    theirs = bench_model.add_peft(theirs, target_list, bench_model.DEFAULT_RANK, 0.0)
    bench_model.copy_same_adapters(bench_model.adapter_pairs(qlora, theirs), seed=1)
    bench_model.copy_same_adapters(bench_model.adapter_pairs(lora, theirs), seed=1)
    ids = bench_model.make_batch(cfg, cpu, seed=2)
    models = {"lora": lora, "qlora": qlora, "bnb_peft": theirs}
    for m in models.values():
        m.train()
    losses = {n: bench_model.loss_of(m, ids).item() for n, m in models.items()}
    rel = abs(losses["qlora"] - losses["bnb_peft"]) / abs(losses["bnb_peft"])
    if rel > MODEL_LOSS_TOL:
        raise SystemExit(f"ABORT: QLoRA losses differ: lorafuse {losses['qlora']}, bitsandbytes+PEFT {losses['bnb_peft']}")
    steps = {n: bench_model.train_step(m, ids) for n, m in models.items()}
    samples, _ = time_variants(steps, Timer(cpu), timing)
    med = medians(samples)
    tokens = cfg["batch"] * cfg["seq"]
    return {
        "targets": targets,
        "config": cfg,
        "model_bytes": sizes,
        "model_bytes_ratio": sizes["nf4"] / sizes["float32"],
        "losses": losses,
        "loss_rel_diff_qlora_vs_bnb_peft": rel,
        "median_ms": med,
        "tokens_per_s": {n: tokens / (med[n] / 1e3) for n in MODEL_VARIANTS},
        "ratio_step_time_to_lora": {n: med[n] / med["lora"] for n in MODEL_VARIANTS},
        "samples_ms": rounded(samples),
    }


LOAD_WAYS = ("skeleton", "dense", "quantize_after", "quantize_loading", "load_4bit", "bnb_loading")
# hidden, MLP, layers, heads, key/value heads, vocabulary: ~110 M parameters in the quantized layers (quick: ~3 M)
LOAD_PRESET = {False: (1024, 2816, 10, 16, 16, 8192), True: (256, 704, 4, 4, 4, 1024)}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SystemExit(f"no {field} in /proc/self/status")


def _load_probe(way: str, dense_folder: str, nf4_folder: str) -> None:
    """Run in a fresh process: prints {"base_kib", "peak_kib"} of loading the checkpoint one way (see the docstring)."""
    import transformers
    from accelerate import init_empty_weights

    lorafuse = import_lorafuse()
    config = transformers.AutoConfig.from_pretrained(dense_folder)
    with open("/proc/self/clear_refs", "w") as f:  # the peak so far (imports) is forgotten: VmHWM = VmRSS now
        f.write("5")
    base = _status_kib("VmRSS")
    if way == "skeleton":
        with init_empty_weights():
            model = transformers.AutoModelForCausalLM.from_config(config)
        lorafuse.quantize_nf4(torch.randn(64, 64))
    elif way in ("dense", "quantize_after"):
        model = transformers.AutoModelForCausalLM.from_pretrained(dense_folder, dtype=torch.float32)
        for p in model.parameters():  # safetensors maps the file: read every page once
            p.sum()
        if way == "quantize_after":
            lorafuse.quantize_model(model)
    elif way == "bnb_loading":
        q = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(dense_folder, quantization_config=q)
    else:
        with init_empty_weights():
            model = transformers.AutoModelForCausalLM.from_config(config)
        if way == "quantize_loading":
            lorafuse.load_checkpoint(model, dense_folder, quantize=lorafuse.QuantConfig())
        else:
            lorafuse.load_checkpoint(model, nf4_folder)
    peak = _status_kib("VmHWM")
    weights = 0 if way == "skeleton" else tensor_bytes(model)
    print(json.dumps({"base_kib": base, "peak_kib": peak, "weights_bytes": weights}))


def measure_loading(quick: bool) -> dict[str, Any]:
    """Peak memory of loading one model each way (see the module docstring), each in its own process."""
    import transformers

    lorafuse = import_lorafuse()
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
    cfg = dict(zip(keys, LOAD_PRESET[quick]))
    with tempfile.TemporaryDirectory() as tmp:
        dense_folder, nf4_folder = f"{tmp}/dense", f"{tmp}/nf4"
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, tie_word_embeddings=False))
        dense_bytes = tensor_bytes(model)
        model.save_pretrained(dense_folder)
        lorafuse.save_checkpoint(lorafuse.quantize_model(model), nf4_folder)
        del model
        here = str(Path(__file__).resolve().parent)
        out: dict[str, Any] = {"config": cfg, "dense_weights_bytes": dense_bytes, "ways": {}}
        for way in LOAD_WAYS:
            code = f"import sys; sys.path.insert(0, {here!r}); import bench_qlora; bench_qlora._load_probe({way!r}, {dense_folder!r}, {nf4_folder!r})"
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"ABORT: loading {way} failed:\n{done.stderr[-2000:]}")
            probe = json.loads(done.stdout.strip().splitlines()[-1])
            out["ways"][way] = {
                "peak_increase_mib": (probe["peak_kib"] - probe["base_kib"]) / 1024,
                "weights_mib": probe["weights_bytes"] / 2**20,
            }
    return out


def run(device: torch.device, dtype: torch.dtype, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
    """The report's "qlora" section: every (T, d) of the grid at r = 16 in `dtype`; then, on the CPU, the model level
    and the loading memory."""
    section: dict[str, Any] = {"variants": list(VARIANTS), "variant_descriptions": DESCRIPTIONS, "results": []}
    grid = GRID[(quick, device.type)]
    timing = TIMING[quick]
    section.update(
        blocksize=BLOCKSIZE, double_quant=True, scale=SCALE, compute_dtype=str(dtype).replace("torch.", ""),
        timing=vars(timing), statistic="median over repeats of ms per call; ratio = median / lora median",
    )
    name = str(dtype).replace("torch.", "")
    print(f"\n== qlora level: LoRA over an NF4 base (double quantization), {name}, time / {name} LoRA layer time")
    cols = VARIANTS[1:]
    print(f"{'T':>6} {'d':>5} {'r':>3} | {'fwd lora':>9}" + "".join(f" {v:>15}" for v in cols) + f" | {'f+b lora':>9}"
          + "".join(f" {v:>15}" for v in cols))
    t0 = time.perf_counter()
    for d in grid["dims"]:
        for n in grid["tokens"]:
            contention = CpuContention()
            row = measure_shape(Shape(n, d, d, grid["rank"]), timing, device, dtype)
            row["cpu_share_others"] = contention.others_share()
            section["results"].append(row)
            cells = []
            for mode in ("forward", "fwd_bwd"):
                m, r = row["median_ms"][mode], row["ratio_to_lora"][mode]
                cells.append(f" {m['lora']:>7.2f}ms" + "".join(f" {m[v]:>7.2f} ({r[v]:4.2f}x)" for v in cols))
            print(f"{n:>6} {d:>5} {grid['rank']:>3} |" + " |".join(cells), flush=True)
    if device.type != "cpu":
        print("(the qlora model level and the loading memory run on the CPU: --device cpu)")
        section["elapsed_s"] = round(time.perf_counter() - t0, 1)
        return section
    model_timing = bench_model.TIMING[(quick, "cpu")]
    section["model"] = {"variants": list(MODEL_VARIANTS), "timing": vars(model_timing), "results": []}
    cfg = bench_model.PRESETS[(quick, "cpu")]
    print(
        f"\n== qlora model level: Llama hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, batch "
        f"{cfg['batch']} x seq {cfg['seq']}, r={bench_model.DEFAULT_RANK}: training-step tokens/s"
    )
    print(f"{'targets':>16} | {'float32 LoRA':>13} {'lorafuse QLoRA':>15} {'bnb+PEFT QLoRA':>15} | QLoRA lorafuse / bnb+PEFT")
    for targets in (["q_proj,v_proj"] if quick else ["q_proj,v_proj", "all-linear"]):
        row = measure_model(targets, quick, model_timing)
        section["model"]["results"].append(row)
        t = row["tokens_per_s"]
        print(
            f"{targets:>16} | {t['lora']:>13,.0f} {t['qlora']:>15,.0f} {t['bnb_peft']:>15,.0f} | "
            f"{t['qlora'] / t['bnb_peft']:.3f}x",
            flush=True,
        )
    sizes = section["model"]["results"][0]["model_bytes"]
    print(
        f"model weights: float32 {sizes['float32'] / 2**20:.1f} MiB, quantize_model (NF4, lm_head and embeddings "
        f"kept) {sizes['nf4'] / 2**20:.1f} MiB ({sizes['nf4'] / sizes['float32']:.3f}x)"
    )
    loading = measure_loading(quick)
    section["loading"] = loading
    c = loading["config"]
    print(
        f"\n== loading a Llama (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, vocabulary "
        f"{c['vocab_size']}; float32 weights {loading['dense_weights_bytes'] / 2**20:.0f} MiB): peak memory increase"
    )
    for way, row in loading["ways"].items():
        print(f"{way:>18}: {row['peak_increase_mib']:8.1f} MiB peak, {row['weights_mib']:7.1f} MiB of weights after", flush=True)
    q, s4 = loading["ways"]["quantize_loading"], loading["ways"]["skeleton"]
    print(
        f"quantizing while loading: peak beyond the skeleton {q['peak_increase_mib'] - s4['peak_increase_mib']:.1f} MiB "
        f"for {q['weights_mib']:.1f} MiB of weights"
    )
    section["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return section


def plot(path: Path, report: dict[str, Any]) -> bool:
    """Bars of time / float32 LoRA time per shape, forward + backward above, forward below."""
    plt = pyplot()
    rows = [r for r in report["qlora"]["results"] if r["status"] == "ok"]
    if plt is None or not rows:
        return False
    labels = [f"T={r['tokens']}\nd={r['d_in']}\nr={r['rank']}" for r in rows]
    dtype = report["qlora"].get("compute_dtype", "float32")
    plot_ratios(path, report, rows, labels, lambda r: r["ratio_to_lora"], VARIANTS[1:], COLORS, LABELS,
                f"time / {dtype} LoRA layer time", "QLoRA layer (NF4 base)")
    return True
