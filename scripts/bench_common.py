"""Pieces shared by lorafuse's benchmark scripts (bench.py, bench_lora_linear.py).

- environment facts for the report: device name, git commit (and which tracked files differ from it),
  torch / CUDA / lorafuse versions, load average, CPU time taken by other processes;
- timing: warm-up, variants interleaved within each repeat (rotated from repeat to repeat), medians;
  CUDA events on a GPU, time.perf_counter on the CPU;
- output: result file names (``<UTC timestamp>_<device slug>_<commit7>``), JSON, matplotlib (Agg).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "bench" / "results"
MAX_ITERS_PER_REPEAT = 1000

# --dtype accepts the short and the long names
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def import_lorafuse():
    """The lorafuse package, or SystemExit saying how to get one (so that --help works without it)."""
    try:
        import lorafuse
    except ImportError as err:
        raise SystemExit(
            f"cannot import lorafuse ({err}): install it (scripts/demo.sh builds it) or put its built "
            "package on PYTHONPATH (PYTHONPATH=python in a built checkout)"
        ) from err
    return lorafuse


def resolve_device(choice: str | None) -> torch.device:
    """'cpu', 'cuda' or 'auto'/None (cuda when torch sees a GPU and lorafuse has CUDA kernels).

    Asking for CUDA where there is none is a clean SystemExit, never a crash inside a kernel.
    """
    lorafuse = import_lorafuse()
    cuda_ok = torch.cuda.is_available() and lorafuse.has_cuda_kernels()
    if choice in (None, "auto"):
        kind = "cuda" if cuda_ok else "cpu"
    else:
        kind = choice
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if kind == "cuda" and not lorafuse.has_cuda_kernels():
        raise SystemExit(
            "--device cuda: this lorafuse build has no CUDA kernels (built with LORAFUSE_CUDA=0?)"
        )
    return torch.device(kind)


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


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout


def git_commit() -> str:
    """HEAD's hash, with '-dirty' when tracked files differ from it; 'unknown' outside git."""
    try:
        head = _git("rev-parse", "HEAD").strip()
        status = _git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if status else "")


def git_dirty_files() -> list[str]:
    """Tracked files that differ from HEAD (what '-dirty' in the commit means); [] outside git."""
    try:
        status = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line[3:] for line in status.splitlines() if line.strip()]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "device"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


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


def run_metadata(device: torch.device, dtype: torch.dtype, now: dt.datetime) -> dict[str, Any]:
    """What every report says about where and with what it ran."""
    lorafuse = import_lorafuse()
    meta: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "lorafuse_version": lorafuse.__version__,
        "lorafuse_has_cuda_kernels": lorafuse.has_cuda_kernels(),
        "lorafuse_path": str(Path(lorafuse.__file__).resolve().parent),
        "git_commit": git_commit(),
        "git_dirty_files": git_dirty_files(),
        "date": now.isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "load_average_start": load_average(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        meta["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return meta


# ---------------------------------------------------------------- timing


@dataclass
class TimingOptions:
    """How variants are timed (the attribute names match bench_lora_linear's command-line options)."""

    repeats: int  # timed repeats per variant; the median is reported
    warmup: int  # at least this many untimed calls per variant first ...
    warmup_ms: float  # ... lasting at least this long (idle cores and thread pools need time to wake)
    min_repeat_ms: float  # one repeat loops the step until it has lasted at least this long


class Timer:
    """Milliseconds per call of a step, run `iters` times back to back (CUDA events on a GPU)."""

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
    steps: dict[str, Callable[[], None]], timer: Timer, opts: Any
) -> tuple[dict[str, list[float]], int]:
    """Per-variant lists of ms per call (one per repeat), variants interleaved and rotated each repeat.

    `opts` has the TimingOptions attributes. Every variant runs the same number of calls per repeat,
    sized on the slowest so that a repeat lasts at least opts.min_repeat_ms.
    """
    for step in steps.values():
        warm_up(step, opts.warmup, opts.warmup_ms)
    if timer.device.type == "cuda":
        torch.cuda.synchronize(timer.device)
    slowest = max(timer(step, 1) for step in steps.values())
    iters = max(1, min(MAX_ITERS_PER_REPEAT, math.ceil(opts.min_repeat_ms / max(slowest, 1e-6))))
    names = list(steps)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(opts.repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(timer(steps[name], iters))
    return samples, iters


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {n: statistics.median(v) for n, v in samples.items()}


def rounded(samples: dict[str, list[float]], digits: int = 5) -> dict[str, list[float]]:
    return {n: [round(t, digits) for t in v] for n, v in samples.items()}


# ---------------------------------------------------------------- output


def result_stem(now: dt.datetime, device: str, commit: str) -> str:
    """``<UTC timestamp>_<device slug>_<commit7>``: the name of a run's files in bench/results/."""
    short = commit[:7] if commit != "unknown" else "unknown"
    return f"{now.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}_{slug(device)}_{short}"


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot written")
        return None
    return plt
