"""Interleaved in-process A/B of one flm_rt switch: the way to compare two code paths on a noisy machine.

``flm-rt bench`` runs are minutes apart, and a shared 2-core VM's matrix-product rate can move 2x between them. This
times both arms of one switch on the same model and noise in the same process, alternating which arm runs first,
so a drift of the machine hits both alike::

    python -m flm_rt.benchmarks.ab FLM_RT_TRANSPOSED_GEMM --dtypes bfloat16 --spaces vocab,embedding --pairs 7

Each arm is warmed up (2 calls) before the timed pairs (on the CPU, with the benchmarks' one timer,
flm_rt.benchmarks.timing); the report gives per arm the median, the min-max and the ids' agreement between the
arms (1.0: the switch does not change the tokens). The switch is an environment
variable read by flm_rt at the next call (the prepack switches' cached values are re-read without dropping the
packed weights).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Optional

import torch

SWITCHES = ("FLM_RT_GELU_PASS", "FLM_RT_TRANSPOSED_GEMM", "FLM_RT_FUSED_VOCAB", "FLM_RT_SCREEN")


@contextmanager
def switched(name: str, on: bool):
    """The environment variable ``name`` set to 1 / 0 for the block (restored after), the cached reads refreshed."""
    from .. import prepack

    old = os.environ.get(name)
    os.environ[name] = "1" if on else "0"
    prepack.reread_switches()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
        prepack.reread_switches()


def run_ab(switch: str, shape: str = "lm1b", dtypes=("float32",), spaces=("vocab",), batches=(1, 8), steps: int = 1,
           pairs: int = 7, warmup: int = 2, threads: Optional[int] = None, seed: int = 0) -> dict:
    """{"meta": ..., "cases": [{dtype, space, batch, on_ms, off_ms, ids_equal, ...}]} (times in ms, per call)."""
    from ..api import generate, random_model
    from ..model import preset_config
    from .suite import OUTPUT_SCALE, cpu_isa, git_commit
    from .timing import time_calls

    if switch not in SWITCHES:
        raise ValueError(f"switch must be one of {', '.join(SWITCHES)}, got {switch!r}")
    if pairs < 1 or warmup < 0 or steps < 1:
        raise ValueError("pairs and steps must be >= 1 and warmup >= 0")
    if threads:
        torch.set_num_threads(threads)
    cfg = preset_config(shape)
    cpu = torch.device("cpu")
    cases = []
    for dtype_name in dtypes:
        model = random_model(cfg, seed=seed, dtype=dtype_name, output_scale=OUTPUT_SCALE)
        for space in spaces:
            for b in batches:
                noise = (torch.randn((1, b, cfg.length, cfg.vocab_size), generator=torch.Generator().manual_seed(seed))
                         if space == "vocab" and steps == 1 else None)

                def call():
                    if noise is not None:
                        return generate(model, noise=noise, steps=steps, decode=False).token_ids
                    return generate(model, num_samples=b, steps=steps, decode=False, noise_space=space,
                                    generator=torch.Generator().manual_seed(seed)).token_ids

                times: dict = {True: [], False: []}
                ids = {}
                for on in (True, False):
                    with switched(switch, on):
                        ids[on] = torch.as_tensor(time_calls(call, cpu, repeats=1, warmup=warmup).out)
                for i in range(pairs):
                    for on in ((True, False) if i % 2 == 0 else (False, True)):
                        with switched(switch, on):
                            t = time_calls(call, cpu, repeats=1, warmup=0)
                        times[on].append(t.times_s[0] * 1e3)
                cases.append({
                    "dtype": dtype_name, "space": space, "batch": b, "steps": steps,
                    "on_ms": times[True], "off_ms": times[False],
                    "on_median_ms": statistics.median(times[True]), "off_median_ms": statistics.median(times[False]),
                    "ids_equal": float((ids[True] == ids[False]).float().mean()),
                })
    meta = {"switch": switch, "shape": shape, "pairs": pairs, "warmup": warmup, "threads": torch.get_num_threads(),
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "git_commit": git_commit(),
            "cpu": cpu_isa(), "torch": torch.__version__}
    return {"meta": meta, "cases": cases}


def format_table(result: dict) -> str:
    sw = result["meta"]["switch"]
    lines = [f"| dtype | noise space | B | {sw}=1: median ms (min-max) | {sw}=0: median ms (min-max) | on/off | "
             "ids equal |", "|---|---|---:|---:|---:|---:|---:|"]
    for c in result["cases"]:
        lines.append(f"| {c['dtype']} | {c['space']} | {c['batch']} | {c['on_median_ms']:.1f} "
                     f"({min(c['on_ms']):.1f}-{max(c['on_ms']):.1f}) | {c['off_median_ms']:.1f} "
                     f"({min(c['off_ms']):.1f}-{max(c['off_ms']):.1f}) | "
                     f"{c['on_median_ms'] / c['off_median_ms']:.3f} | {c['ids_equal']:.2%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flm_rt.benchmarks.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("switch", choices=SWITCHES)
    p.add_argument("--shape", default="lm1b", choices=("tiny", "lm1b", "owt"))
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16")
    p.add_argument("--spaces", default="vocab", help="comma-separated noise spaces: vocab, embedding")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the JSON here")
    a = p.parse_args(argv)
    try:
        batches = tuple(int(x) for x in a.batches.split(","))
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {a.batches!r}")
    for d in a.dtypes.split(","):
        if d not in ("float32", "bfloat16"):
            p.error(f"--dtypes: float32 or bfloat16, got {d!r}")
    for s in a.spaces.split(","):
        if s not in ("vocab", "embedding"):
            p.error(f"--spaces: vocab or embedding, got {s!r}")
    res = run_ab(a.switch, a.shape, a.dtypes.split(","), a.spaces.split(","), batches, a.steps, a.pairs,
                 threads=a.threads)
    print(format_table(res))
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
