"""Named ranges around the runtime's phases (embedding, blocks, output layer, flow-map step, argmax).

Off by default, and then free: a plain Python flag check, invisible to tracers and exporters. ``enable()`` turns
them on: each range becomes an NVTX range on CUDA (for Nsight Systems) and a ``torch.profiler`` record_function
(for the Chrome trace written by ``flm-rt profile``).
"""
from __future__ import annotations

import contextlib

import torch

_enabled = False


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def _live_range(name: str):
    nvtx = torch.cuda.is_available()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


def range(name: str):  # noqa: A001 - mirrors torch.cuda.nvtx.range
    return _live_range(name) if _enabled else contextlib.nullcontext()
