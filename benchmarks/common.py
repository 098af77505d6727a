"""What every benchmark shares: interleaved timing, peak memory, the environment header, Markdown tables.

Timing: the things being compared run round-robin in one process (``interleaved_timings``), after
warm-up calls, so load from other processes hits them alike; ratios are the median over rounds of
the per-round ratio. CUDA calls are timed with CUDA events after a synchronize.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` around the measured work. On the CPU, a
fresh interpreter per configuration (``python -m benchmarks.common MODULE:FUNCTION KWARGS_JSON``)
builds the work, runs it once to warm up, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``)
and reports how far the peak resident set (``VmHWM``) rose above the resident set before the
measured run. glibc's mmap threshold is fixed at 128 KiB there so freed tensors go back to the kernel and
the warm-up call cannot hide the second call's allocations inside the heap.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 ** 2
PRECISIONS = ("fp32", "bf16")
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


# ------------------------------------------------------------------------------------ timing
def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes; on CUDA, GPU time between events after a synchronize."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    start_time = time.perf_counter()
    fn()
    return time.perf_counter() - start_time


def interleaved_timings(calls: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
                        device: torch.device, min_seconds: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call for every entry of ``calls``, measured round-robin.

    Runs ``repeats`` rounds, and more while less than ``min_seconds`` were spent in timed rounds
    (short calls then get many rounds, which a noisy machine needs). Each round starts at a
    different entry so that none always runs first (caches, clock boost).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    round_index = 0
    while round_index < repeats or time.perf_counter() - started < min_seconds:
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(calls[name], device))
        round_index += 1
    return times


def paired_ratios(times: Sequence[float], reference: Sequence[float]) -> list[float]:
    """``times[i] / reference[i]`` for every round (both measured in the same round).

    Their median is the reported ratio: robust to rounds that another process slowed down.
    """
    if len(times) != len(reference) or not times:
        raise ValueError(f"paired timings need equal, non-zero lengths, got {len(times)} and {len(reference)}")
    return [t / r for t, r in zip(times, reference)]


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """(first, third) quartile, the spread reported beside a median (needs 2 values or more)."""
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return first, third


def autocast(device: torch.device, precision: str):
    """bf16 autocast on the benchmark's device, or nothing for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ memory
def cuda_peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak MiB allocated during one call above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MIB


def in_fresh_process(target: str, *, memory_probe: bool = False, **kwargs) -> dict:
    """``target(**kwargs)`` (a ``module:function`` returning a JSON-able dict) run in a new interpreter.

    Peak memory is a per-process mark, so each configuration gets a clean process; it inherits this
    process's torch thread count. ``memory_probe``
    fixes glibc's mmap threshold (see module doc); that makes every large allocation a page-faulting
    mmap, 1.5-2.5x slower here, so a process measuring CPU memory must not also measure time.
    """
    command, env = worker_command(target, kwargs, memory_probe=memory_probe)
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({shlex.join(command)}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def worker_command(target: str, kwargs: dict, *, memory_probe: bool = False) -> tuple[list[str], dict]:
    """(command, environment) of a new interpreter running ``target(**kwargs)`` (run it in ``REPO_ROOT``).

    The worker inherits this process's torch thread count; it prints ``target``'s JSON result as its last line.
    """
    command = [sys.executable, "-m", "benchmarks.common", target, json.dumps(kwargs)]
    env = {**os.environ, **(PROBE_ENV if memory_probe else {}), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return command, env


def cpu_peak_mib(build: str, **kwargs) -> float:
    """Peak RSS growth (MiB) of one call of ``build(**kwargs)()`` in a fresh interpreter (see module doc)."""
    return in_fresh_process("benchmarks.common:call_peak", memory_probe=True, build=build, kwargs=kwargs)["peak_mib"]


def call_peak(build: str, kwargs: dict) -> dict:
    """Worker of ``cpu_peak_mib``: build the call, warm up, measure the second call."""
    call = _resolve(build)(**kwargs)
    call()
    resident = reset_peak_rss()
    call()
    return {"peak_mib": max(0.0, peak_rss_mib() - resident)}


def reset_peak_rss() -> float:
    """Reset this process's peak-RSS mark (VmHWM) to the current RSS; returns that RSS in MiB."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """This process's peak resident set since start or the last ``reset_peak_rss`` (MiB)."""
    return _proc_status_kib("VmHWM") / 1024


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (CPU peak memory needs Linux)")


def _resolve(target: str):
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


# ------------------------------------------------------------------------------------ report
def environment(device: torch.device) -> list[str]:
    """Markdown bullet lines: command, date, machine, versions, thread count, load."""
    import open_clip
    import timm
    import torchvision
    lines = [
        f"- command: `{command_line()}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f})",
    ]
    if device.type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, "
                     f"{torch.cuda.get_device_properties(device).total_memory / 1024 ** 3:.0f} GiB)")
    else:
        lines.append("- GPU: none (CPU run)")
    lines.append(f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
                 f"torchvision {torchvision.__version__}, open_clip {open_clip.__version__}, timm {timm.__version__}, "
                 f"denserc commit {git_commit()}")
    return lines


def command_line() -> str:
    """How this benchmark was started, as a command to paste."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short HEAD commit, marked when the package or benchmark sources differ from it."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO_ROOT, check=False)
        return result.stdout.strip() if result.returncode == 0 else ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes in src/ or benchmarks/)"
                     if git("status", "--porcelain", "--", "src", "benchmarks") else "")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table; cells are ``str()``-ed, every row must have one cell per header."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [str(cell) for cell in row]
        if len(cells) != len(headers):
            raise ValueError(f"table row {cells} has {len(cells)} cells, expected {len(headers)} ({list(headers)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_common_arguments(parser) -> None:
    """``--device`` and ``--threads``, the same in every benchmark."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a shared machine, "
                             "where a busy core stalls every multi-threaded op")


def setup(args) -> torch.device:
    """Apply ``--threads`` (inherited by worker processes) and return the ``--device``."""
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:i]``, with a clear error when CUDA is asked for and absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda[:i], got {name!r}")
    return device


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m benchmarks.common MODULE:FUNCTION KWARGS_JSON (benchmark worker)")
    print(json.dumps(_resolve(sys.argv[1])(**json.loads(sys.argv[2]))))


def distillation_engine(raw: dict, env, output_dir):
    """The engine on the distillation task of the config ``raw`` (nested sections over the schema's defaults,
    validated as ``denserc train`` validates a file): what every benchmark of the training step runs."""
    from omegaconf import OmegaConf

    from denserc.engine.loop import Engine
    from denserc.train.config import Config, validate
    from denserc.train.trainer import DistillationTask
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), raw))
    validate(config)
    return Engine(DistillationTask(config, env), config, env, output_dir)
