"""Fixtures and helpers of the kernel benchmarks (bench/bench_ops.py).

Loaded by bench/conftest.py (fixtures re-exported) and imported directly by bench_ops.py (script mode).
Fixture names start with ``ops_`` to stay clear of the other benchmark fixtures.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import pytest
import torch

from flm_rt.benchmarks.suite import cpu_name, device_slug

# (rows = B*L, V): the sampler's workload per step for a batch of sequences, LM1B and OWT vocabularies.
FULL_ROWS = (1024, 8192, 65536)
FULL_VOCABS = (30522, 50258)
TINY = (16, 4099)  # smoke mode: odd V, a few rows
CPU_MEM_BUDGET = 20e9  # bytes the CPU benchmarks may allocate (inputs + eager temporaries)


def is_smoke(config) -> bool:
    """--benchmark-disable (CI): only the tiny case runs, once."""
    try:
        return bool(config.getoption("benchmark_disable"))
    except ValueError:
        return True


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = cpu_name().split(" (")[0]
    return f"{name} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


# Results folder name (cpu-<short cpu name> / cuda-<short gpu name>): the one the generation benchmarks use.
device_tag = device_slug


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_bytes(rows: int, V: int, logits_dtype: torch.dtype, with_eps: bool = True) -> int:
    """Minimum traffic of one step: read z, logits (, eps), write z_out."""
    elt = torch.empty((), dtype=logits_dtype).element_size()
    return rows * V * (4 + elt + (4 if with_eps else 0) + 4)


def argmax_bytes(rows: int, V: int, dtype: torch.dtype) -> int:
    """Read x, write indices (int64) and values."""
    elt = torch.empty((), dtype=dtype).element_size()
    return rows * V * elt + rows * (8 + elt)


def eager_step_peak_bytes(rows: int, V: int, logits_dtype: torch.dtype) -> int:
    # inputs + output + about four float32 temporaries of the eager sequence (cast, tanh, softmax, products)
    return step_bytes(rows, V, logits_dtype) + 4 * rows * V * 4


def make_step_inputs(rows: int, V: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    z = torch.randn(rows, V, generator=g, device=device)
    logits = (torch.randn(rows, V, generator=g, device=device) * 4).to(dtype)
    eps = torch.randn(rows, V, generator=g, device=device)
    a = torch.rand(rows, generator=g, device=device)
    b = torch.rand(rows, generator=g, device=device)
    c = torch.rand(rows, generator=g, device=device)
    return z, logits, a, b, c, eps


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call (CUDA: events on the current stream)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, repeats, warmup=2)
    return 2 * n * 4 / t


@pytest.fixture(scope="session")
def ops_smoke(request) -> bool:
    return is_smoke(request.config)


@pytest.fixture(scope="session")
def ops_device(request) -> torch.device:
    try:
        opt = request.config.getoption("--bench-device")
    except ValueError:
        opt = None
    if opt:
        return torch.device(opt)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def size_skip_reason(rows: int, V: int, dtype: torch.dtype, device: torch.device, smoke: bool,
                     impl: str) -> str | None:
    """Why a benchmark case does not run here, or None."""
    if smoke:
        return None if (rows, V) == TINY else "smoke mode (--benchmark-disable): only the tiny case runs"
    if (rows, V) == TINY:
        return None
    need = eager_step_peak_bytes(rows, V, dtype) if impl == "eager" else step_bytes(rows, V, dtype) * 2
    if device.type == "cpu":
        if rows > 8192 or need > CPU_MEM_BUDGET:
            return f"too large for the CPU budget ({need / 1e9:.1f} GB > {CPU_MEM_BUDGET / 1e9:.0f} GB or rows > 8192)"
        if dtype != torch.float32 and rows > 1024:
            return "CPU: bfloat16 only at 1024 rows"
        if rows > 1024 and os.environ.get("FLM_RT_BENCH_FULL") != "1":
            return "CPU: 8192 rows only with FLM_RT_BENCH_FULL=1 (about a minute per case)"
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.9 * free:
            return f"needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
    return None
