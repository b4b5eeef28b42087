"""Timing and peak memory of the benchmark's figures (src/bench/__init__.py)."""
from __future__ import annotations

import gc
import resource
import statistics
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

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
        """Before a figure: free what earlier figures left cached, then start a new peak."""
        gc.collect()
        if self.use_cuda:
            torch.cuda.empty_cache()
        self.reset_peak()

    def reset_peak(self) -> None:
        """Start a new peak, keeping cached memory (between a figure's timed calls, which must
        not pay for allocating it again)."""
        if self.use_cuda:
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


@dataclass(frozen=True)
class Work:
    """What one figure times: ``run(data)``, warmed up once by an untimed ``run(warm_data)``;
    every call sits inside ``around()``, which is not timed (state the call needs, such as the
    reference's gradient buffers, and the figure's peak memory)."""
    run: Callable
    data: object = None
    warm_data: object = None
    around: Callable[[], AbstractContextManager] = nullcontext


def timed_rounds(works: list[Work], repeats: int = 1, clock: str = "wall") -> list[list[float]]:
    """Seconds of each work in each of ``repeats`` rounds, after one untimed warm-up call of
    each. A round runs the works one after another, so works timed together (a figure and its
    ceiling) meet the same load of a shared machine. ``clock``: wall time, or this process's CPU
    time (user + system: what a CPU run costs, unaffected by other processes waiting for the
    same cores)."""
    now = CLOCKS[clock]
    for work in works:
        with work.around():
            work.run(work.warm_data)
    seconds = [[] for _ in works]
    for _ in range(repeats):
        for work, its_seconds in zip(works, seconds):
            with work.around():
                synchronize()
                start = now()
                work.run(work.data)
                synchronize()
                its_seconds.append(now() - start)
    return seconds


def repeat_summary(seconds: list[float]) -> dict:
    """A figure's time: the median of its timed repeats, their range, and ``spread`` =
    (slowest - fastest) / median (0 for a single repeat)."""
    middle = statistics.median(seconds)
    return {"seconds": middle, "seconds_min": min(seconds), "seconds_max": max(seconds),
            "spread": (max(seconds) - min(seconds)) / middle, "seconds_repeats": list(seconds)}


def paired_ratio(tokens: int, seconds: list[float], ceiling_tokens: int,
                 ceiling_seconds: list[float]) -> dict:
    """Throughput against the ceiling timed in the same rounds: ``ratio`` = the median over
    rounds of (tokens / seconds) / (ceiling tokens / ceiling seconds), ``ratio_spread`` =
    (largest - smallest) / median of those ratios, ``cost_x_ceiling`` = 1 / ratio."""
    ratios = [(tokens / mine) / (ceiling_tokens / theirs)
              for mine, theirs in zip(seconds, ceiling_seconds)]
    middle = statistics.median(ratios)
    return {"ratio": middle, "ratio_spread": (max(ratios) - min(ratios)) / middle,
            "cost_x_ceiling": 1 / middle, "ceiling_seconds_repeats": list(ceiling_seconds)}


def random_blocks(n_blocks: int, length: int, vocab_size: int, seed: int) -> TokenBlocks:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n_blocks, length), generator=generator)
    return TokenBlocks(ids, torch.ones_like(ids))


def table(figures: dict) -> str:
    lines = [f"{'figure':<24}{'seconds':>11}{'spread':>8}{'tokens/s':>13}{'ratio':>8}"
             f"{'spread':>8}  {'vs':<17}{'peak MiB':>10}"]
    for name, f in figures.items():
        peak = f"{f['peak_memory_bytes'] / 2**20:.0f}" if f.get("peak_memory_bytes") else "-"
        if "error" in f:
            lines.append(f"{name:<24}{'ERROR':>11}  {f['error'][:50]}  {peak}")
            continue
        tps = f"{f['tokens_per_s']:.1f}" if f["tokens_per_s"] else "-"
        ratio, ratio_spread = ((f"{f['ratio']:.3f}", f"{f['ratio_spread']:.1%}")
                               if f["ratio"] is not None else ("-", "-"))
        lines.append(f"{name:<24}{f['seconds']:>11.4f}{f['spread']:>8.1%}{tps:>13}{ratio:>8}"
                     f"{ratio_spread:>8}  {f['ceiling'] or '':<17}{peak:>10}")
    return "\n".join(lines)
