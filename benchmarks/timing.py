"""Wall-clock timing shared by the benchmark scripts (synchronising CUDA around the timed loop)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Milliseconds per call of ``fn`` over ``iters`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters * 1000


def timed_median(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """The median milliseconds of ``iters`` calls of ``fn`` timed one by one, after ``warmup`` untimed ones (the
    median, unlike the mean, ignores a call that another job on a shared machine slowed)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, iters)):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
