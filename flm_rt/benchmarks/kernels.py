"""The kernel benchmarks' workloads (flm_rt::flow_map_step and flm_rt::vocab_argmax against the eager sequence
that defines them): sizes, the fewest bytes each op must move, inputs, which sizes fit a device, and the
device-to-device copy bandwidth they are compared with. Used by bench/bench_ops.py and bench/gpu/measure.py.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..model import PRESET_SHAPES
from .suite import cpu_name
from .timing import time_calls

# (rows = B*L, V): the sampler's workload per step for a batch of sequences, LM1B and OWT vocabularies.
FULL_ROWS = (1024, 8192, 65536)
FULL_VOCABS = tuple(PRESET_SHAPES[s]["vocab_size"] for s in ("lm1b", "owt"))
TINY = (16, 4099)  # smoke mode: odd V, a few rows
CPU_MEM_BUDGET = 20e9  # bytes the CPU benchmarks may allocate (inputs + eager temporaries)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the threads and torch's CPU capability."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = cpu_name().split(" (")[0]
    return f"{name} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


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
    """(z, logits, a, b, c, eps) of one flow_map_step call; logits in ``dtype``, the rest float32."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    z = torch.randn(rows, V, generator=g, device=device)
    logits = (torch.randn(rows, V, generator=g, device=device) * 4).to(dtype)
    eps = torch.randn(rows, V, generator=g, device=device)
    a = torch.rand(rows, generator=g, device=device)
    b = torch.rand(rows, generator=g, device=device)
    c = torch.rand(rows, generator=g, device=device)
    return z, logits, a, b, c, eps


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, *, repeats: int = 10, warmup: int = 3) -> dict:
    """Device-to-device copy of ``nbytes``: bytes moved (read + write), the timing in ms, and GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * 4
    t = time_calls(lambda: dst.copy_(src), device, repeats=repeats, warmup=warmup)
    return {"bytes": moved, **t.ms(), "gbps": moved / t.median_s / 1e9}


def size_skip_reason(rows: int, V: int, dtype: torch.dtype, device: torch.device, smoke: bool,
                     impl: str) -> Optional[str]:
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
