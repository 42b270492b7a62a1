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

Examples:
  python scripts/bench_lora_linear.py --quick --out /tmp/bench.json
  python scripts/bench_lora_linear.py --device cpu --tokens 2048 --dims 1024 --ranks 16 --repeats 21
  python scripts/bench_lora_linear.py                      # full default grid on CUDA when available
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # --help works without a built lorafuse; main() says how to get one
    import lorafuse
except ImportError as _err:
    lorafuse = None
    _LORAFUSE_IMPORT_ERROR: ImportError | None = _err
else:
    _LORAFUSE_IMPORT_ERROR = None

REPO_ROOT = Path(__file__).resolve().parent.parent
LORA_VARIANTS = ("lorafuse", "peft_chain")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Correctness check of lorafuse against the PEFT chain: max |difference| / max |reference|.
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
MAX_ITERS_PER_REPEAT = 1000


@dataclass(frozen=True)
class Shape:
    tokens: int
    d_in: int
    d_out: int
    rank: int

    def label(self) -> str:
        return f"T={self.tokens} in={self.d_in} out={self.d_out} r={self.rank}"


# ---------------------------------------------------------------- environment facts


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU model with the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """HEAD's hash, with '-dirty' when tracked files differ from it; 'unknown' outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if status else "")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "device"


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors on the device (CPU: MemAvailable); a large number when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def estimated_bytes(s: Shape, dtype: torch.dtype) -> int:
    """A generous bound on what one shape needs: inputs, outputs, gradients and the chain's temporaries."""
    e = torch.empty((), dtype=dtype).element_size()
    act = s.tokens * max(s.d_in, s.d_out)
    # x, dX, dY, y, plus the unfused chain's base / lora / scaled / sum / dropout tensors and autograd copies
    return e * (14 * act + s.d_in * s.d_out + 2 * s.rank * (s.d_in + s.d_out)) + 4 * 4 * s.tokens * s.rank


class CpuContention:
    """Share of the machine's CPU time that other processes (and the hypervisor) took during the run.

    Linux only (None elsewhere): busy ticks of /proc/stat minus this process's own CPU time. A CPU
    benchmark that shared its cores is much noisier than one on an idle machine, so the JSON says so.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="utf-8") as f:
                fields = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        return busy, time.process_time(), time.perf_counter()

    def others_share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, mine, wall = (e - s for e, s in zip(end, self.start, strict=True))
        return max(0.0, busy - mine) / max(wall * (os.cpu_count() or 1), 1e-9)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---------------------------------------------------------------- the three variants


@dataclass
class Problem:
    x: Tensor  # [T, in], requires grad
    weight: Tensor  # [out, in], frozen
    bias: Tensor  # [out], requires grad
    lora_a: Tensor  # [r, in]
    lora_b: Tensor  # [out, r]
    grad_out: Tensor  # [T, out]


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


def variant_fns(p: Problem, dropout_p: float) -> dict[str, tuple[Callable[[], Tensor], list[Tensor]]]:
    """Each variant's forward and the tensors its backward differentiates."""
    dropout: nn.Module = nn.Identity() if dropout_p == 0.0 else nn.Dropout(dropout_p)

    def base() -> Tensor:
        return F.linear(p.x, p.weight, p.bias)

    def fused() -> Tensor:
        return lorafuse.lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, SCALE, dropout_p)

    def peft_chain() -> Tensor:
        result = F.linear(p.x, p.weight, p.bias)
        return result + F.linear(F.linear(dropout(p.x), p.lora_a), p.lora_b) * SCALE

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


def check_against_chain(p: Problem, dtype: torch.dtype, what: str) -> dict[str, float]:
    """max|lorafuse - chain| / max|chain| for the output and each gradient; aborts on a mismatch."""
    fns = variant_fns(p, 0.0)
    got: dict[str, list[Tensor]] = {}
    for name in LORA_VARIANTS:
        fn, inputs = fns[name]
        try:
            y = fn()
            got[name] = [y.detach(), *torch.autograd.grad(y, inputs, p.grad_out)]
        except RuntimeError as err:
            if is_oom(err) or name != "lorafuse":
                raise
            raise SystemExit(f"ABORT: lorafuse.lora_linear failed at {what}: {err}") from err
    errors: dict[str, float] = {}
    labels = ("out", "dx", "dbias", "dlora_a", "dlora_b")
    for label, a, b in zip(labels, got["lorafuse"], got["peft_chain"], strict=True):
        if a.shape != b.shape:
            raise SystemExit(
                f"ABORT at {what}: lorafuse's {label} has shape {tuple(a.shape)}, "
                f"the chain's {tuple(b.shape)}"
            )
        ref = b.double().abs().max().item()
        diff = (a.double() - b.double()).abs().max().item()
        errors[label] = diff / max(ref, 1e-30)
    bad = {k: v for k, v in errors.items() if not (v <= CHECK_TOL[dtype])}  # `not <=` also catches NaN
    if bad:
        raise SystemExit(
            f"ABORT at {what}: lorafuse.lora_linear does not match the PEFT chain "
            f"(relative max error, tolerance {CHECK_TOL[dtype]:g} for {dtype}): "
            + ", ".join(f"{k}={v:.3g}" for k, v in bad.items())
        )
    return errors


# ---------------------------------------------------------------- timing


class Timer:
    """Milliseconds per call of a step, run `iters` times back to back."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, step: Callable[[], None], iters: int) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        return (time.perf_counter() - t0) * 1e3 / iters


def warm_up(step: Callable[[], None], calls: int, min_ms: float) -> None:
    """At least `calls` calls and at least `min_ms` of them: idle cores and thread pools need time to wake."""
    t0, n = time.perf_counter(), 0
    while n < calls or (time.perf_counter() - t0) * 1e3 < min_ms:
        step()
        n += 1


def time_variants(
    steps: dict[str, Callable[[], None]], timer: Timer, args: argparse.Namespace
) -> tuple[dict[str, list[float]], int]:
    """Per-variant lists of ms per call (one per repeat), variants interleaved and rotated each repeat."""
    warmup, repeats, min_repeat_ms = args.warmup, args.repeats, args.min_repeat_ms
    for step in steps.values():
        warm_up(step, warmup, args.warmup_ms)
    if timer.device.type == "cuda":
        torch.cuda.synchronize(timer.device)
    # Size a repeat on the slowest variant, so every variant runs the same number of calls.
    slowest = max(timer(step, 1) for step in steps.values())
    iters = max(1, min(MAX_ITERS_PER_REPEAT, math.ceil(min_repeat_ms / max(slowest, 1e-6))))
    names = list(steps)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(timer(steps[name], iters))
    return samples, iters


def measure_shape(
    s: Shape, dtype: torch.dtype, device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    """Check lorafuse against the chain once, then time the three variants forward and forward + backward."""
    p = make_problem(s, dtype, device)
    check = check_against_chain(p, dtype, f"{s.label()} {dtype}")
    fns = variant_fns(p, args.dropout)
    timer = Timer(device)
    results: dict[str, dict[str, list[float]]] = {}
    iters: dict[str, int] = {}
    for mode in ("forward", "fwd_bwd"):
        if mode == "forward":
            steps = {n: forward_step(fn) for n, (fn, _) in fns.items()}
        else:
            steps = {n: fwd_bwd_step(fn, inputs, p.grad_out) for n, (fn, inputs) in fns.items()}
        results[mode], iters[mode] = time_variants(steps, timer, args)
    med = {m: {n: statistics.median(v) for n, v in r.items()} for m, r in results.items()}
    return {
        "status": "ok",
        "check_rel_err": check,
        "iters_per_repeat": iters,
        "median_ms": med,
        "ratio": {m: {n: med[m][n] / med[m]["base"] for n in LORA_VARIANTS} for m in med},
        "samples_ms": {m: {n: [round(t, 5) for t in v] for n, v in r.items()} for m, r in results.items()},
    }


def bench_shape(
    s: Shape, dtype: torch.dtype, device: torch.device, args: argparse.Namespace
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
        row.update(measure_shape(s, dtype, device, args))
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not is_oom(err):
            raise
        row.update(status="skipped", reason="out of memory")
    row["cpu_share_others"] = contention.others_share()
    return row


# ---------------------------------------------------------------- output


def print_header() -> None:
    print(
        f"{'T':>7} {'in':>5} {'out':>5} {'r':>3} | {'fwd base':>9} {'lorafuse':>15} {'peft chain':>15} |"
        f" {'f+b base':>9} {'lorafuse':>15} {'peft chain':>15}"
    )
    print("-" * 113)


def print_row(row: dict[str, Any]) -> None:
    head = f"{row['tokens']:>7} {row['d_in']:>5} {row['d_out']:>5} {row['rank']:>3} |"
    if row["status"] != "ok":
        print(f"{head} skipped: {row['reason']}")
        return
    cells = []
    for mode in ("forward", "fwd_bwd"):
        m, r = row["median_ms"][mode], row["ratio"][mode]
        cells.append(
            f" {m['base']:>7.3f}ms {m['lorafuse']:>7.3f} ({r['lorafuse']:4.2f}x)"
            f" {m['peft_chain']:>7.3f} ({r['peft_chain']:4.2f}x)"
        )
    others = row.get("cpu_share_others")
    busy = f"  * others took {others:.0%} CPU" if others is not None and others > 0.10 else ""
    print(head + " |".join(cells) + busy, flush=True)


def write_plot(path: Path, report: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot written")
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
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
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
    if lorafuse is None:
        raise SystemExit(
            f"cannot import lorafuse ({_LORAFUSE_IMPORT_ERROR}): install it (scripts/demo.sh builds it) or put "
            "its built package on PYTHONPATH"
        )
    cuda_ok = torch.cuda.is_available() and lorafuse.has_cuda_kernels()
    kind = args.device or ("cuda" if cuda_ok else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if kind == "cuda" and not lorafuse.has_cuda_kernels():
        raise SystemExit(
            "--device cuda: this lorafuse build has no CUDA kernels (built with LORAFUSE_CUDA=0?)"
        )
    device = torch.device(kind)
    dtype = DTYPES[args.dtype or ("bf16" if kind == "cuda" else "fp32")]
    grid = (QUICK_GRID if args.quick else DEFAULT_GRID)[kind]
    tokens = args.tokens or grid["tokens"]
    dims = parse_dims(args.dims or grid["dims"])
    ranks = args.ranks or grid["ranks"]
    args.repeats = args.repeats or (3 if args.quick else DEFAULT_REPEATS[kind])
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else DEFAULT_WARMUP[kind])
    args.min_repeat_ms = args.min_repeat_ms if args.min_repeat_ms is not None else MIN_REPEAT_MS[kind]
    args.warmup_ms = args.warmup_ms if args.warmup_ms is not None else WARMUP_MS[kind]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if min(tokens) < 1 or min(ranks) < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("tokens, ranks and repeats must be >= 1, warmup >= 0")

    now = dt.datetime.now(dt.timezone.utc)
    name = device_name(device)
    commit = git_commit()
    if args.out is None:
        stem = f"{now:%Y%m%dT%H%M%SZ}_{slug(name)}_{commit[:7] if commit != 'unknown' else 'unknown'}"
        args.out = REPO_ROOT / "bench" / "results" / f"{stem}.json"
    plot_path = None if args.no_plot else (args.plot or args.out.with_suffix(".png"))

    report: dict[str, Any] = {
        "benchmark": "lora_linear",
        "device": name,
        "device_type": kind,
        "cpu_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "lorafuse_version": lorafuse.__version__,
        "lorafuse_has_cuda_kernels": lorafuse.has_cuda_kernels(),
        "git_commit": commit,
        "date": now.isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
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
        "check": f"lorafuse vs peft_chain at dropout 0: max|diff|/max|chain|, tolerance {CHECK_TOL[dtype]:g}",
        "results": [],
    }
    if kind == "cuda":
        report["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32

    print(
        f"lora_linear benchmark: {name}, {report['dtype']}, torch {torch.__version__}, "
        f"lorafuse {lorafuse.__version__} @ {commit}"
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
    if others is not None and others > 0.05:
        print(
            f"\nnote: other processes took {others:.0%} of the machine's CPU time during this run; "
            "CPU timings are noisier than on an idle machine"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    if plot_path is not None and write_plot(plot_path, report):
        print(f"wrote {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
