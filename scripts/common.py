"""What the scripts share: the benchmark (bench.py with bench_layer.py and bench_model.py), the demo (demo.py
with demo_lib.py) and the quality comparison (quality.py).

- lorafuse: the installed package, or the one built into python/ of this checkout;
- device and threads: --device (cpu, cuda, auto) checked against torch and lorafuse, --threads;
- environment facts for reports: device name, git commit (and which tracked files differ from it), torch /
  CUDA / lorafuse versions, load average, CPU time taken by other processes, free memory;
- memory: peak memory of a phase (CUDA allocator statistics, or the process's resident set on the CPU);
- timing: warm-up, variants interleaved within each repeat (rotated from repeat to repeat), medians; CUDA
  events on a GPU, time.perf_counter on the CPU;
- output: result file names (``<UTC timestamp>_<device slug>_<commit7>``), JSON, matplotlib (Agg), plot
  titles, paths and sizes in messages; command-line argument types.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
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
    """The lorafuse package: the installed one, else the one built into python/ of this checkout; when
    neither imports, SystemExit saying how to get one (so that --help works without it)."""
    try:
        import lorafuse
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT / "python"))
        try:
            import lorafuse
        except ImportError as err:
            raise SystemExit(
                f"cannot import lorafuse ({err}): install it (scripts/demo.sh builds it) or put its built "
                "package on PYTHONPATH (PYTHONPATH=python in a built checkout)"
            ) from err
    return lorafuse


# ---------------------------------------------------------------- device and threads


def default_device() -> str:
    """'cuda' when torch sees a GPU and lorafuse has its CUDA kernels, else 'cpu'."""
    cuda_ok = torch.cuda.is_available() and import_lorafuse().has_cuda_kernels()
    return "cuda" if cuda_ok else "cpu"


def resolve_device(name: str | None) -> torch.device:
    """A torch.device for --device: None or 'auto' is :func:`default_device`; else a device name on which
    lorafuse has kernels, or SystemExit with the reason it cannot be used (never a crash in a kernel)."""
    name = default_device() if name in (None, "auto") else name
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"--device {name!r}: not a device name ({e}); use cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: torch sees no CUDA device on this machine; use --device cpu")
        if not import_lorafuse().has_cuda_kernels():
            raise SystemExit(
                f"--device {name}: this build of lorafuse has no CUDA kernels (built with LORAFUSE_CUDA=0 or "
                "without nvcc); rebuild with the CUDA toolkit, or use --device cpu"
            )
    elif device.type != "cpu":
        raise SystemExit(f"--device {name}: lorafuse has kernels for cpu and cuda only")
    return device


def set_threads(device: torch.device, threads: int | None, cpu_default: int | None = 1) -> None:
    """torch's CPU threads: ``threads`` if given, else ``cpu_default`` on the CPU (None: torch's choice).
    The demo's model is so small that a second thread gains little on an idle machine, while on a busy one
    (CI runners, shared machines) threads that wait for each other at every operation make training several
    times slower: its default is 1."""
    if threads:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and cpu_default:
        torch.set_num_threads(cpu_default)


# ---------------------------------------------------------------- environment facts


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU model with the number of threads torch uses."""
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
    model = model or platform.processor() or "CPU"
    threads = torch.get_num_threads()
    return f"{model}, {threads} thread{'s' if threads != 1 else ''}"


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
    ).stdout


def git_commit() -> str:
    """HEAD's hash, with '-dirty' when tracked files differ from it; 'unknown' outside git. Its first 7
    characters name result files."""
    try:
        head = _git("rev-parse", "HEAD").strip()
        status = _git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if status else "")


def git_dirty_files() -> list[str]:
    """Tracked files that differ from HEAD (what '-dirty' in the commit means); [] outside git."""
    try:
        status = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
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
    """What every benchmark report says about where and with what it ran."""
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


# ---------------------------------------------------------------- memory

_RSS_PEAK_RESET = False  # whether the CPU's peak RSS has been reset (Linux /proc/self/clear_refs)


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak-memory measurement. CUDA: torch's allocator statistics. CPU (Linux): resets the
    process's resident-set high-water mark (VmHWM) to its current size (writing 5 to /proc/self/clear_refs);
    where that is impossible the peak counts from the process's start."""
    global _RSS_PEAK_RESET
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        _RSS_PEAK_RESET = True
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """The peak since :func:`reset_peak_memory`: CUDA, the most memory torch's allocator held for tensors
    (torch.cuda.max_memory_allocated); CPU, the process's peak resident set size (VmHWM), which
    includes Python and torch's libraries. See :func:`peak_memory_meaning`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def cuda_step_memory(step: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Peak allocated CUDA memory during one call of ``step``, and its own share: the peak minus what was
    allocated before it (other models and tensors may stay resident)."""
    reset_peak_memory(device)
    before = torch.cuda.memory_allocated(device)
    step()
    peak = peak_memory_bytes(device)
    return {
        "max_memory_allocated_mib": round(peak / 2**20, 1),
        "allocated_before_step_mib": round(before / 2**20, 1),
        "step_peak_over_before_mib": round((peak - before) / 2**20, 1),
    }


def peak_rss_bytes() -> int:
    """The process's peak resident set size: Linux's VmHWM, which reset_peak_memory resets (ru_maxrss is not
    reset, and keeps the peak of importing torch and transformers); else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def tensor_bytes(model) -> int:
    """Bytes of a model's parameters and buffers (each tensor once, tied weights too): its resident weights."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def current_rss_bytes() -> int:
    """The process's resident set size now (Linux /proc; else the peak)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_memory_meaning(device: torch.device, span: str = "the phase") -> str:
    """What :func:`peak_memory_bytes` measured over ``span`` (reset by :func:`reset_peak_memory` when it
    started), in words."""
    if device.type == "cuda":
        return (
            f"the most memory torch's CUDA allocator held during {span} (torch.cuda.max_memory_allocated "
            "after reset_peak_memory_stats): weights, gradients, optimizer state, activations"
        )
    if _RSS_PEAK_RESET:
        return (
            f"the process's peak resident set size during {span} (getrusage ru_maxrss, its high-water mark "
            f"reset when {span} started, through /proc/self/clear_refs): Python, torch's libraries, data, "
            "model, gradients, optimizer state, activations"
        )
    return (
        "the process's peak resident set size since it started (getrusage ru_maxrss; it cannot be reset "
        "here, so it never goes down): Python, torch's libraries, data, model, gradients, optimizer state, "
        "activations"
    )


# ---------------------------------------------------------------- timing


@dataclass
class TimingOptions:
    """How variants are timed (the attribute names match scripts/bench.py's command-line options)."""

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
    steps: dict[str, Callable[[], None]], timer: Timer, opts: TimingOptions
) -> tuple[dict[str, list[float]], int]:
    """Per-variant lists of ms per call (one per repeat), variants interleaved and rotated each repeat.

    Every variant runs the same number of calls per repeat, sized on the slowest so that a repeat lasts at
    least opts.min_repeat_ms.
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
    return f"{now.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}_{slug(device)}_{commit[:7]}"


def write_json(path: str | Path, data: Any, indent: int = 1) -> None:
    """``data`` as JSON in a new file at ``path`` (folders created), ending with a newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n", encoding="utf-8")


def pyplot(required: bool = False):
    """matplotlib.pyplot with the Agg backend. When matplotlib is missing: None, with a note, or the
    ImportError when the caller cannot do without it (``required``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if required:
            raise
        print("matplotlib is not importable: no plot written")
        return None
    return plt


def plot_title(what: str, report: dict[str, Any]) -> str:
    """Two title lines of a benchmark plot: what, dtype and device; versions, commit, date and load."""
    load = report.get("load_average_start")
    return (
        f"{what}, {report['dtype']}, on {report['device']}\n"
        f"torch {report['torch_version']}, lorafuse {report['lorafuse_version']} "
        f"@ {report['git_commit'][:12]}, "
        f"{report['date'][:10]}" + (f", load average {load[0]:g} at start" if load else "")
    )


def grouped_bars(
    ax, series: dict[str, list[float]], ticks: list[str], colors: dict[str, str], labels=None, legend=True
):
    """Bars on a matplotlib axis, one group per tick, one bar per series side by side in each, and a
    horizontal grid; ``labels`` names the series in the legend (if ``legend``). Returns {series: its bars}."""
    width = 0.8 / len(series)
    bars = {}
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(ticks))]
        label = (labels or {}).get(name, name)
        bars[name] = ax.bar(xs, values, width, label=label, color=colors[name])
    ax.set_xticks(range(len(ticks)))
    ax.set_xticklabels(ticks, fontsize=8 if len(ticks) < 10 else 7)
    ax.grid(True, axis="y", alpha=0.3)
    if legend:
        ax.legend(fontsize=8, ncol=len(series))
    return bars


def built_program(name: str) -> str | None:
    """The C++ example `name` built beside the tests (LORAFUSE_BUILD_DIR/bin, as scripts/env.sh sets it, else the
    default build folders), or None when it is not built."""
    for root in (os.environ.get("LORAFUSE_BUILD_DIR"), "build/cmake", "build"):
        if not root:
            continue
        path = Path(root) if os.path.isabs(root) else REPO_ROOT / root
        if os.access(path / "bin" / name, os.X_OK):
            return str(path / "bin" / name)
    return None


def show_path(path: str | Path) -> str:
    """``path`` relative to the current folder when it is inside it, else absolute."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


# ---------------------------------------------------------------- work in a process of its own

RESULT_PREFIX = "RESULT "


class WorkerFailed(Exception):
    """A process started by :func:`run_worker` failed, ran out of time or printed no result."""


def print_result(result: Any) -> None:
    """In a worker process: hands ``result`` (JSON) to :func:`run_worker` through stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(
    script: str | Path, option: str, spec: Any, timeout: float | None = None, quiet: bool = False
) -> Any:
    """Runs ``python script option JSON(spec)`` in a fresh process (one whose peak memory is its own, say)
    and returns what it gave :func:`print_result`. Its stderr goes to ours (progress bars) unless ``quiet``.
    WorkerFailed when it fails, runs out of time or prints no result."""
    cmd = [sys.executable, str(script), option, json.dumps(spec)]
    stderr = subprocess.PIPE if quiet else None
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise WorkerFailed(f"timed out after {timeout:g} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = f": {proc.stderr.strip()[-500:]}" if quiet else ""
        raise WorkerFailed(f"exit status {proc.returncode}{tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


# ---------------------------------------------------------------- command-line argument types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, found {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, found {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, found {text}")
    return value
