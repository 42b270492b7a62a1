"""Many adapters in one batch: the cost of a batch whose rows belong to N different adapters, as a ratio to the same
batch through one adapter, for lorafuse (use_adapter with one name per row: the base once, then lora_multi_add) and
for PEFT (its forward's adapter_names, which loops over sub-batches), side by side in one run.

One LoRA layer (a d x d nn.Linear with bias, float32, eval, no_grad) with N adapters of rank r; the batch is 64 rows of
T / 64 tokens each, row i running adapter i mod N. Ratios are medians of --repeats timed repeats, the variants
interleaved (scripts/common.py's time_variants). Writes JSON and Markdown into --results (default bench/results) with
the device named.

  python scripts/bench_mixed.py [--dims 1024 2048] [--tokens 256 1024] [--ranks 16] [--adapters 1 4 16 64]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os

import torch
from common import (
    CpuContention,
    Timer,
    TimingOptions,
    device_name,
    git_commit,
    import_lorafuse,
    medians,
    result_stem,
    rounded,
    time_variants,
    write_json,
)

lorafuse = import_lorafuse()
ROWS = 64


def layers(d: int, r: int, n: int):
    """The same layer and adapters in lorafuse and in PEFT."""
    import peft

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(d, d))
    ours = torch.nn.Sequential(torch.nn.Linear(d, d))
    ours.load_state_dict(base.state_dict())
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"],
                                                       init_lora_weights=False), adapter_name="a0")
    for i in range(1, n):
        theirs.add_adapter(f"a{i}", peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"],
                                                    init_lora_weights=False))
    lorafuse.inject_lora(ours, lorafuse.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]), "a0")
    for i in range(1, n):
        lorafuse.add_adapter(ours, f"a{i}", lorafuse.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]))
    layer = ours[0]
    peft_layer = theirs.base_model.model[0]
    with torch.no_grad():  # the same adapter weights
        for i in range(n):
            layer.lora_A[f"a{i}"].weight.copy_(peft_layer.lora_A[f"a{i}"].weight)
            layer.lora_B[f"a{i}"].weight.copy_(peft_layer.lora_B[f"a{i}"].weight)
    return ours.eval(), theirs.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "..", "bench", "results"))
    args = parser.parse_args()
    device = torch.device("cpu")
    opts = TimingOptions(repeats=args.repeats, warmup=2, warmup_ms=200.0, min_repeat_ms=300.0)
    timer = Timer(device)
    contention = CpuContention()
    rows_out = []
    cells = [(d, tokens, rank) for d in args.dims for tokens in args.tokens for rank in args.ranks]
    for d, tokens, rank in cells:
        n_max = max(args.adapters)
        ours, theirs = layers(d, rank, n_max)
        x = torch.randn(ROWS, tokens // ROWS, d)
        for n in args.adapters:
            names = [f"a{i % n}" for i in range(ROWS)]
            with torch.no_grad(), lorafuse.use_adapter(names):
                check = ours(x)
            with torch.no_grad():
                want = theirs(x, adapter_names=names)
            torch.testing.assert_close(check, want, rtol=1e-4, atol=1e-4)  # the same outputs

            def ours_mixed():
                with torch.no_grad(), lorafuse.use_adapter(names):
                    ours(x)

            def ours_one():
                with torch.no_grad(), lorafuse.use_adapter("a0"):
                    ours(x)

            def peft_mixed():
                with torch.no_grad():
                    theirs(x, adapter_names=names)

            def peft_one():
                with torch.no_grad():
                    theirs(x, adapter_names=["a0"] * ROWS)

            samples, iters = time_variants(
                {"lorafuse_mixed": ours_mixed, "lorafuse_one": ours_one, "peft_mixed": peft_mixed,
                 "peft_one": peft_one}, timer, opts)
            med = medians(samples)
            row = {
                "d": d, "tokens": tokens, "rank": rank, "adapters": n, "iters": iters,
                "ms": rounded(samples, 4), "median_ms": {k: round(v, 4) for k, v in med.items()},
                "lorafuse_ratio": med["lorafuse_mixed"] / med["lorafuse_one"],
                "peft_ratio": med["peft_mixed"] / med["peft_one"],
                "lorafuse_vs_peft_mixed": med["peft_mixed"] / med["lorafuse_mixed"],
                # the N adapters' A and B beside the base weight: bytes a mixed batch reads at least
                "adapter_bytes_per_weight_byte": min(n, ROWS) * 2 * rank * d / (d * d),
            }
            rows_out.append(row)
            print(f"d={d} T={tokens} r={rank} N={n}: lorafuse {row['lorafuse_ratio']:.2f}x one adapter, PEFT "
                  f"{row['peft_ratio']:.2f}x; lorafuse mixed {row['lorafuse_vs_peft_mixed']:.2f}x as fast as "
                  "PEFT mixed", flush=True)
    name = device_name(device)
    commit = git_commit()
    now = dt.datetime.now(dt.timezone.utc)
    report = {"what": "mixed batch (N adapters) / one adapter, lorafuse use_adapter([...]) vs PEFT adapter_names",
              "device": name, "commit": commit, "rows": ROWS, "cpu_share_of_other_processes": contention.others_share(),
              "results": rows_out}
    stem = os.path.join(args.results, f"mixed_{result_stem(now, name, commit)}")
    write_json(stem + ".json", report)
    lines = [f"# Many adapters in one batch: N adapters / one adapter ({name}, commit {commit[:7]})", "",
             f"One d x d Linear, {ROWS} rows, float32, eval; medians of {args.repeats} repeats.", "",
             "The last column: the N adapters' bytes per byte of the base weight (a floor where memory bound).", "",
             "| d | tokens | r | N | lorafuse mixed / one | PEFT mixed / one | PEFT mixed / lorafuse mixed | adapter bytes "
             "/ weight bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows_out:
        lines.append(f"| {r['d']} | {r['tokens']} | {r['rank']} | {r['adapters']} | {r['lorafuse_ratio']:.2f} | "
                     f"{r['peft_ratio']:.2f} | {r['lorafuse_vs_peft_mixed']:.2f} | "
                     f"{r['adapter_bytes_per_weight_byte']:.2f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
