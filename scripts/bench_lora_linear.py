#!/usr/bin/env python3
"""Benchmark lorafuse.lora_linear against the frozen base linear and the PEFT-style unfused chain.

For every shape (T tokens, d_in, d_out, rank r) one run times three variants side by side:

  base        F.linear(x, W, b): the frozen layer alone (backward gives dX and dbias only)
  lorafuse    lorafuse.lora_linear(x, W, b, A, B, scale, dropout_p)
  peft_chain  the unfused ATen chain Hugging Face PEFT runs:
              base = F.linear(x, W, b); out = base + lora_B(lora_A(dropout(x))) * scale
              (lora_A / lora_B as nn.Linear-style F.linear calls without bias; dropout is
              nn.Identity when p == 0, as in PEFT)

Each variant is timed forward only (under torch.no_grad) and forward + backward (gradients of x and
bias, plus lora_a and lora_b for the two LoRA variants), and reported as a ratio to base. The numbers
are medians of several repeats taken after warm-up; the variants are interleaved within each repeat
so that clock or load drift hits all of them alike. CUDA times come from CUDA events, CPU times from
time.perf_counter. Caches stay warm between calls (no L2 flush).

Before timing a shape, lorafuse's output and gradients are compared once against the PEFT chain
(dropout off for that check); a mismatch aborts the run, since timing a wrong result is worthless.

Writes a JSON file (device, torch and lorafuse versions, git commit, date, dtype, per-shape medians and
ratios) and, when matplotlib is importable, a PNG plot of the ratios against T.

scripts/bench.py grew out of this script: it adds the real PEFT layer to these variants and a model-level
benchmark (training steps of a Hugging Face Llama with lorafuse vs with PEFT). It imports the layer-level
pieces from here; what both scripts share (environment facts, timing, output) is scripts/bench_common.py.

Examples:
  python scripts/bench_lora_linear.py --quick --out /tmp/bench.json
  python scripts/bench_lora_linear.py --device cpu --tokens 2048 --dims 1024 --ranks 16 --repeats 21
  python scripts/bench_lora_linear.py                      # full default grid on CUDA when available
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench_common import (
    DTYPES,
    CpuContention,
    Timer,
    available_bytes,
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

try:  # --help works without a built lorafuse; main() says how to get one
    import lorafuse
except ImportError:
    lorafuse = None

REPO_ROOT = Path(__file__).resolve().parent.parent
LORA_VARIANTS = ("lorafuse", "peft_chain")
# Correctness check of lorafuse against the other variants: max |difference| / max |reference|.
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
SCALE = 2.0  # lora_alpha = 2r, a common choice; the value does not change the timings

DEFAULT_GRID = {
    "cuda": {
        "tokens": [1, 16, 4096, 8192, 16384],
        "dims": ["1024", "2048", "4096", "8192"],
        "ranks": [8, 16, 64],
    },
    "cpu": {"tokens": [1, 16, 512, 2048], "dims": ["512", "1024"], "ranks": [8, 16, 64]},
}
QUICK_GRID = {
    "cuda": {"tokens": [16, 4096], "dims": ["4096"], "ranks": [16]},
    "cpu": {"tokens": [1, 64, 256], "dims": ["256"], "ranks": [8, 16]},
}
DEFAULT_REPEATS = {"cuda": 20, "cpu": 7}
DEFAULT_WARMUP = {"cuda": 5, "cpu": 2}
# One timed repeat runs the step enough times to last at least this long (short steps are noisy).
MIN_REPEAT_MS = {"cuda": 10.0, "cpu": 20.0}
# Warm-up also lasts at least this long per variant: on small VMs a second core can take a few
# hundred ms of steady load before it stops adding multi-ms wake-up stalls to every call.
WARMUP_MS = {"cuda": 50.0, "cpu": 300.0}
CHECK_LABELS = ("out", "dx", "dbias", "dlora_a", "dlora_b")

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


# ---------------------------------------------------------------- the three variants


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


def variant_fns(p: Problem, dropout_p: float) -> Variants:
    """Each variant's forward and the tensors its backward differentiates."""
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
        "peft_chain": (peft_chain, lora_inputs),
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


def check_variants(
    fns: Variants, grad_out: Tensor, dtype: torch.dtype, what: str, lora_variants: Sequence[str]
) -> dict[str, dict[str, float]]:
    """lorafuse against every other LoRA variant (dropout off): for the output and each gradient,
    max|lorafuse - other| / max|other|. A mismatch or a failing lorafuse call aborts the run (SystemExit):
    timing a wrong result is worthless."""
    got: dict[str, list[Tensor]] = {}
    for name in lora_variants:
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
    for other in lora_variants:
        if other == "lorafuse":
            continue
        errors[other] = {}
        for label, a, b in zip(CHECK_LABELS, got["lorafuse"], got[other], strict=True):
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
    s: Shape,
    dtype: torch.dtype,
    device: torch.device,
    args: Any,
    make_fns: Callable[[Problem, float], Variants] = variant_fns,
    lora_variants: Sequence[str] = LORA_VARIANTS,
) -> dict[str, Any]:
    """Check lorafuse against the other variants once, then time every variant forward and forward +
    backward. `args` has the TimingOptions attributes and `dropout`."""
    p = make_problem(s, dtype, device)
    check = check_variants(make_fns(p, 0.0), p.grad_out, dtype, f"{s.label()} {dtype}", lora_variants)
    all_fns = make_fns(p, args.dropout)
    fns = {n: all_fns[n] for n in ("base", *lora_variants)}
    timer = Timer(device)
    results: dict[str, dict[str, list[float]]] = {}
    iters: dict[str, int] = {}
    for mode in ("forward", "fwd_bwd"):
        if mode == "forward":
            steps = {n: forward_step(fn) for n, (fn, _) in fns.items()}
        else:
            steps = {n: fwd_bwd_step(fn, inputs, p.grad_out) for n, (fn, inputs) in fns.items()}
        results[mode], iters[mode] = time_variants(steps, timer, args)
    med = {m: medians(r) for m, r in results.items()}
    return {
        "status": "ok",
        "check_rel_err": check,
        "iters_per_repeat": iters,
        "median_ms": med,
        "ratio": {m: {n: med[m][n] / med[m]["base"] for n in lora_variants} for m in med},
        "samples_ms": {m: rounded(r) for m, r in results.items()},
    }


def bench_shape(
    s: Shape,
    dtype: torch.dtype,
    device: torch.device,
    args: Any,
    make_fns: Callable[[Problem, float], Variants] = variant_fns,
    lora_variants: Sequence[str] = LORA_VARIANTS,
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
        row.update(measure_shape(s, dtype, device, args, make_fns, lora_variants))
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not is_oom(err):
            raise
        row.update(status="skipped", reason="out of memory")
    row["cpu_share_others"] = contention.others_share()
    return row


# ---------------------------------------------------------------- output


def print_header(lora_variants: Sequence[str] = LORA_VARIANTS) -> None:
    cells = "".join(f" {n[:15]:>15}" for n in lora_variants)
    line = f"{'T':>7} {'in':>5} {'out':>5} {'r':>3} | {'fwd base':>9}{cells} | {'f+b base':>9}{cells}"
    print(line)
    print("-" * len(line))


def print_row(row: dict[str, Any], lora_variants: Sequence[str] = LORA_VARIANTS) -> None:
    head = f"{row['tokens']:>7} {row['d_in']:>5} {row['d_out']:>5} {row['rank']:>3} |"
    if row["status"] != "ok":
        print(f"{head} skipped: {row['reason']}")
        return
    cells = []
    for mode in ("forward", "fwd_bwd"):
        m, r = row["median_ms"][mode], row["ratio"][mode]
        cells.append(
            f" {m['base']:>7.3f}ms" + "".join(f" {m[n]:>7.3f} ({r[n]:4.2f}x)" for n in lora_variants)
        )
    others = row.get("cpu_share_others")
    busy = f"  * others took {others:.0%} CPU" if others is not None and others > 0.10 else ""
    print(head + " |".join(cells) + busy, flush=True)


def write_plot(path: Path, report: dict[str, Any]) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    rows = [r for r in report["results"] if r["status"] == "ok"]
    if not rows:
        print("no measured shapes: no plot written")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    groups = sorted({(r["d_in"], r["d_out"], r["rank"]) for r in rows})
    colors = plt.get_cmap("tab10")
    for ax, mode, title in zip(
        axes, ("fwd_bwd", "forward"), ("forward + backward", "forward (no_grad)"), strict=True
    ):
        for i, (d_in, d_out, rank) in enumerate(groups):
            pts = sorted(
                (r["tokens"], r["ratio"][mode])
                for r in rows
                if (r["d_in"], r["d_out"], r["rank"]) == (d_in, d_out, rank)
            )
            t = [p[0] for p in pts]
            dims = f"d={d_in}" if d_in == d_out else f"{d_in}x{d_out}"
            c = colors(i % 10)
            ax.plot(t, [p[1]["lorafuse"] for p in pts], "-o", color=c, label=f"lorafuse {dims} r={rank}")
            ax.plot(t, [p[1]["peft_chain"] for p in pts], "--x", color=c, label=f"PEFT chain {dims} r={rank}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time / base linear time")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"lora_linear {report['dtype']} on {report['device']} — lorafuse {report['lorafuse_version']}"
        f" @ {report['git_commit'][:12]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- main


def parse_dims(items: Sequence[str]) -> list[tuple[int, int]]:
    """'4096' means in = out = 4096; '4096x11008' means in = 4096, out = 11008."""
    out = []
    for item in items:
        parts = item.lower().split("x")
        if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--dims: cannot read {item!r} (want D or INxOUT)")
        out.append((int(parts[0]), int(parts[-1])))
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when usable, else cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--tokens", type=int, nargs="+", metavar="T", help="token counts T (rows of x)")
    ap.add_argument("--dims", nargs="+", metavar="D", help="layer sizes: D (in = out = D) or INxOUT")
    ap.add_argument("--ranks", type=int, nargs="+", metavar="R", help="LoRA ranks")
    ap.add_argument("--repeats", type=int, help="timed repeats per variant (median taken)")
    ap.add_argument("--warmup", type=int, help="untimed calls per variant before timing")
    ap.add_argument("--warmup-ms", type=float, help="warm-up lasts at least this long per variant")
    ap.add_argument("--min-repeat-ms", type=float, help="a repeat loops the step for at least this long")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout probability (default 0)")
    ap.add_argument("--quick", action="store_true", help="a small grid and few repeats: a smoke run")
    ap.add_argument(
        "--out", type=Path, help="JSON path (default bench/results/<date>_<device>_<commit7>.json)"
    )
    ap.add_argument("--plot", type=Path, help="PNG path (default: the JSON path with .png)")
    ap.add_argument("--no-plot", action="store_true", help="write no PNG")
    args = ap.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        ap.error("--dropout must be in [0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import_lorafuse()  # a clear message when lorafuse is missing
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    kind = device.type
    dtype = DTYPES[args.dtype or ("bf16" if kind == "cuda" else "fp32")]
    grid = (QUICK_GRID if args.quick else DEFAULT_GRID)[kind]
    tokens = args.tokens or grid["tokens"]
    dims = parse_dims(args.dims or grid["dims"])
    ranks = args.ranks or grid["ranks"]
    args.repeats = args.repeats or (3 if args.quick else DEFAULT_REPEATS[kind])
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else DEFAULT_WARMUP[kind])
    args.min_repeat_ms = args.min_repeat_ms if args.min_repeat_ms is not None else MIN_REPEAT_MS[kind]
    args.warmup_ms = args.warmup_ms if args.warmup_ms is not None else WARMUP_MS[kind]
    if min(tokens) < 1 or min(ranks) < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("tokens, ranks and repeats must be >= 1, warmup >= 0")

    now = dt.datetime.now(dt.timezone.utc)
    report: dict[str, Any] = {"benchmark": "lora_linear", **run_metadata(device, dtype, now)}
    name, commit = report["device"], report["git_commit"]
    if args.out is None:
        args.out = REPO_ROOT / "bench" / "results" / f"{result_stem(now, name, commit)}.json"
    plot_path = None if args.no_plot else (args.plot or args.out.with_suffix(".png"))
    report.update(
        {
            "scale": SCALE,
            "dropout_p": args.dropout,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "warmup_ms": args.warmup_ms,
            "min_repeat_ms": args.min_repeat_ms,
            "timer": "cuda events" if kind == "cuda" else "time.perf_counter",
            "statistic": "median over repeats of ms per call",
            "forward_mode": "torch.no_grad()",
            "fwd_bwd_grads": {
                "base": ["x", "bias"],
                "lorafuse": ["x", "bias", "lora_a", "lora_b"],
                "peft_chain": ["x", "bias", "lora_a", "lora_b"],
            },
            "check": (
                f"lorafuse vs peft_chain at dropout 0: max|diff|/max|chain|, tolerance {CHECK_TOL[dtype]:g}"
            ),
            "results": [],
        }
    )

    print(
        f"lora_linear benchmark: {name}, {report['dtype']}, torch {torch.__version__}, "
        f"lorafuse {report['lorafuse_version']} @ {commit}"
    )
    print(
        f"repeats {args.repeats} (median), warm-up {args.warmup} calls / {args.warmup_ms:g} ms, "
        f"dropout {args.dropout}, scale {SCALE}; "
        "ratios are time / base linear time\n"
    )
    print_header()
    contention = CpuContention()
    for d_in, d_out in dims:
        for rank in ranks:
            for t in tokens:
                row = bench_shape(Shape(t, d_in, d_out, rank), dtype, device, args)
                report["results"].append(row)
                print_row(row)

    others = contention.others_share()
    report["cpu_share_taken_by_other_processes"] = others
    report["load_average_end"] = load_average()
    if others is not None and others > 0.05:
        print(
            f"\nnote: other processes took {others:.0%} of the machine's CPU time during this run; "
            "CPU timings are noisier than on an idle machine"
        )
    write_json(args.out, report)
    print(f"\nwrote {args.out}")
    if plot_path is not None and write_plot(plot_path, report):
        print(f"wrote {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
