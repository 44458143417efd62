"""Exported generate graphs on the tiny golden FMLM model: ONNX Runtime vs TorchScript vs AOTInductor vs eager
(``flm_rt.generate`` with its default kernels).

    pytest bench/bench_export.py --benchmark-only            # all rows, timed (AOTI compile: ~20-60 s on 2 cores)
    pytest bench/bench_export.py --benchmark-disable         # smoke (CI): ONNX + TorchScript + eager, run once;
                                                             # the AOTI row is skipped unless FLM_RT_BENCH_FULL=1
    python bench/bench_export.py [--steps 1] [--batch 3]     # script mode: one table, no pytest

The artifacts are exported once per module into a temporary directory (the export time is reported in
``extra_info``). To time an artifact of your own from other code use ``flm_rt.exporting.time_exported(path)``
(re-exported here as ``time_exported``).
"""
from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from flm_rt.benchmarks.pytest_plugin import is_smoke
try:
    from golden_files import require_golden  # tests/golden_files.py, on pytest's pythonpath: where ../shared is
except ImportError:  # run as a script (python bench/bench_export.py): no pytest pythonpath
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from golden_files import require_golden

_EXP = importlib.import_module("flm_rt.exporting")
time_exported = _EXP.time_exported
load_exported = _EXP.load_exported

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "aoti": ".pt2"}
RUNTIMES = ["onnxruntime", "torchscript", "aoti", "eager"]
FORMAT_OF = {"onnxruntime": "onnx", "torchscript": "torchscript", "aoti": "aoti"}


def _model():
    import flm_rt

    return flm_rt.load(require_golden() / "fmlm.ckpt", device="cpu")


def export_all(model, outdir: Path, formats, *, steps: int = 1, stochasticity: float = 0.0, batch: int = 3) -> dict:
    """Export the generate graph (fixed batch) in each format; returns {format: (path, export seconds)}."""
    out = {}
    for fmt in formats:
        path = outdir / f"fmlm-n{steps}-b{batch}{SUFFIX[fmt]}"
        t0 = time.perf_counter()
        _EXP.export(model, path, format=fmt, steps=steps, stochasticity=stochasticity, batch=batch)
        out[fmt] = (path, time.perf_counter() - t0)
    return out


@pytest.fixture(scope="module")
def export_model():
    return _model()


@pytest.fixture(scope="module")
def exported(request, export_model, tmp_path_factory):
    """Artifacts, exported lazily per format and cached for the module."""
    outdir = tmp_path_factory.mktemp("bench-export")
    cache = {}

    def get(fmt):
        if fmt not in cache:
            cache[fmt] = export_all(export_model, outdir, [fmt])[fmt]
        return cache[fmt]
    return get


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_bench_exported_generate(benchmark, request, exported, export_model, runtime):
    import flm_rt

    if runtime == "aoti" and is_smoke(request.config) and os.environ.get("FLM_RT_BENCH_FULL") != "1":
        pytest.skip("smoke mode: the AOTInductor compile takes 20-60 s (set FLM_RT_BENCH_FULL=1 to include it)")
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    cfg = export_model.config
    noise = torch.randn(1, 3, cfg.length, cfg.vocab_size, generator=torch.Generator().manual_seed(0))
    if runtime == "eager":
        def run():
            return flm_rt.generate(export_model, steps=1, noise=noise, decode=False).token_ids
        export_s = 0.0
    else:
        path, export_s = exported(FORMAT_OF[runtime])
        fn = load_exported(path)

        def run():
            with torch.inference_mode():
                return fn(noise)
    ids = benchmark(run)
    assert tuple(ids.shape) == (3, cfg.length) and int(ids.min()) >= 0 and int(ids.max()) < cfg.vocab_size
    benchmark.extra_info.update({"runtime": runtime, "export_s": round(export_s, 2), "steps": 1, "batch": 3,
                                 "tokens": 3 * cfg.length})


def main(argv=None) -> int:
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description="time exported generate graphs of the tiny golden FMLM model")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--formats", default="onnx,torchscript,aoti")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads for torch and ONNX Runtime (default 1: on a busy 2-core machine two "
                        "OpenMP threads stall for 100s of ms whenever one is descheduled)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = _model()
    with tempfile.TemporaryDirectory() as d:
        arts = export_all(model, Path(d), args.formats.split(","), steps=args.steps, batch=args.batch)
        print(f"| runtime | export s | median ms | min ms | tokens/s |  (tiny FMLM, steps={args.steps}, "
              f"batch={args.batch}, threads={args.threads})")
        print("|---|---:|---:|---:|---:|")
        for fmt, (path, export_s) in arts.items():
            r = time_exported(path, batch=args.batch, repeats=args.repeats, threads=args.threads)
            print(f"| {fmt} | {export_s:.1f} | {r['median_s'] * 1e3:.2f} | {r['min_s'] * 1e3:.2f} | "
                  f"{r['tokens_per_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
