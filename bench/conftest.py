"""pytest configuration of the benchmark files (``pytest bench``; pytest-benchmark).

Smoke mode (the default, e.g. ``pytest tests bench --benchmark-disable`` in CI): only the ``tiny`` shape runs,
once per case. Real benchmarking: ``FLM_RT_BENCH_FULL=1 pytest bench --benchmark-only`` or
``pytest bench --bench-shapes tiny,lm1b,owt --benchmark-only``; ``--bench-device`` / ``--bench-dtype`` pick the
device (default cuda when available) and dtype (default float32 on CPU, bfloat16 on GPU).

The options and fixtures live in the package, flm_rt/benchmarks/pytest_plugin.py; importing them here registers
them for bench/ (``pytest_plugins`` is only allowed in the rootdir's conftest).
"""
from flm_rt.benchmarks.pytest_plugin import (  # noqa: F401  (hook and fixtures)
    bench_device,
    bench_dtype,
    bench_peak,
    bench_smoke,
    pytest_addoption,
)
