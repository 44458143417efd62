"""Running what ``export()`` wrote: read its sidecar, load it as a function of tensors, time a generate graph."""
from __future__ import annotations

import json
import os
import time
import warnings
from typing import Optional

import torch

from ..errors import ExportError


def read_sidecar(path) -> dict:
    """The JSON sidecar ``<path>.json`` written next to an exported artifact."""
    side = os.fspath(path) + ".json"
    if not os.path.isfile(side):
        raise ExportError(f"no sidecar {side}: was {path} written by flm_rt.export?")
    with open(side) as f:
        return json.load(f)


def load_exported(path, *, threads: Optional[int] = None):
    """Load an exported generate or denoiser artifact (.onnx via onnxruntime, TorchScript .pt, AOTInductor .pt2)
    as a function of torch tensors returning a torch tensor (CPU for ONNX). AOTI input checks are turned on."""
    path = os.fspath(path)
    meta = read_sidecar(path)
    fmt = meta["format"]
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]

        def run_onnx(*args):
            feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
            return torch.from_numpy(sess.run(None, feeds)[0])
        return run_onnx
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(path)
        return module.forward
    if fmt == "aoti":
        os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"  # always: unchecked, a wrong shape is read past its end
        from torch._inductor import aoti_load_package

        return aoti_load_package(path)
    raise ExportError(f"unknown format {fmt!r} in {path}.json")


def time_exported(path, *, batch: int = 1, repeats: int = 10, warmup: int = 2, seed: int = 0,
                  threads: Optional[int] = None, noise: Optional[torch.Tensor] = None) -> dict:
    """Time an exported generate graph on standard-normal noise (drawn once, outside the timing).

    Returns ``{"format", "steps", "batch", "length", "median_s", "min_s", "tokens_per_s", "ms_per_token",
    "times_s"}``. ``threads`` sets ONNX Runtime's intra-op threads (torch's are left as they are)."""
    meta = read_sidecar(path)
    if meta.get("what") != "generate":
        raise ExportError("time_exported times generate graphs")
    run = load_exported(path, threads=threads)
    b = meta.get("batch") or batch
    if meta.get("self_noise"):
        x = torch.zeros(b, dtype=torch.int64)
    elif noise is not None:
        x = noise[: meta["draws"]].contiguous()
        b = x.shape[1]
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(meta["draws"], b, meta["length"], meta["vocab_size"], generator=g)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            run(x)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    n_tok = b * meta["length"]
    return {"format": meta["format"], "steps": meta["steps"], "batch": b, "length": meta["length"],
            "median_s": med, "min_s": times[0], "tokens_per_s": n_tok / med, "ms_per_token": 1e3 * med / n_tok,
            "times_s": times}
