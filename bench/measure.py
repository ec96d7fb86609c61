"""Time and peak memory of one head step (forward + backward).

Peak memory is measured in a pass of its own, before the timed runs (it also serves as
the first warm-up), because the CPU's tracker costs Python time on every op. It counts
what the step allocates, at its peak, not the inputs and weights that existed before:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the step;
* CPU: :class:`margin_ext.memory.PeakMemory`, the peak of live tensor bytes, tracked
  through a TorchDispatchMode (CPU allocators keep no such counter).

The dispatch mode sees the tensors each op returns, not what an op allocates inside
its own implementation (the compiled extension's chunk buffers, for one). On the CPU
the same pass therefore also replays the allocator's events recorded by
``torch.profiler`` (``profile_memory=True``) into a second peak, ``allocator_peak_bytes``,
which does count them; for heads made of plain aten ops the two agree. It also records the
process's peak resident set size during the step (Linux: VmHWM, reset before the step
through /proc/self/clear_refs), the memory the machine actually had to give, inputs and
weights included.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from margin_ext.memory import PeakMemory

MEMORY_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the bytes allocated "
            "before the step (inputs and weights excluded)",
    "cpu": "peak live tensor bytes allocated during fwd+bwd, tracked via TorchDispatchMode "
           "(margin_ext.memory.PeakMemory; inputs and weights excluded)",
    "cpu_allocator": "peak of the CPU allocator's bytes during fwd+bwd, from torch.profiler memory events "
                     "(also counts buffers an op allocates inside its own implementation)",
    "cpu_rss": "peak resident set size of the process during fwd+bwd (VmHWM after resetting it), "
               "inputs and weights included",
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(step: Callable, device: torch.device) -> dict:
    """One step's loss and peak bytes (and, on the CPU, the allocator's view of them)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss = step()
        sync(device)
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device) - before), "loss": _float(loss)}
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    rss_before = reset_peak_rss()
    with _quiet_stderr(), profiler, PeakMemory() as tracker:
        loss = step()
    rss_peak = _proc_status_bytes("VmHWM") if rss_before is not None else None
    return {"peak_bytes": int(tracker.peak_bytes), "allocator_peak_bytes": _allocator_peak(profiler),
            "peak_rss_bytes": rss_peak, "rss_before_bytes": rss_before,
            "largest_tensor": list(tracker.largest_shape or ()), "loss": _float(loss)}


def _proc_status_bytes(field: str) -> Optional[int]:
    """A "kB" field of /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> Optional[int]:
    """Resets the process's peak RSS to its current RSS (Linux >= 4.0); returns that RSS, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_bytes("VmRSS")


def _float(loss) -> Optional[float]:
    return None if loss is None else float(loss)


def _allocator_peak(profiler) -> Optional[int]:
    """Peak of the running sum of the CPU allocator's (de)allocation sizes, in time order."""
    try:
        events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except (AttributeError, RuntimeError):  # a torch without these profiler internals
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs its start and stop to fd 2; keep them off the progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def time_step(step: Callable, device: torch.device) -> float:
    """Milliseconds of one step: CUDA events on the GPU, the wall clock on the CPU."""
    sync(device)
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop)
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def summarize(samples: list[float]) -> dict:
    """Median and spread (min, max, quartiles) of the timed runs."""
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "q1": q1, "q3": q3, "n": len(ordered)}


def loadavg() -> Optional[float]:
    """The 1-minute load average, None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def release(device: torch.device) -> None:
    """Give back what a finished or failed head left behind before the next one runs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def available_bytes(device: torch.device) -> int:
    """Memory a head may still take: free CUDA memory, or the kernel's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
