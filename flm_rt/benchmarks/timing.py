"""Timing one callable on a device: the one timer of every benchmark (``flm-rt bench``, ``bench/``,
``bench/gpu/measure.py``).

Warm-up calls first (untimed), then timed calls: CUDA events on the current stream on a GPU, ``perf_counter``
elsewhere; the device is synchronized before each timed call, so none pays for earlier work.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    times_s: list          # seconds of each timed call, in order
    out: object = None     # what the last call returned

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def max_s(self) -> float:
        return max(self.times_s)

    def ms(self) -> dict:
        """Median / min / max in milliseconds and the number of timed calls (for JSON records)."""
        return {"median_ms": 1e3 * self.median_s, "min_ms": 1e3 * self.min_s, "max_ms": 1e3 * self.max_s,
                "repeats": len(self.times_s)}


def time_calls(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int = 1,
               max_total_s: Optional[float] = None) -> Timing:
    """``warmup`` untimed calls, then ``repeats`` timed ones. ``max_total_s``: when the last warm-up says the
    repeats would take longer than that, fewer are run (never fewer than ``min(5, repeats)``)."""
    out = None
    t_warm = 0.0
    for _ in range(max(warmup, 0)):
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        t_warm = time.perf_counter() - t0
    n = repeats
    if max_total_s is not None and t_warm > 0 and t_warm * repeats > max_total_s:
        n = max(min(5, repeats), int(max_total_s // t_warm))
    times = []
    for _ in range(n):
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return Timing(times, out)
