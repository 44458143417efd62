"""Peak resident memory of one ``flm_rt.generate`` call, measured in a fresh process per configuration.

tracemalloc does not see torch's allocations, so this reads the kernel's high-water mark of the process's resident
set (``VmHWM`` in /proc/self/status, reset through /proc/self/clear_refs after the model is loaded and warmed up;
where that reset is not possible, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which then includes loading).
Reported: the peak and the growth over the resident set just before the call (what the call itself allocates).

    python -m flm_rt.benchmarks.memory --shape owt --steps 1            # the 4 configurations, one JSON line each
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from typing import Optional


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure_here(shape: dict, *, steps: int, space: str, fused: bool, batch: int = 1, threads: Optional[int] = None,
                 dtype: str = "float32") -> dict:
    """Run in *this* process: build a random model of ``shape``, warm up once, then measure one generate."""
    import torch

    import flm_rt
    from flm_rt.model import ModelConfig

    if threads:
        torch.set_num_threads(threads)
    os.environ["FLM_RT_FUSED_VOCAB"] = "1" if fused else "0"
    model = flm_rt.random_model(ModelConfig(two_time=True, **shape), seed=0, dtype=dtype)

    def run():
        return flm_rt.generate(model, num_samples=batch, steps=steps, seed=0, decode=False, noise_space=space)

    run()  # lazy prepacking and first-call allocations are not part of the steady state
    before_kb = _status_kb("VmRSS")
    exact = _reset_hwm()
    run()
    peak_kb = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"shape": shape, "batch": batch, "steps": steps, "space": space, "fused": fused, "dtype": dtype,
            "peak_rss_mb": round(peak_kb / 1024, 1), "rss_before_mb": round((before_kb or 0) / 1024, 1),
            "growth_mb": round((peak_kb - (before_kb or 0)) / 1024, 1),
            "method": "VmHWM reset after warm-up" if exact else "ru_maxrss (includes loading)",
            "logits_mb": round(batch * shape["length"] * shape["vocab_size"] * 4 / 2**20, 1)}


def measure(shape: dict, *, steps: int, space: str, fused: bool, batch: int = 1, threads: Optional[int] = None,
            dtype: str = "float32", timeout: float = 900) -> dict:
    """``measure_here`` in a fresh Python process (so that earlier allocations do not count)."""
    args = json.dumps({"shape": shape, "steps": steps, "space": space, "fused": fused, "batch": batch,
                       "threads": threads, "dtype": dtype})
    code = ("import json, sys; from flm_rt.benchmarks.memory import measure_here; "
            "print(json.dumps(measure_here(**json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ))
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from ..model import PRESET_SHAPES

    p = argparse.ArgumentParser(prog="python -m flm_rt.benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="owt", choices=list(PRESET_SHAPES))
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    for space in ("vocab", "embedding"):
        for fused in (False, True):
            print(json.dumps(measure(PRESET_SHAPES[args.shape], steps=args.steps, space=space, fused=fused,
                                     batch=args.batch, threads=args.threads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
