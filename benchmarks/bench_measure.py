"""Timing and peak-memory measurement.

Timing: `compare` runs several callables in interleaved rounds (A B C, then C B A, ...) and keeps each one's
minimum, so that a burst of load from other processes hits every contender alike and the minimum approximates
the unloaded time. On CUDA every call is bracketed by `torch.cuda.synchronize()`.

Peak memory, CPU: the process's peak resident set size during the call minus its RSS just before it. The
kernel's high-water mark (VmHWM in /proc/self/status) is reset before the call by writing "5" to
/proc/self/clear_refs (Linux >= 4.0), after `malloc_trim(0)` has returned freed heap to the kernel, so the
number is the extra memory the call really touched (tensors allocated by torch's CPU allocator included, which
tracemalloc cannot see). Where that is not possible it falls back to the growth of `resource`'s ru_maxrss,
which only shows new process-wide peaks. CUDA: `torch.cuda.max_memory_allocated()` after
`reset_peak_memory_stats()`, minus the memory allocated before the call.
"""
from __future__ import annotations

import ctypes
import os
import re
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Stat:
    name: str
    samples: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    result: Any = None

    @property
    def best(self) -> float:
        return min(self.samples)


class Meter:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else (
            "peak RSS over RSS before (VmHWM reset via /proc/self/clear_refs)" if _reset_hwm() and _status_mb("VmHWM")
            else "resource ru_maxrss growth (process-wide peak; 0 unless a new peak)")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def run(self, fn: Callable[[], Any], memory: bool = False) -> tuple[float, float | None, Any]:
        """(seconds, peak MB or None, result) of one call."""
        before = None
        if memory:
            if self.cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
            else:
                lib = _libc()
                if lib:
                    lib.malloc_trim(0)
                if self.method.startswith("peak RSS"):
                    _reset_hwm()
                    before = _status_mb("VmRSS")
                else:
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.sync()
        t = time.perf_counter()
        out = fn()
        self.sync()
        dt = time.perf_counter() - t
        peak = None
        if memory:
            if self.cuda:
                peak = (torch.cuda.max_memory_allocated(self.device) - before) / 2**20
            elif self.method.startswith("peak RSS"):
                peak = _status_mb("VmHWM") - before
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
        return dt, peak, out

    def compare(self, fns: dict[str, Callable[[], Any]], reps: int = 3, warmup: bool = True,
                memory: bool = True) -> dict[str, Stat]:
        """Interleaved rounds; peak memory is taken on the warm-up call (or the first round without warm-up).
        The last result of each callable is kept in Stat.result."""
        stats = {name: Stat(name) for name in fns}
        names = list(fns)
        if warmup:
            for name in names:
                _, stats[name].peak_mb, stats[name].result = self.run(fns[name], memory=memory)
        for r in range(reps):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                mem = memory and not warmup and r == 0
                dt, peak, out = self.run(fns[name], memory=mem)
                stats[name].samples.append(dt)
                stats[name].result = out
                if mem:
                    stats[name].peak_mb = peak
        return stats


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    info = dict(nproc=os.cpu_count(), cpu_model=cpu, torch_threads=torch.get_num_threads(), torch=torch.__version__,
                mem_total_gb=None, loadavg_start=os.getloadavg())
    total = None
    try:
        with open("/proc/meminfo") as f:
            total = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) / 2**20
    except (OSError, AttributeError):
        pass
    info["mem_total_gb"] = round(total, 1) if total else None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
