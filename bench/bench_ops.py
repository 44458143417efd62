"""Benchmarks of the compiled kernels against the eager PyTorch sequence computing the same thing.

pytest (pytest-benchmark):
    pytest bench/bench_ops.py --benchmark-only [--bench-device cuda]   # rows in {1024, 8192, 65536} x V in
                                                                        # {30522, 50258} where memory allows
    pytest bench/bench_ops.py --benchmark-disable                       # smoke: tiny case only (CI)
  extra_info per case: seconds (median), GB/s (minimum traffic: step reads z, logits, eps and writes z_out;
  argmax reads x and writes indices + values), device name.

script (tables for a results directory):
    python bench/bench_ops.py --device cuda            # all sizes that fit, float32 and bfloat16 logits
    python bench/bench_ops.py --device cpu             # 1024 x {50258, 30522}
  prints the device-to-device copy bandwidth and a table of both ops, and writes
  bench/results/<device-tag>/ops.json and ops.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone

import pytest
import torch

from flm_rt import _ext, ops
from flm_rt.benchmarks import kernels
from flm_rt.benchmarks.suite import device_slug
from flm_rt.benchmarks.timing import synchronize, time_calls
from flm_rt.spec import LOGIT_SOFTCAP

_HERE = os.path.dirname(os.path.abspath(__file__))

SIZES = [kernels.TINY] + [(r, v) for r in kernels.FULL_ROWS for v in kernels.FULL_VOCABS]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _step_fns(inputs, cap=LOGIT_SOFTCAP):
    z, logits, a, b, c, eps = inputs
    ext = lambda: torch.ops.flm_rt.flow_map_step(z, logits, a, b, c, eps, cap)  # noqa: E731
    eager = lambda: ops.flow_map_step_reference(z, logits, a, b, c, eps, cap)  # noqa: E731
    return ext, eager


def _argmax_fns(x):
    return (lambda: torch.ops.flm_rt.vocab_argmax(x)), (lambda: torch.max(x, dim=-1))


# ----------------------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,V", SIZES, ids=[f"{r}x{v}" for r, v in SIZES])
@pytest.mark.parametrize("impl", ["ext", "eager"])
@pytest.mark.parametrize("op", ["flow_map_step", "vocab_argmax"])
def test_bench_op(benchmark, bench_device, bench_smoke, op, impl, rows, V, dtype):
    dt = DTYPES[dtype]
    if impl == "ext" and not _ext.has_kernel(op, bench_device.type):
        pytest.skip(f"no compiled {op} kernel for {bench_device.type}: {_ext.EXT_ERROR or 'not built for it'}")
    if bench_smoke and dtype != "float32":
        pytest.skip("smoke mode (--benchmark-disable): float32 only")
    reason = kernels.size_skip_reason(rows, V, dt, bench_device, bench_smoke, impl)
    if reason:
        pytest.skip(reason)
    if op == "flow_map_step":
        inputs = kernels.make_step_inputs(rows, V, dt, bench_device)
        ext, eager = _step_fns(inputs)
        nbytes = kernels.step_bytes(rows, V, dt)
    else:
        inputs = (kernels.make_step_inputs(rows, V, dt, bench_device)[1],)
        ext, eager = _argmax_fns(inputs[0])
        nbytes = kernels.argmax_bytes(rows, V, dt)
    fn = ext if impl == "ext" else eager

    def run():
        out = fn()
        synchronize(bench_device)
        return out

    if bench_smoke:  # one call, but check the result so the smoke run means something
        out = benchmark(run)
        if op == "flow_map_step":
            ref = ops.flow_map_step_reference(*inputs, cap=LOGIT_SOFTCAP)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        return
    # enough rounds for small cases to average out scheduling noise, few for the multi-second CPU ones
    rounds = max(3, min(50, int(5e8 // max(nbytes, 1)))) if bench_device.type == "cpu" else 20
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "op": op, "impl": impl, "rows": rows, "V": V, "logits_dtype": dtype,
        "seconds": median, "GB/s": nbytes / median / 1e9, "bytes": nbytes,
        "device": kernels.device_name(bench_device),
    })


# ----------------------------------------------------------------------------------------------------------
# script mode
# ----------------------------------------------------------------------------------------------------------
def run_table(device: torch.device, sizes, dtypes, repeats: int, cap: float = LOGIT_SOFTCAP) -> dict:
    copy_bw = kernels.copy_bandwidth(device, nbytes=(1 << 28) if device.type == "cpu" else (1 << 31))["gbps"] * 1e9
    rows_out = []
    for (rows, V) in sizes:
        for dname in dtypes:
            dt = DTYPES[dname]
            for op in ("flow_map_step", "vocab_argmax"):
                if kernels.size_skip_reason(rows, V, dt, device, False, "ext"):
                    continue
                inputs = kernels.make_step_inputs(rows, V, dt, device)
                rec = {"op": op, "rows": rows, "V": V, "logits_dtype": dname}
                if op == "flow_map_step":
                    ext, eager = _step_fns(inputs, cap)
                    nbytes = kernels.step_bytes(rows, V, dt)
                    z = inputs[0]
                    zin = z.clone()
                    inplace = lambda: torch.ops.flm_rt.flow_map_step_(zin, *inputs[1:], cap)  # noqa: E731
                else:
                    ext, eager = _argmax_fns(inputs[1])
                    nbytes = kernels.argmax_bytes(rows, V, dt)
                    inplace = None
                rec["bytes"] = nbytes
                if _ext.has_kernel(op, device.type):
                    rec["ext_s"] = _median_s(ext, device, repeats)
                    rec["ext_GBps"] = nbytes / rec["ext_s"] / 1e9
                    rec["ext_frac_copy_bw"] = rec["ext_GBps"] * 1e9 / copy_bw
                    if inplace is not None:
                        rec["ext_inplace_s"] = _median_s(inplace, device, repeats)
                        rec["ext_inplace_GBps"] = nbytes / rec["ext_inplace_s"] / 1e9
                if kernels.size_skip_reason(rows, V, dt, device, False, "eager") is None:
                    rec["eager_s"] = _median_s(eager, device, repeats)
                    rec["eager_GBps"] = nbytes / rec["eager_s"] / 1e9
                    if "ext_s" in rec:
                        rec["speedup"] = rec["eager_s"] / rec["ext_s"]
                rows_out.append(rec)
                print(_fmt_row(rec), flush=True)
                del inputs
    return {
        "device": kernels.device_name(device),
        "device_tag": device_slug(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "flm_rt_build": _ext.build_info(short=True),
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "cap": cap,
        "repeats": repeats,
        "timing": "median of repeats; CUDA events on GPU, perf_counter on CPU; 1 warm-up call",
        "bytes_model": "step: z + logits + eps read, z_out written; argmax: x read, indices + values written",
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "results": rows_out,
    }


def _median_s(fn, device: torch.device, repeats: int) -> float:
    return time_calls(fn, device, repeats=repeats, warmup=1).median_s


def _fmt_row(r: dict) -> str:
    def f(key, fmt):
        return format(r[key], fmt) if key in r else "-"
    return (f"| {r['op']:<13} | {r['rows']:>6} x {r['V']:<6} | {r['logits_dtype']:<8} | {f('ext_s', '.4f'):>9} | "
            f"{f('ext_GBps', '.1f'):>7} | {f('ext_inplace_s', '.4f'):>9} | {f('eager_s', '.4f'):>9} | "
            f"{f('eager_GBps', '.1f'):>7} | {f('speedup', '.2f'):>7} |")


HEADER = ("| op            | rows x V        | logits   |  ext (s) | ext GB/s | ext_ (s) | eager (s) | eager GB/s "
          "| speedup |\n|---|---|---|---|---|---|---|---|---|")


def to_markdown(res: dict) -> str:
    lines = [
        f"# flm_rt kernels vs eager PyTorch on {res['device']}",
        "",
        f"- {res['flm_rt_build']}",
        f"- torch {res['torch']}, {res['torch_threads']} threads; measured {res['date_utc']}",
        f"- device-to-device copy bandwidth: {res['copy_bandwidth_GBps']:.1f} GB/s (read + write)",
        f"- {res['timing']}; GB/s from the minimum traffic ({res['bytes_model']})",
        f"- flow_map_step with cap = {res['cap']}, eps given; ext_ = in-place variant; eager = "
        "flm_rt.ops.flow_map_step_reference / torch.max",
        "",
        HEADER,
    ]
    lines += [_fmt_row(r) for r in res["results"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default=None, help="comma list of ROWSxV (default: cuda all, cpu 1024x50258,1024x30522)")
    p.add_argument("--dtypes", default=None, help="comma list: float32,bfloat16 (default cuda both, cpu float32)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default=None, help="output directory (default bench/results/<device-tag>)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("CUDA not available")
    if args.sizes:
        sizes = [tuple(int(x) for x in s.lower().split("x")) for s in args.sizes.split(",")]
    elif device.type == "cpu":
        sizes = [(1024, 50258), (1024, 30522)]
    else:
        sizes = [(r, v) for r in kernels.FULL_ROWS for v in kernels.FULL_VOCABS]
    dtypes = args.dtypes.split(",") if args.dtypes else (["float32"] if device.type == "cpu" else ["float32", "bfloat16"])
    repeats = args.repeats or (5 if device.type == "cpu" else 20)
    print(f"device: {kernels.device_name(device)}\n{_ext.build_info(short=True)}\n{HEADER}", flush=True)
    res = run_table(device, sizes, dtypes, repeats)
    print(f"copy bandwidth: {res['copy_bandwidth_GBps']:.1f} GB/s")
    out_dir = args.out or os.path.join(_HERE, "results", res["device_tag"])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "ops.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out_dir, "ops.md"), "w") as f:
        f.write(to_markdown(res))
    print(f"wrote {out_dir}/ops.json and ops.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
