#!/usr/bin/env python3
"""Run a generate graph exported by `flm-rt export` as TorchScript (.pt) or an AOTInductor package (.pt2).
Needs only torch and numpy (not flm_rt).

    python run_torch_package.py model.pt2                    # noise from torch.randn (seed 0), batch 1
    python run_torch_package.py model.pt --batch 4 --seed 7
    python run_torch_package.py model.pt2 --noise draws.npy  # [S, B, L, V] float32 (e.g. the golden draws)
    python run_torch_package.py model.pt --json

The shapes and the number of draws come from the sidecar `<model>.json` written by the exporter.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def load(path: str, device: str):
    import torch

    if path.endswith(".pt2"):
        # AOTInductor packages check input shapes only when asked to (read once, at the first call)
        os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
        import torch._inductor

        runner = torch._inductor.aoti_load_package(path)
        return lambda x: runner(x)
    module = torch.jit.load(path, map_location=device)
    fn = getattr(module, "generate", None) or module.forward
    return fn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help=".pt (TorchScript) or .pt2 (AOTInductor package); <model>.json beside it")
    p.add_argument("--noise", help=".npy file of standard-normal draws [S, B, L, V] (the first S are used)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for generated noise")
    p.add_argument("--device", default="cpu", help="device the package was compiled for (AOTI) / to map to")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    side = args.model + ".json"
    if not os.path.isfile(side):
        sys.exit(f"run_torch_package: sidecar {side} not found (written by flm-rt export beside the model)")
    with open(side) as f:
        meta = json.load(f)
    if meta.get("what") != "generate":
        sys.exit("run_torch_package: this is a denoiser graph; this script runs generate graphs")
    run = load(args.model, args.device)
    batch = args.batch or meta.get("batch") or 1
    if meta.get("self_noise"):
        torch.manual_seed(args.seed)
        x = torch.zeros(batch, dtype=torch.int64, device=args.device)
    elif args.noise:
        arr = np.load(args.noise).astype(np.float32, copy=False)
        if arr.ndim != 4 or arr.shape[0] < meta["draws"]:
            sys.exit(f"run_torch_package: --noise must be [S, B, L, V] with S >= {meta['draws']}, "
                     f"got {list(arr.shape)}")
        x = torch.from_numpy(np.ascontiguousarray(arr[: meta["draws"]])).to(args.device)
    else:
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(meta["draws"], batch, meta["length"], meta["vocab_size"], generator=g).to(args.device)
    want = [meta["draws"], None, meta["length"], meta["vocab_size"]] if not meta.get("self_noise") else [None]
    if x.dim() != len(want) or any(w is not None and w != n for w, n in zip(want, x.shape)):
        sys.exit(f"run_torch_package: input has shape {list(x.shape)}, the graph takes "
                 f"{['B' if w is None else w for w in want]} (see {side})")
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            ids = run(x)
    except Exception as e:
        sys.exit(f"run_torch_package: the exported graph refused the input: {str(e).strip().splitlines()[0]}")
    if isinstance(ids, (list, tuple)):
        ids = ids[0]
    elapsed = time.perf_counter() - t0
    ids = ids.cpu()
    if args.json:
        print(json.dumps({"token_ids": ids.tolist(), "elapsed_s": elapsed}))
        return 0
    for k, row in enumerate(ids.tolist()):
        print(f"=== sample {k} ===")
        print(" ".join(str(i) for i in row))
    print(f"[{ids.shape[0]} x {ids.shape[1]} tokens, {meta['steps']} step(s): {elapsed * 1e3:.1f} ms]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
