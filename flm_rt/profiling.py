"""``flm-rt profile``: one warm-up and one profiled generation under torch.profiler, with flm_rt's named ranges.

Writes a Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev), prints the top operators/kernels
by self time and the time spent in each named range (embedding, conditioning, block0..N-1, output_layer,
flow_map_step, argmax).
For Nsight Systems, run ``nsys profile -t cuda,nvtx flm-rt profile ...``: the same ranges are NVTX ranges.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Optional, Sequence

from . import cli_args
from .devices import dtype_name

RANGE_RE = re.compile(r"^(embedding|conditioning|block\d+|output_layer|flow_map_step|argmax)$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flm-rt profile",
                                description="Profile one generation: Chrome trace, top ops, time per named range.")
    p.add_argument("model", help="checkpoint (.ckpt, hub or flm_rt directory) or a shape name for random weights: "
                                 "tiny | lm1b | owt")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("-n", "--num-samples", type=int, default=1)
    p.add_argument("--stochasticity", type=float, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    cli_args.add_device(p)
    cli_args.add_kernels(p)
    p.add_argument("--noise-space", choices=["vocab", "embedding"], default=None)
    p.add_argument("--reference", action="store_true",
                   help="profile the research-code reference sampler instead of flm_rt (benchmarks.reference)")
    p.add_argument("--out", default="trace.json", help="Chrome trace path (default trace.json)")
    p.add_argument("--top", type=int, default=15, help="rows of the top-ops table")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    cli_args.add_seed(p)
    return p


def _load_model(spec: str, device, dtype):
    from .api import load, random_model
    from .benchmarks.suite import OUTPUT_SCALE
    from .model import PRESET_SHAPES, preset_config

    if spec in PRESET_SHAPES and not os.path.exists(spec):
        return random_model(preset_config(spec), seed=0, device=device, dtype=dtype, output_scale=OUTPUT_SCALE)
    return load(spec, device=device, dtype=dtype)


def range_times(events) -> dict:
    """{range name: (calls, cpu_ms, device_ms)} for flm_rt's named ranges, from ``prof.key_averages()``."""
    out = {}
    for e in events:
        if RANGE_RE.match(e.key):
            dev_us = getattr(e, "device_time_total", None)
            if dev_us is None:
                dev_us = getattr(e, "cuda_time_total", 0)
            calls, cpu, dev = out.get(e.key, (0, 0.0, 0.0))
            out[e.key] = (calls + e.count, cpu + e.cpu_time_total / 1e3, dev + (dev_us or 0) / 1e3)
    return out


def format_ranges(ranges: dict, total_ms: float, cuda: bool) -> str:
    def order(k):
        m = re.match(r"block(\d+)", k)
        base = {"embedding": 0, "conditioning": 0.5, "output_layer": 2, "flow_map_step": 3, "argmax": 4}
        return (1, int(m.group(1))) if m else (base.get(k, 9), 0)

    lines = [f"{'range':<16}{'calls':>6}{'CPU ms':>12}" + (f"{'GPU ms':>12}" if cuda else "") + f"{'% of run':>10}"]
    blocks = [0, 0.0, 0.0]
    for k in sorted(ranges, key=order):
        calls, cpu, dev = ranges[k]
        t = dev if cuda else cpu
        lines.append(f"{k:<16}{calls:>6}{cpu:>12.2f}" + (f"{dev:>12.2f}" if cuda else "")
                     + f"{100 * t / total_ms if total_ms else 0:>9.1f}%")
        if k.startswith("block"):
            blocks = [blocks[0] + calls, blocks[1] + cpu, blocks[2] + dev]
    if blocks[0]:
        t = blocks[2] if cuda else blocks[1]
        lines.append(f"{'blocks (all)':<16}{blocks[0]:>6}{blocks[1]:>12.2f}" + (f"{blocks[2]:>12.2f}" if cuda else "")
                     + f"{100 * t / total_ms if total_ms else 0:>9.1f}%")
    return "\n".join(lines)


def profile_generation(model, *, steps=1, num_samples=1, stochasticity=None, seq_len=None, kernels=None,
                       noise_space=None, reference=False, seed=0, out="trace.json", top=15, stream=None) -> dict:
    """Warm up, profile one generation, write the Chrome trace; print the tables to ``stream``. Returns a dict."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from . import nvtx
    from .api import generate

    stream = stream or sys.stdout
    cuda = model.device.type == "cuda"
    kw = dict(num_samples=num_samples, steps=steps, stochasticity=stochasticity, seq_len=seq_len, seed=seed,
              decode=False, kernels=kernels)
    if noise_space is not None:
        kw["noise_space"] = noise_space

    if reference:
        from .benchmarks.reference import reference_generate

        s = float(stochasticity or 0.0)
        length = seq_len or model.config.length

        def run():
            g = torch.Generator(device=model.device).manual_seed(seed)
            ids = reference_generate(model, g, steps, s, batch=num_samples, seq_len=length,
                                     autocast_dtype=None if model.dtype == torch.float32 else model.dtype)
            if cuda:
                torch.cuda.synchronize(model.device)
            return ids
    else:
        def run():
            return generate(model, **kw).token_ids

    was = nvtx.enabled()
    nvtx.enable(True)
    try:
        run()  # warm-up (allocations, kernel selection, lazy initialisation)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        t0 = time.perf_counter()
        with profile(activities=activities, record_shapes=False) as prof:
            ids = run()
        wall_ms = (time.perf_counter() - t0) * 1e3
    finally:
        nvtx.enable(was)
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    prof.export_chrome_trace(out)
    events = prof.key_averages()
    sort_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort_key, row_limit=top)
    ranges = range_times(events)
    b, length = ids.shape
    print(f"flm-rt profile: {'reference sampler' if reference else 'flm_rt'} on {model.device} "
          f"({dtype_name(model.dtype)}), {b} x {length} tokens, {steps} step(s); "
          f"profiled run {wall_ms:.1f} ms wall ({wall_ms / (b * length):.4f} ms/token, profiler overhead included)",
          file=stream)
    print(f"\nTop {top} operators{'/kernels' if cuda else ''} by self {'CUDA' if cuda else 'CPU'} time:", file=stream)
    print(table, file=stream)
    print("Time per named range (inclusive; blocks also summed):", file=stream)
    print(format_ranges(ranges, wall_ms, cuda), file=stream)
    print(f"\nChrome trace: {out}", file=stream)
    return {"trace": out, "wall_ms": wall_ms, "ranges": ranges, "table": table}


def cli_profile(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv[:1] == ["--"]:  # `flm-rt profile -- --option ...` (the top-level parser's remainder keeps the "--")
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    import torch

    from .devices import resolve_device, resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    model = _load_model(args.model, device, dtype)
    profile_generation(model, steps=args.steps, num_samples=args.num_samples, stochasticity=args.stochasticity,
                       seq_len=args.seq_len, kernels=args.kernels, noise_space=args.noise_space,
                       reference=args.reference, seed=args.seed, out=args.out, top=args.top)
    return 0


if __name__ == "__main__":
    sys.exit(cli_profile())
