"""pytest-benchmark cases for generation: flm_rt (compiled and pure-PyTorch ops) vs the research-code reference.

Smoke mode (default; CI runs ``pytest tests bench --benchmark-disable``): the ``tiny`` shape only, steps 1 and 4,
batch 1, each case run once, and flm_rt's ids checked against the reference's. Full mode (``FLM_RT_BENCH_FULL=1``
or ``--bench-shapes``): steps 1, 2, 4, 8 and batch 1, 8 (1, 8, 64 on GPU). Each case stores in
``benchmark.extra_info``: device name, dtype, B, L, V, steps, stochasticity, median latency, per-token latency,
tokens/s, FLOPs per sample, weight bytes, achieved TFLOP/s and the fraction of the device peak.
"""
from __future__ import annotations

import functools
import os
import statistics
import time

import torch

from flm_rt.model import PRESET_SHAPES, preset_config

ROWS = ("reference", "flm_rt", "flm_rt[torch-kernels]")  # reference first: flm_rt rows are compared with it
STOCHASTICITY = 0.0
FULL_SHAPES = tuple(PRESET_SHAPES)


def bench_full(config) -> bool:
    """Full mode: FLM_RT_BENCH_FULL=1 or an explicit --bench-shapes (options from bench/conftest.py)."""
    return os.environ.get("FLM_RT_BENCH_FULL", "") not in ("", "0") or bool(config.getoption("--bench-shapes", None))


def bench_shapes(config) -> list:
    opt = config.getoption("--bench-shapes", None)
    if opt:
        return [s.strip() for s in opt.split(",") if s.strip()]
    return list(FULL_SHAPES) if bench_full(config) else ["tiny"]


def pytest_generate_tests(metafunc):
    if "gen_case" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    full = bench_full(cfg)
    shapes = bench_shapes(cfg)
    steps = (1, 2, 4, 8) if full else (1, 4)
    dev_opt = cfg.getoption("--bench-device", None)
    gpu = (dev_opt or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    batches = ((1, 8, 64) if gpu else (1, 8)) if full else (1,)
    cases, ids = [], []
    for shape in shapes:
        for b in batches:
            for n in steps:
                for row in ROWS:
                    cases.append((shape, row, n, b))
                    ids.append(f"{shape}-{row}-steps{n}-B{b}")
    metafunc.parametrize("gen_case", cases, ids=ids)


@functools.lru_cache(maxsize=1)
def _model(shape: str, device: str, dtype: str):
    import flm_rt
    from flm_rt.benchmarks.suite import OUTPUT_SCALE

    return flm_rt.random_model(preset_config(shape), seed=0, device=device, dtype=dtype, output_scale=OUTPUT_SCALE)


_REF_IDS: dict = {}


def test_generate(benchmark, gen_case, bench_device, bench_dtype, bench_peak):
    from flm_rt import generate
    from flm_rt.benchmarks.reference import draws_needed, reference_generate
    from flm_rt.benchmarks.suite import device_name, flops_per_sample, weight_bytes
    from flm_rt.benchmarks.timing import synchronize

    shape, row, steps, b = gen_case
    dtype_name = str(bench_dtype).replace("torch.", "")
    model = _model(shape, str(bench_device), dtype_name)
    cfg = model.config
    L, V = cfg.length, cfg.vocab_size
    need = draws_needed(True, steps, STOCHASTICITY)
    noise = torch.randn((need, b, L, V), generator=torch.Generator(device=bench_device).manual_seed(0),
                        device=bench_device)
    if row == "reference":
        autocast = None if bench_dtype == torch.float32 else bench_dtype

        def call():
            return reference_generate(model, noise, steps, STOCHASTICITY, autocast_dtype=autocast)
    else:
        kernels = "torch" if row == "flm_rt[torch-kernels]" else "auto"

        def call():
            return generate(model, noise=noise, steps=steps, stochasticity=STOCHASTICITY, decode=False,
                            kernels=kernels).token_ids

    times, out = [], {}

    def timed():
        synchronize(bench_device)
        t0 = time.perf_counter()
        out["ids"] = call()
        synchronize(bench_device)
        times.append(time.perf_counter() - t0)

    rounds = 5 if L * V * b <= 128 * 30522 * 8 else 3
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    # In --benchmark-disable mode pedantic runs once; the figures then come from that single run.
    median = statistics.median(times[-rounds:] if len(times) > rounds else times)
    flops = flops_per_sample(cfg, steps)
    tokens = b * L
    benchmark.extra_info.update({
        "shape": shape, "row": row, "device": str(bench_device), "device_name": device_name(bench_device),
        "dtype": dtype_name, "B": b, "L": L, "V": V, "steps": steps, "stochasticity": STOCHASTICITY,
        "median_s": median, "per_token_ms": 1e3 * median / tokens, "tokens_per_s": tokens / median,
        "flops_per_sample": flops, "weight_bytes": weight_bytes(model),
        "achieved_tflops": flops * b / median / 1e12, "peak_tflops": bench_peak["peak_tflops"],
        "peak_source": bench_peak["peak_source"],
        "frac_peak": flops * b / median / 1e12 / bench_peak["peak_tflops"],
    })
    ids = out["ids"].to("cpu", torch.int64)
    key = (shape, steps, b, dtype_name)
    if row == "reference":
        _REF_IDS[key] = ids
    elif key in _REF_IDS and bench_dtype == torch.float32:
        match = float((ids == _REF_IDS[key]).float().mean())
        benchmark.extra_info["tokens_match_reference"] = match
        assert match == 1.0, f"flm_rt ids differ from the reference on {1 - match:.2%} of positions (fp32)"
