#!/usr/bin/env python3
"""A quick look at lorafuse.lora_linear: accuracy of the output and gradients, and a few timings.

    y = x·Wᵀ + b + scale·(dropout(x)·Aᵀ)·Bᵀ

For each device (CPU; CUDA too when torch sees a GPU and this build has CUDA kernels), each dtype
(float32 and bfloat16; float16 too on CUDA) and a couple of shapes, the demo runs the op forward and
backward and prints the max abs error of the output and of every gradient (x, bias, lora_a, lora_b)
against a float64 reference, next to the error PyTorch itself makes in the same dtype with the
unfused chain. The tolerance follows the project's rule: err(lorafuse) <= 2 x err(PyTorch, same
dtype) + a small atol scaled by the reference's size. It also checks that dropout is reproducible
from torch.manual_seed, and times the frozen base linear, lorafuse and the unfused chain (forward +
backward, median of a few repeats). The exit status is 1 when any check fails.

Writes no files. Takes well under a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # --help works without a built lorafuse; main() says how to get one
    import lorafuse
except ImportError as _err:
    lorafuse = None
    _LORAFUSE_IMPORT_ERROR: ImportError | None = _err
else:
    _LORAFUSE_IMPORT_ERROR = None

SCALE = 2.0
NAMES = ("out", "grad x", "grad bias", "grad lora_a", "grad lora_b")
# atol, relative to max(1, max |reference|), added to 2 x PyTorch's own error
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    batch: tuple[int, ...]  # leading dims of x
    d_in: int
    d_out: int
    rank: int
    bias: bool

    def label(self) -> str:
        return (
            f"x {list(self.batch) + [self.d_in]}, W [{self.d_out}, {self.d_in}], r={self.rank}, "
            f"{'bias' if self.bias else 'no bias'}"
        )


CASES = (Case((2, 8), 64, 48, 8, True), Case((256,), 512, 384, 16, False))
TIMING_SHAPE = {"cpu": (512, 512, 16), "cuda": (4096, 4096, 16)}  # tokens, d (in = out), r


def chain(x: Tensor, w: Tensor, b: Tensor | None, a: Tensor, bm: Tensor, scale: float) -> Tensor:
    """The unfused chain PEFT runs (dropout off): base + lora_B(lora_A(x)) * scale."""
    return F.linear(x, w, b) + F.linear(F.linear(x, a), bm) * scale


def forward_backward(
    fn: Callable[..., Tensor], tensors: dict[str, Tensor | None], grad_out: Tensor
) -> list[Tensor | None]:
    """Output and gradients of x, bias, lora_a, lora_b (None for a missing bias)."""
    y = fn(tensors["x"], tensors["w"], tensors["b"], tensors["a"], tensors["bm"], SCALE)
    wrt = [tensors[k] for k in ("x", "b", "a", "bm")]
    present = [t for t in wrt if t is not None]
    grads = iter(torch.autograd.grad(y, present, grad_out))
    return [y.detach()] + [next(grads) if t is not None else None for t in wrt]


def make_inputs(case: Case, seed: int) -> tuple[dict[str, Tensor | None], Tensor]:
    """float64 CPU masters, sized so the base output and the LoRA term are both O(1)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*size: int, std: float) -> Tensor:
        return torch.randn(*size, generator=g, dtype=torch.float64) * std

    master: dict[str, Tensor | None] = {
        "x": randn(*case.batch, case.d_in, std=1.0),
        "w": randn(case.d_out, case.d_in, std=case.d_in**-0.5),
        "b": randn(case.d_out, std=1.0) if case.bias else None,
        "a": randn(case.rank, case.d_in, std=case.d_in**-0.5),
        "bm": randn(case.d_out, case.rank, std=case.rank**-0.5),
    }
    return master, randn(*case.batch, case.d_out, std=1.0)


def cast(master: dict[str, Tensor | None], dtype: torch.dtype, device: str) -> dict[str, Tensor | None]:
    out: dict[str, Tensor | None] = {}
    for k, t in master.items():
        out[k] = None if t is None else t.to(device, dtype).requires_grad_(k != "w")
    return out


def max_err(got: Tensor, ref: Tensor) -> float:
    return (got.detach().double().cpu() - ref).abs().max().item()


def check_accuracy(device: str, dtype: torch.dtype, case: Case) -> bool:
    master, gy = make_inputs(case, seed=1 + CASES.index(case))
    ref = forward_backward(chain, cast(master, torch.float64, "cpu"), gy)
    ours = forward_backward(lorafuse.lora_linear, cast(master, dtype, device), gy.to(device, dtype))
    theirs = forward_backward(chain, cast(master, dtype, device), gy.to(device, dtype))
    print(f"  {case.label()}")
    ok = True
    for name, r, o, t in zip(NAMES, ref, ours, theirs, strict=True):
        if r is None:
            continue
        e_ours, e_torch = max_err(o, r), max_err(t, r)
        tol = 2 * e_torch + ATOL[dtype] * max(1.0, r.abs().max().item())
        good = e_ours <= tol  # NaN fails
        ok &= good
        print(
            f"    {name:<12} lorafuse {e_ours:9.2e}   torch {e_torch:9.2e}   tol {tol:9.2e}   "
            f"{'ok' if good else 'FAIL'}"
        )
    return ok


def check_dropout(device: str, dtype: torch.dtype) -> bool:
    """Same seed, same mask (forward and gradients); dropout changes the result."""
    master, gy = make_inputs(CASES[0], seed=7)
    t = cast(master, dtype, device)
    gy = gy.to(device, dtype)

    def run(p: float) -> list[Tensor | None]:
        torch.manual_seed(1234)

        def op(x: Tensor, w: Tensor, b: Tensor | None, a: Tensor, bm: Tensor, s: float) -> Tensor:
            return lorafuse.lora_linear(x, w, b, a, bm, s, dropout_p=p)

        return forward_backward(op, t, gy)

    first, second, plain = run(0.25), run(0.25), run(0.0)
    same = all(torch.equal(a, b) for a, b in zip(first, second, strict=True) if a is not None)
    differs = not torch.equal(first[0], plain[0])
    good = same and differs
    print(
        f"  dropout p=0.25: same seed gives identical output and grads: {same}; "
        f"differs from p=0: {differs}   {'ok' if good else 'FAIL'}"
    )
    return good


def median_ms(step: Callable[[], None], device: str, repeats: int = 5, warmup_ms: float = 200.0) -> float:
    # Warm up by time, not by count: an idle second core takes a while to stop stalling every call.
    t0 = time.perf_counter()
    step()
    while (time.perf_counter() - t0) * 1e3 < warmup_ms:
        step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes have used so far (Linux /proc/stat); None where unknown."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (
                int(v) for v in f.readline().split()[1:9]
            )
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def show_timings(device: str, dtype: torch.dtype) -> None:
    tokens, d, r = TIMING_SHAPE[device]
    master, gy = make_inputs(Case((tokens,), d, d, r, True), seed=3)
    t = cast(master, dtype, device)
    gy = gy.to(device, dtype)
    x, w, b, a, bm = t["x"], t["w"], t["b"], t["a"], t["bm"]
    variants: dict[str, tuple[Callable[[], Tensor], list[Tensor]]] = {
        "base": (lambda: F.linear(x, w, b), [x, b]),
        "lorafuse": (lambda: lorafuse.lora_linear(x, w, b, a, bm, SCALE), [x, b, a, bm]),
        "unfused": (lambda: chain(x, w, b, a, bm, SCALE), [x, b, a, bm]),
    }
    ms = {}
    busy0, mine0, wall0 = machine_busy_seconds(), time.process_time(), time.perf_counter()
    for name, (fn, inputs) in variants.items():
        ms[name] = median_ms(lambda fn=fn, inputs=inputs: torch.autograd.grad(fn(), inputs, gy), device)
    busy1 = machine_busy_seconds()
    if busy0 is not None and busy1 is not None:
        others = (busy1 - busy0 - (time.process_time() - mine0)) / (
            (time.perf_counter() - wall0) * (os.cpu_count() or 1)
        )
        if device == "cpu" and others > 0.10:
            print(f"  (other processes took {others:.0%} of the CPU meanwhile: these timings are unreliable)")
    print(
        f"  fwd+bwd, T={tokens} d={d} r={r}: base {ms['base']:.3f} ms | lorafuse {ms['lorafuse']:.3f} ms "
        f"({ms['lorafuse'] / ms['base']:.2f}x) | unfused chain {ms['unfused']:.3f} ms "
        f"({ms['unfused'] / ms['base']:.2f}x)   (median of 5)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-timing", action="store_true", help="only the accuracy checks")
    ap.add_argument("--cpu-only", action="store_true", help="skip CUDA even when it is usable")
    args = ap.parse_args(argv)
    if lorafuse is None:
        raise SystemExit(
            f"cannot import lorafuse ({_LORAFUSE_IMPORT_ERROR}): install it (scripts/demo.sh builds it) or put "
            "its built package on PYTHONPATH"
        )

    cuda = torch.cuda.is_available() and lorafuse.has_cuda_kernels() and not args.cpu_only
    print(
        f"lorafuse {lorafuse.__version__} (CUDA kernels: {'yes' if lorafuse.has_cuda_kernels() else 'no'}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    print(
        f"y = x·Wᵀ + b + {SCALE}·(x·Aᵀ)·Bᵀ; errors are max |· - float64 reference|; "
        "tol = 2 x torch's error + atol·max(1, max|ref|)"
    )
    if not cuda:
        why = (
            "--cpu-only"
            if args.cpu_only
            else ("this build has no CUDA kernels" if torch.cuda.is_available() else "torch sees no GPU")
        )
        print(f"(CUDA skipped: {why})")
    plan = [("cpu", [torch.float32, torch.bfloat16])]
    if cuda:
        plan.append(("cuda", [torch.float32, torch.bfloat16, torch.float16]))

    ok = True
    for device, dtypes in plan:
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        for dtype in dtypes:
            print(f"\n== {device} ({name}) {SHORT[dtype]} ==")
            for case in CASES:
                ok &= check_accuracy(device, dtype, case)
            ok &= check_dropout(device, dtype)
            if not args.no_timing:
                show_timings(device, dtype)
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
