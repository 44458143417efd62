"""pytest configuration of the benchmark files (``pytest bench``; pytest-benchmark).

Smoke mode (the default, e.g. ``pytest tests bench --benchmark-disable`` in CI): only the ``tiny`` shape runs,
once per case. Real benchmarking: ``FLM_RT_BENCH_FULL=1 pytest bench --benchmark-only`` or
``pytest bench --bench-shapes tiny,lm1b,owt --benchmark-only``; ``--bench-device`` / ``--bench-dtype`` pick the
device (default cuda when available) and dtype (default float32 on CPU, bfloat16 on GPU).

The kernels' benchmark fixtures live in ``conftest_ops.py`` (their owner's file): it is loaded from here, its
fixtures re-exported and its hooks chained after these.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

try:
    _ops_conftest = importlib.import_module("conftest_ops")
except ImportError:
    _ops_conftest = None

_CHAINED_HOOKS = ("pytest_addoption", "pytest_configure", "pytest_collection_modifyitems", "pytest_generate_tests",
                  "pytest_runtest_setup", "pytest_sessionstart", "pytest_sessionfinish")
if _ops_conftest is not None:  # re-export fixtures and helpers (not hooks: those are chained below)
    for _name in dir(_ops_conftest):
        if not _name.startswith("_") and _name not in _CHAINED_HOOKS and _name not in globals():
            globals()[_name] = getattr(_ops_conftest, _name)


def _chain(hook: str, *args):
    fn = getattr(_ops_conftest, hook, None) if _ops_conftest is not None else None
    if fn is not None:
        return fn(*args)
    return None


def pytest_addoption(parser):
    group = parser.getgroup("flm_rt benchmarks")
    group.addoption("--bench-shapes", default=None,
                    help="comma-separated shapes for bench_generate.py (tiny, lm1b, owt); default tiny, or "
                         "tiny,lm1b,owt when FLM_RT_BENCH_FULL=1")
    group.addoption("--bench-device", default=None, help="cpu | cuda (default cuda when available)")
    group.addoption("--bench-dtype", default=None, help="float32 | bfloat16 (default float32 on CPU, bfloat16 on GPU)")
    _chain("pytest_addoption", parser)


def _give_back_conftest_name(config) -> None:
    """Conftest files outside packages are all imported as the module ``conftest``; pytest loads ``tests/``'s
    and then this one, which would leave ``import conftest`` in test modules (``from conftest import ...`` in
    tests/) resolving to this file. Point the name back at the other directory's conftest when one is loaded."""
    me = sys.modules.get("conftest")
    if me is None or os.path.dirname(os.path.abspath(getattr(me, "__file__", "") or "")) != _HERE:
        return
    for plugin in config.pluginmanager.get_plugins():
        f = getattr(plugin, "__file__", None)
        if (f and os.path.basename(f) == "conftest.py" and os.path.dirname(os.path.abspath(f)) != _HERE
                and getattr(plugin, "__name__", "") == "conftest"):
            sys.modules["conftest"] = plugin
            return


def pytest_configure(config):
    _give_back_conftest_name(config)
    _chain("pytest_configure", config)


def pytest_collection_modifyitems(session, config, items):
    _chain("pytest_collection_modifyitems", session, config, items)


@pytest.fixture(scope="session")
def bench_device(request):
    import torch

    from flm_rt.api import resolve_device

    opt = request.config.getoption("--bench-device")
    return resolve_device(opt) if opt else torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bench_dtype(request, bench_device):
    from flm_rt.api import resolve_dtype

    opt = request.config.getoption("--bench-dtype")
    return resolve_dtype(opt or ("bfloat16" if bench_device.type == "cuda" else "float32"))


@pytest.fixture(scope="session")
def bench_peak(bench_device, bench_dtype):
    """Peak figure used for the fraction of peak (datasheet on known GPUs, else one measured large torch.mm)."""
    from flm_rt.benchmarks.suite import device_peak

    return device_peak(bench_device, bench_dtype)
