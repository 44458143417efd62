#!/usr/bin/env python3
"""Run a generate graph exported by `flm-rt export` as TorchScript (.pt) or an AOTInductor package (.pt2).
Needs only torch, numpy and sidecar_io.py from this folder (not flm_rt).

    python run_torch_package.py model.pt2                    # noise from torch.randn (seed 0), batch 1
    python run_torch_package.py model.pt --batch 4 --seed 7
    python run_torch_package.py model.pt2 --noise draws.npy  # [S, B, L, V] float32 (e.g. the golden draws)
    python run_torch_package.py model.pt --json

The shapes and the number of draws come from the sidecar `<model>.json` written by the exporter.
"""
from __future__ import annotations

import os
import sys
import time

from sidecar_io import (argument_parser, batch_size, fail, first_line, load_noise, noise_shape, print_result,
                        read_sidecar)


def load(path: str, device: str):
    import torch

    try:
        if path.endswith(".pt2"):
            # AOTInductor packages check input shapes only when asked to (read once, at the first call): always
            # ask, whatever the environment says, or a wrong-shaped input is read past its end
            os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"
            import torch._inductor

            runner = torch._inductor.aoti_load_package(path)
            return lambda x: runner(x)
        module = torch.jit.load(path, map_location=device)
    except Exception as e:  # truncated or foreign files fail in many ways
        fail(f"cannot load {path} (corrupt, or not an exported flm_rt graph): {first_line(e)}")
    fn = getattr(module, "generate", None) or module.forward
    return fn


def main(argv=None) -> int:
    p = argument_parser(__doc__.split("\n")[0], ".pt (TorchScript) or .pt2 (AOTInductor package); <model>.json "
                        "beside it", "torch.manual_seed for generated noise")
    p.add_argument("--device", default="cpu", help="device the package was compiled for (AOTI) / to map to")
    args = p.parse_args(argv)

    import torch

    meta = read_sidecar(args.model)
    fixed = meta.get("batch")
    batch = batch_size(meta, args.batch)
    run = load(args.model, args.device)
    try:
        if meta.get("self_noise"):
            torch.manual_seed(args.seed)
            x = torch.zeros(batch, dtype=torch.int64, device=args.device)
        elif args.noise:
            x = torch.from_numpy(load_noise(args.noise, meta)).to(args.device)
        else:
            g = torch.Generator().manual_seed(args.seed)
            x = torch.randn(*noise_shape(meta, batch), generator=g).to(args.device)
    except (MemoryError, RuntimeError) as e:
        fail(f"cannot make the input: {first_line(e, 200)}")
    # Every input is checked here, whatever the graph itself checks: a graph run on a wrong shape may read past it.
    want = [meta["draws"], fixed, meta["length"], meta["vocab_size"]] if not meta.get("self_noise") else [fixed]
    bdim = 1 if not meta.get("self_noise") else 0
    if x.dim() != len(want) or any(w is not None and w != n for w, n in zip(want, x.shape)) or x.shape[bdim] < 1:
        fail(f"input has shape {list(x.shape)}, the graph takes {['B' if w is None else w for w in want]} "
             f"with B >= 1 (see {args.model}.json)")
    n = x.shape[bdim]
    if args.model.endswith(".pt2") and not fixed and n == 1:
        # torch.export specialises sizes 0 and 1, so a dynamic-batch package takes B >= 2: run the one sample
        # twice and keep the first row
        x = torch.cat([x, x], dim=bdim)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            ids = run(x)
    except Exception as e:
        fail(f"the exported graph refused the input: {first_line(e)}")
    if isinstance(ids, (list, tuple)):
        ids = ids[0]
    ids = ids[:n]
    elapsed = time.perf_counter() - t0
    runtime = "AOTInductor" if args.model.endswith(".pt2") else "TorchScript"
    print_result(ids.cpu().tolist(), elapsed, meta, args.json, runtime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
