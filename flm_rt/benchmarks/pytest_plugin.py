"""The pytest side of the benchmark files in bench/ (pytest-benchmark): their command-line options and fixtures.
bench/conftest.py imports them; nothing in flm_rt imports this module (it needs pytest).

Options: ``--bench-shapes`` (bench_generate.py), ``--bench-device`` (default cuda when available) and
``--bench-dtype`` (default float32 on CPU, bfloat16 on GPU). Smoke mode is ``--benchmark-disable`` (CI): only
the smallest cases run, once each.
"""
from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("flm_rt benchmarks")
    group.addoption("--bench-shapes", default=None,
                    help="comma-separated shapes for bench_generate.py (tiny, lm1b, owt); default tiny, or "
                         "tiny,lm1b,owt when FLM_RT_BENCH_FULL=1")
    group.addoption("--bench-device", default=None, help="cpu | cuda (default cuda when available)")
    group.addoption("--bench-dtype", default=None, help="float32 | bfloat16 (default float32 on CPU, bfloat16 on GPU)")


def is_smoke(config) -> bool:
    """--benchmark-disable (CI): only the tiny cases run, once."""
    try:
        return bool(config.getoption("benchmark_disable"))
    except ValueError:  # pytest-benchmark not loaded
        return True


@pytest.fixture(scope="session")
def bench_smoke(request) -> bool:
    return is_smoke(request.config)


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    from flm_rt.devices import resolve_device

    opt = request.config.getoption("--bench-device")
    return resolve_device(opt) if opt else torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bench_dtype(request, bench_device) -> torch.dtype:
    from flm_rt.devices import resolve_dtype

    opt = request.config.getoption("--bench-dtype")
    return resolve_dtype(opt or ("bfloat16" if bench_device.type == "cuda" else "float32"))


@pytest.fixture(scope="session")
def bench_peak(bench_device, bench_dtype) -> dict:
    """Peak figure used for the fraction of peak (datasheet on known GPUs, else one measured large torch.mm)."""
    from flm_rt.benchmarks.suite import device_peak

    return device_peak(bench_device, bench_dtype)
