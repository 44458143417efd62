"""Measurements for `make gpu-check` (bench/gpu/check.py runs each subcommand in its own time-boxed process).

    python3 bench/gpu/measure.py ops     --out ops.json      [--device cuda] [--tiny]
    python3 bench/gpu/measure.py e2e     --out e2e.json      [--device cuda] [--tiny]
    python3 bench/gpu/measure.py golden  --out golden.json   [--device cuda]
    python3 bench/gpu/measure.py profile --out profile.json  --trace trace.json [--device cuda] [--tiny]

* ``ops``: achieved bandwidth of flm_rt::flow_map_step and flm_rt::vocab_argmax (and of the eager torch sequence
  that defines them) as a share of a device-to-device copy measured in the same process. Bytes are the fewest
  each op must move: every input read once, every output written once. Also the fused vocabulary pass on and off
  (``vocab_pass``: ms and peak memory at the OWT shape, B = 1).
* ``e2e``: ``flm_rt.generate`` against the reference sampler run at the reference's own precision (bf16 autocast
  on CUDA), random weights at the OWT and LM1B shapes: ms per sample, tokens/s, peak memory.
* ``golden``: the golden cases on the device: fp32 token identity and bf16-autocast agreement.
* ``profile``: one torch.profiler Chrome trace of a generate, plus the top kernels.

Every case is recorded even when it fails (out of memory, an exception): the JSON says what and why, and the
next case runs. Timing: CUDA events around each call, warm-ups first, median of the repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout: its flm_rt, built in place
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import flm_rt  # noqa: E402
from flm_rt import ops  # noqa: E402
from flm_rt.benchmarks import kernels as kernel_bench  # noqa: E402
from flm_rt.benchmarks.suite import OUTPUT_SCALE  # noqa: E402
from flm_rt.benchmarks.timing import synchronize, time_calls  # noqa: E402
from flm_rt.model import preset_config  # noqa: E402
from flm_rt.spec import LOGIT_SOFTCAP  # noqa: E402


def time_ms(fn, device: torch.device, *, warmup: int = 3, repeats: int = 10) -> dict:
    """Median / min / max milliseconds of ``fn()`` and the number of timed calls."""
    return time_calls(fn, device, repeats=repeats, warmup=warmup).ms()


def _failure(e: BaseException) -> dict:
    oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
    return {"status": "oom" if oom else "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
            "traceback": traceback.format_exc(limit=4)[-1500:]}


def _free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fits(device: torch.device, nbytes: float, share: float = 0.8) -> bool:
    if device.type != "cuda":
        return nbytes < 2e9
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < share * free


# ------------------------------------------------------------------------------------------------ ops
def run_ops(device: torch.device, tiny: bool) -> dict:
    rows_list = [64, 256] if tiny else list(kernel_bench.FULL_ROWS)
    vocab_list = [1000, 2049] if tiny else list(kernel_bench.FULL_VOCABS)
    dtypes = [torch.float32, torch.bfloat16]
    copy = kernel_bench.copy_bandwidth(device, 32 * 2**20 if tiny else 2 * 2**30)
    out = {"copy": copy, "cases": []}
    ext = ops.kernels_backend(device, torch.float32, "flow_map_step") == "ext"
    for V in vocab_list:
        for rows in rows_list:
            for dt in dtypes:
                step_bytes = kernel_bench.step_bytes(rows, V, dt)
                need = step_bytes * 1.3
                case = {"rows": rows, "V": V, "logits_dtype": str(dt).replace("torch.", "")}
                if not _fits(device, need):
                    case.update(status="skipped", reason=f"needs about {need / 1e9:.1f} GB, more than 80% of the "
                                                         "free device memory")
                    out["cases"].append(case)
                    continue
                try:
                    g = torch.Generator(device=device).manual_seed(rows + V)
                    logits = (4 * torch.randn(rows, V, device=device, generator=g)).to(dt)
                    z = torch.randn(rows, V, device=device, generator=g)
                    eps = torch.randn(rows, V, device=device, generator=g)
                    a, b, c = (torch.rand(rows, device=device, generator=g) for _ in range(3))
                    am_bytes = kernel_bench.argmax_bytes(rows, V, dt)
                    res = {}
                    if ext:
                        t = time_ms(lambda: ops.flow_map_step(z, logits, a, b, c, eps, LOGIT_SOFTCAP, backend="ext"), device)
                        res["flow_map_step"] = {**t, "gbps": step_bytes / (t["median_ms"] * 1e6)}
                        t = time_ms(lambda: ops.vocab_argmax(logits, backend="ext"), device)
                        res["vocab_argmax"] = {**t, "gbps": am_bytes / (t["median_ms"] * 1e6)}
                        # correctness spot check in the same run, on at most 1024 rows (the tests go deeper)
                        n = min(rows, 1024)
                        sl = (z[:n], logits[:n], a[:n], b[:n], c[:n], eps[:n], LOGIT_SOFTCAP)
                        ref = ops.flow_map_step_reference(*sl)
                        got = ops.flow_map_step(*sl, backend="ext")
                        res["flow_map_step"]["rel_err"] = float((got - ref).norm() / ref.norm())  # ||.||_2 relative
                        res["flow_map_step"]["max_abs_err"] = float((got - ref).abs().max())
                        ids, _ = ops.vocab_argmax(logits, backend="ext")
                        res["vocab_argmax"]["equal_to_torch"] = bool(torch.equal(ids, torch.argmax(logits, -1)))
                        del ref, got, ids
                    _free_cache(device)
                    if _fits(device, step_bytes * 3):
                        t = time_ms(lambda: ops.flow_map_step_reference(z, logits, a, b, c, eps, LOGIT_SOFTCAP), device,
                                    warmup=2, repeats=5)
                        res["flow_map_step[eager]"] = {**t, "gbps": step_bytes / (t["median_ms"] * 1e6)}
                        t = time_ms(lambda: torch.max(logits, dim=-1), device, warmup=2, repeats=5)
                        res["vocab_argmax[eager]"] = {**t, "gbps": am_bytes / (t["median_ms"] * 1e6)}
                    else:
                        res["flow_map_step[eager]"] = {"status": "skipped", "reason": "its temporaries do not fit"}
                    for k, r in res.items():
                        if "gbps" in r:
                            r["pct_of_copy"] = 100.0 * r["gbps"] / copy["gbps"]
                    case.update(status="ok", step_bytes=step_bytes, argmax_bytes=am_bytes, results=res)
                    del logits, z, eps, a, b, c
                except Exception as e:  # recorded; the next case runs
                    case.update(_failure(e))
                _free_cache(device)
                out["cases"].append(case)
    try:
        out["vocab_pass"] = run_vocab_pass(device, tiny)
    except Exception as e:  # recorded beside the cases above
        out["vocab_pass"] = _failure(e)
    return out


# ------------------------------------------------------------------------------------------------ fused vocab pass
def run_vocab_pass(device: torch.device, tiny: bool) -> dict:
    """The fused vocabulary pass (flm_rt::vocab_pass_argmax / vocab_pass_embed, issue 17) on and off at the OWT
    shape with B = 1 (rows 1024, V 50258, D 768): "fused" is the compiled chunked pass, "whole" the reference that
    builds the [rows, V] logits. Per case: median ms, peak memory above the inputs, and the agreement of the two."""
    rows, V, D = (64, 2049, 32) if tiny else (1024, 50258, 768)
    cases = []
    for dt in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=device).manual_seed(7)
        y = torch.randn(rows, D, device=device, generator=g).to(dt)
        w = (torch.randn(V, D, device=device, generator=g) / D**0.5).to(dt)
        b = (0.1 * torch.randn(V, device=device, generator=g)).to(dt)
        e = torch.randn(V, D, device=device, generator=g)
        chunk = ops.vocab_chunk(rows=rows)
        am_cap = 0.0 if dt == torch.float32 else LOGIT_SOFTCAP  # the samplers' output_ids rule
        fns = {
            ("argmax", "fused"): lambda: ops.vocab_pass_argmax(y, w, b, am_cap, chunk=chunk, backend="ext"),
            ("argmax", "whole"): lambda: ops.vocab_pass_argmax_reference(y, w, b, am_cap),
            ("embed", "fused"): lambda: ops.vocab_pass_embed(y, w, b, e, LOGIT_SOFTCAP, chunk=chunk, backend="ext"),
            ("embed", "whole"): lambda: ops.vocab_pass_embed_reference(y, w, b, e, LOGIT_SOFTCAP),
        }
        outs = {}
        for (op, mode), fn in fns.items():
            case = {"op": op, "mode": mode, "rows": rows, "V": V, "D": D, "chunk": min(chunk, V),
                    "dtype": str(dt).replace("torch.", ""), "cap": am_cap if op == "argmax" else LOGIT_SOFTCAP}
            try:
                with torch.no_grad():
                    case.update(time_ms(fn, device, warmup=2, repeats=10))  # (warm: cuBLAS workspaces exist)
                    _free_cache(device)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        before = torch.cuda.memory_allocated(device)
                    outs[(op, mode)] = fn()
                    synchronize(device)
                    if device.type == "cuda":
                        case["peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                    case["status"] = "ok"
            except Exception as ex:  # recorded; the next case runs
                case.update(_failure(ex))
            cases.append(case)
        try:
            fa, wa = outs[("argmax", "fused")][0], outs[("argmax", "whole")][0]
            fe, we = outs[("embed", "fused")], outs[("embed", "whole")]
            agree = {"argmax_ids_agreement": float((fa == wa).float().mean()),
                     "embed_max_abs_err": float((fe - we).abs().max()),
                     "embed_rel_err": float((fe - we).norm() / we.norm())}
        except KeyError:
            agree = {}
        for c in cases[-4:]:
            c.update(agree)
        del y, w, b, e, outs
        _free_cache(device)
    for c in cases:  # fused against whole, same op and dtype
        if c["mode"] == "fused" and c.get("status") == "ok":
            for r in cases:
                if r["mode"] == "whole" and r.get("status") == "ok" and r["op"] == c["op"] and r["dtype"] == c["dtype"]:
                    c["speedup_vs_whole"] = r["median_ms"] / c["median_ms"]
    return {"cases": cases, "backend": ops.kernels_backend(device, torch.float32, "vocab_pass_argmax")}


# ------------------------------------------------------------------------------------------------ end to end
def _model(shape: str, device, dtype):
    return flm_rt.random_model(preset_config(shape), seed=0, device=device, dtype=dtype, output_scale=OUTPUT_SCALE)


def run_e2e(device: torch.device, tiny: bool) -> dict:
    from flm_rt.benchmarks.reference import reference_generate

    shapes = ["tiny"] if tiny else ["lm1b", "owt"]
    batches = [1, 4] if tiny else [1, 64]
    cases = []
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            try:
                model = _model(shape, device, dtype)
            except Exception as e:
                cases.append({"shape": shape, "dtype": str(dtype), **_failure(e)})
                continue
            cfg = model.config
            for batch in batches:
                for steps in (1, 4):
                    heavy = shape == "owt" and batch > 1
                    reps = 2 if tiny else 3 if heavy else 5
                    base = {"shape": shape, "batch": batch, "steps": steps, "L": cfg.length, "V": cfg.vocab_size,
                            "dtype": str(dtype).replace("torch.", "")}
                    def gen(**kw):
                        return lambda: flm_rt.generate(model, num_samples=batch, steps=steps, seed=1,
                                                       stochasticity=1.0, decode=False, **kw)
                    # flm_rt as users get it, then each fast path on and off (issue 17's switches)
                    rows = [("flm_rt", gen(cuda_graph=False)), ("flm_rt[embedding]", gen(cuda_graph=False,
                                                                                         noise_space="embedding"))]
                    if batch <= 16 and device.type == "cuda":
                        rows += [("flm_rt[graph]", gen(cuda_graph=True)),
                                 ("flm_rt[graph+embedding]", gen(cuda_graph=True, noise_space="embedding"))]
                    if dtype == torch.float32:  # the reference runs at its own precision: bf16 autocast on CUDA
                        gen = torch.Generator(device=device).manual_seed(1)
                        rows.append(("reference", lambda: reference_generate(model, gen, steps, 1.0, batch=batch)))
                    for name, fn in rows:
                        rec = dict(base, row=name)
                        try:
                            _free_cache(device)
                            if device.type == "cuda":
                                torch.cuda.reset_peak_memory_stats(device)
                                before = torch.cuda.memory_allocated(device)
                            t = time_ms(fn, device, warmup=1 if tiny else 2, repeats=reps)
                            rec.update(t, status="ok", ms_per_sample=t["median_ms"] / batch,
                                       tokens_per_s=batch * cfg.length / (t["median_ms"] / 1e3))
                            if device.type == "cuda":
                                peak = torch.cuda.max_memory_allocated(device)
                                rec.update(peak_mem_mb=peak / 2**20,
                                           peak_activation_mb_per_sample=(peak - before) / 2**20 / batch)
                            if name == "reference":
                                rec["reference_precision"] = "bf16 autocast" if device.type == "cuda" else "fp32"
                        except Exception as e:
                            rec.update(_failure(e))
                        cases.append(rec)
            del model
            _free_cache(device)
    for c in cases:  # speed-up of flm_rt against the reference measured beside it
        if c.get("row", "").startswith("flm_rt") and c.get("status") == "ok":
            for r in cases:
                if (r.get("row") == "reference" and r.get("status") == "ok"
                        and all(r[k] == c[k] for k in ("shape", "batch", "steps"))):
                    c.setdefault("speedup_vs_reference", r["median_ms"] / c["median_ms"])
    return {"cases": cases}


# ------------------------------------------------------------------------------------------------ golden
def golden_dir() -> Path:
    """The golden folder under $FLM_RT_SHARED (check.py sets it after finding ../shared or the staged copy)."""
    shared = os.environ.get("FLM_RT_SHARED")
    gdir = Path(shared) / "golden" / "tiny" if shared else None
    if gdir is None or not (gdir / "vectors.safetensors").is_file():
        raise FileNotFoundError(f"golden vectors not found (FLM_RT_SHARED={shared!r}): set FLM_RT_SHARED to a "
                                "folder holding golden/tiny/vectors.safetensors")
    return gdir


def run_golden(device: torch.device, tiny: bool = False) -> dict:
    from safetensors.torch import load_file

    gdir = golden_dir()
    vec = load_file(str(gdir / "vectors.safetensors"))
    out = {"golden_dir": str(gdir), "fp32": [], "bf16": []}
    for kind in ("fmlm", "flm"):
        model = flm_rt.load(gdir / f"{kind}.ckpt", device=device)
        cases = [(s, n) for s in (0.0, 0.8, 1.0) for n in (1, 2, 4, 8)] if kind == "fmlm" else [(0.0, n) for n in (1, 4, 16, 64)]
        if tiny:  # the no-GPU mode checks the mechanism, not every case (tests/test_golden.py does that)
            cases = [(s, n) for s, n in cases if n in (1, 4) and s in (0.0, 1.0)]
        for s, n in cases:
            key = f"fmlm.fp32.g{s}.steps{n}.ids" if kind == "fmlm" else f"flm.fp32.steps{n}.ids"
            for kernels in ("auto", "torch"):
                gen = flm_rt.generate(model, steps=n, stochasticity=s, noise=vec["noises"], kernels=kernels)
                want = vec[key]
                out["fp32"].append({"case": key, "kernels": kernels, "identical": bool(torch.equal(gen.token_ids, want)),
                                    "agreement": float((gen.token_ids == want).float().mean())})
    model = flm_rt.load(gdir / "fmlm.ckpt", device=device, dtype=torch.bfloat16)
    for n in (1, 4):
        key = f"fmlm.bf16autocast.g0.0.steps{n}.ids"
        if key in vec:
            gen = flm_rt.generate(model, steps=n, stochasticity=0.0, noise=vec["noises"])
            out["bf16"].append({"case": key, "agreement": float((gen.token_ids == vec[key]).float().mean())})
    out["fp32_all_identical"] = all(c["identical"] for c in out["fp32"])
    return out


# ------------------------------------------------------------------------------------------------ profile
def run_profile(device: torch.device, tiny: bool, trace: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model = _model("tiny" if tiny else "owt", device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    run = lambda: flm_rt.generate(model, num_samples=1 if not tiny else 2, steps=4, seed=0, stochasticity=1.0,  # noqa: E731
                                  decode=False)
    run()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run()
        synchronize(device)
    prof.export_chrome_trace(trace)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=15)
    return {"trace": os.path.basename(trace), "top": table}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["ops", "e2e", "golden", "profile"])
    p.add_argument("--out", required=True, help="JSON result")
    p.add_argument("--trace", default="trace.json", help="profile: where the Chrome trace goes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small shapes (the no-GPU mode of the kit)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the reference and the goldens)
    t0 = time.time()
    if a.what == "ops":
        res = run_ops(device, a.tiny)
    elif a.what == "e2e":
        res = run_e2e(device, a.tiny)
    elif a.what == "golden":
        res = run_golden(device, a.tiny)
    else:
        res = run_profile(device, a.tiny, a.trace)
    res.update(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               torch=torch.__version__, seconds=time.time() - t0)
    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k not in ("cases", "fp32", "top")}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
