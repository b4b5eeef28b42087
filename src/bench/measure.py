"""Timing and peak memory of one benchmark figure (src/bench/__init__.py)."""
from __future__ import annotations

import gc
import resource
import statistics
import sys
import time

import torch

from src.data.loading import TokenBlocks

def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory of one figure: CUDA max allocated, else peak RSS of this process."""

    def __init__(self, use_cuda: bool):
        self.use_cuda = use_cuda
        self.rss_resettable = False

    def reset(self) -> None:
        gc.collect()
        if self.use_cuda:
            torch.cuda.empty_cache()
            for index in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(index)
            return
        try:  # "5" resets VmHWM (the peak RSS) on Linux
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.rss_resettable = True
        except OSError:
            self.rss_resettable = False

    def peak_bytes(self) -> int:
        if self.use_cuda:
            return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
        if self.rss_resettable:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def kind(self) -> str:
        if self.use_cuda:
            return "cuda_max_allocated"
        return "rss_peak_per_figure" if self.rss_resettable else "rss_peak_process"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, warm_data, data, repeats: int = 1, clock: str = "wall") -> list[float]:
    """Seconds of each of ``repeats`` calls ``fn(data)``, after one untimed warm-up call
    ``fn(warm_data)``. ``clock``: wall time, or this process's CPU time (user + system: what a
    CPU run costs, unaffected by other processes waiting for the same cores)."""
    now = CLOCKS[clock]
    fn(warm_data)
    seconds = []
    for _ in range(repeats):
        synchronize()
        start = now()
        fn(data)
        synchronize()
        seconds.append(now() - start)
    return seconds


def repeat_summary(seconds: list[float]) -> dict:
    """A figure's time: the median of its timed repeats, their range, and ``spread`` =
    (slowest - fastest) / median (0 for a single repeat)."""
    middle = statistics.median(seconds)
    return {"seconds": middle, "seconds_min": min(seconds), "seconds_max": max(seconds),
            "spread": (max(seconds) - min(seconds)) / middle, "seconds_repeats": list(seconds)}


def random_blocks(n_blocks: int, length: int, vocab_size: int, seed: int) -> TokenBlocks:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n_blocks, length), generator=generator)
    return TokenBlocks(ids, torch.ones_like(ids))


def table(figures: dict) -> str:
    lines = [f"{'figure':<24}{'seconds':>11}{'spread':>8}{'tokens/s':>13}{'ratio':>8}  "
             f"{'vs':<17}{'peak MiB':>10}"]
    for name, f in figures.items():
        peak = f"{f['peak_memory_bytes'] / 2**20:.0f}" if f.get("peak_memory_bytes") else "-"
        if "error" in f:
            lines.append(f"{name:<24}{'ERROR':>11}  {f['error'][:50]}  {peak}")
            continue
        tps = f"{f['tokens_per_s']:.1f}" if f["tokens_per_s"] else "-"
        ratio = f"{f['ratio']:.3f}" if f["ratio"] is not None else "-"
        lines.append(f"{name:<24}{f['seconds']:>11.4f}{f['spread']:>8.1%}{tps:>13}{ratio:>8}  "
                     f"{f['ceiling'] or '':<17}{peak:>10}")
    return "\n".join(lines)
