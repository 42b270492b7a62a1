"""lorafuse benchmarks: layer, model and QLoRA-layer levels, on the CPU and on CUDA when present.

  --level layer  one LoRA linear layer, forward and forward + backward: the lorafuse op, lorafuse.nn.Linear,
                 the PEFT-style ATen chain and the real PEFT layer, as ratios to the frozen base layer
                 (scripts/bench_layer.py)
  --level model  training steps of a Hugging Face Llama: lorafuse.inject_lora and peft.get_peft_model with
                 the same adapters, and the frozen model without LoRA; tokens/s, lorafuse / PEFT, and each
                 LoRA variant's step time over the frozen step (scripts/bench_model.py)
  --level qlora  one LoRA layer over a frozen 4-bit NF4 base: lorafuse's QLoRA layer and bitsandbytes + PEFT, as
                 ratios to the LoRA layer over the dense weight (scripts/bench_qlora.py; on CUDA: bf16, d = 4096,
                 T = 1 and 8192); on the CPU also QLoRA training steps and the peak memory of loading a checkpoint
  --level all    all three (the default)

Each level checks lorafuse's results against the other variants before it times anything, and aborts on a
mismatch. Their details follow the options below.

Timing: medians over repeats after warm-up; within each repeat the variants are interleaved (rotated
from repeat to repeat) so that load drift hits all of them alike. CUDA events on a GPU,
time.perf_counter on the CPU.

Output: one JSON per run in --out DIR, named <UTC timestamp>_<device slug>_<commit7>.json (device, torch
and lorafuse versions, git commit, date, load average, shapes, dtype, medians, ratios), and PNG plots
beside it: <same name>_layer.png (ratio to base per shape), <same name>_model.png (tokens/s, step time
over the frozen step, memory) and <same name>_qlora.png (ratio to the float32 LoRA layer).

Examples:
  python scripts/bench.py --quick --out /tmp/bench      # smoke run: small shapes, a tiny Llama
  python scripts/bench.py --level layer --device cpu --tokens 2048 --dims 1024 --ranks 16
  python scripts/bench.py                                # every level, full grid, CUDA when present
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bench_layer
import bench_model
import bench_qlora
import torch
from common import (
    DEFAULT_OUT_DIR,
    DTYPES,
    CpuContention,
    load_average,
    positive_int,
    print_result,
    resolve_device,
    result_stem,
    run_metadata,
    set_threads,
    write_json,
)

LEVELS = {"layer": bench_layer, "model": bench_model, "qlora": bench_qlora}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__,
        epilog=f"{bench_layer.__doc__}\n{bench_model.__doc__}\n{bench_qlora.__doc__}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--level", choices=(*LEVELS, "all"), default="all", help="default: all")
    ap.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="auto", help="auto: cuda when usable"
    )
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument(
        "--quick", action="store_true", help="small shapes, a tiny Llama, few repeats: a smoke run"
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="output folder (default bench/results)")
    ap.add_argument("--no-plot", action="store_true", help="write no PNG")
    ap.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout while timing (default 0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights and batches")
    g = ap.add_argument_group("layer level")
    g.add_argument("--tokens", type=positive_int, nargs="+", metavar="T", help="token counts T (rows of x)")
    g.add_argument("--dims", nargs="+", metavar="D", help="layer sizes: D (in = out = D) or INxOUT")
    g.add_argument("--ranks", type=positive_int, nargs="+", metavar="R", help="LoRA ranks")
    g.add_argument("--repeats", type=positive_int, help="timed repeats per variant (median taken)")
    g.add_argument("--warmup", type=int, help="untimed calls per variant before timing")
    g.add_argument("--warmup-ms", type=float, help="warm-up lasts at least this long per variant")
    g.add_argument("--min-repeat-ms", type=float, help="a repeat loops the step for at least this long")
    g = ap.add_argument_group("model level")
    g.add_argument(
        "--targets",
        nargs="+",
        default=bench_model.DEFAULT_TARGETS,
        help="LoRA target sets, each comma-separated names or all-linear (default: q_proj,v_proj all-linear)",
    )
    g.add_argument(
        "--rank",
        type=positive_int,
        default=bench_model.DEFAULT_RANK,
        help="LoRA rank (lora_alpha = 2 * rank)",
    )
    g.add_argument(
        "--model",
        choices=("llama", "smollm2"),
        default="llama",
        help="llama: a Llama built from a config (random weights; the shape options below); smollm2: the real "
        "SmolLM2-135M-Instruct (lorafuse.pretrained) on task A's text, 4 x 68 tokens a step",
    )
    g.add_argument(
        "--model-dropouts",
        type=float,
        nargs="+",
        metavar="P",
        help="LoRA dropouts of the model level, each target set timed at each (default: --dropout)",
    )
    g.add_argument("--hidden", type=positive_int, help="Llama hidden size")
    g.add_argument("--intermediate", type=positive_int, help="Llama MLP size")
    g.add_argument("--layers", type=positive_int, help="Llama decoder layers")
    g.add_argument("--heads", type=positive_int, help="attention heads (= key/value heads)")
    g.add_argument("--vocab", type=positive_int, help="vocabulary size")
    g.add_argument("--batch", type=positive_int, help="sequences per step")
    g.add_argument("--seq", type=positive_int, help="tokens per sequence")
    g.add_argument("--model-repeats", type=positive_int, help="timed steps per variant (median taken)")
    g.add_argument("--model-warmup", type=int, help="untimed steps per variant before timing")
    g.add_argument(
        "--cpu-memory",
        action=argparse.BooleanOptionalAction,
        help="CPU: peak RSS per variant in separate processes (default: on, off with --quick)",
    )
    ap.add_argument("--memory-probe", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0 or not all(0.0 <= p < 1.0 for p in args.model_dropouts or []):
        ap.error("--dropout and --model-dropouts must be in [0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_probe is not None:  # bench_model.cpu_memory runs this in a process of its own
        set_threads(torch.device("cpu"), args.threads, cpu_default=None)
        print_result(bench_model.memory_probe(json.loads(args.memory_probe)))
        return 0
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    set_threads(device, args.threads, cpu_default=None)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]

    now = dt.datetime.now(dt.timezone.utc)
    report: dict[str, Any] = {"benchmark": "lorafuse (scripts/bench.py)", **run_metadata(device, dtype, now)}
    report["levels"] = list(LEVELS) if args.level == "all" else [args.level]
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
    for level in report["levels"]:
        report[level] = LEVELS[level].run(device, dtype, args, args.quick)
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
        for level in report["levels"]:
            path = args.out / f"{stem}_{level}.png"
            args.out.mkdir(parents=True, exist_ok=True)
            if LEVELS[level].plot(path, report):
                report["plots"].append(path.name)
                print(f"wrote {path}")
    report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    json_path = args.out / f"{stem}.json"
    write_json(json_path, report)
    print(f"wrote {json_path} ({report['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
