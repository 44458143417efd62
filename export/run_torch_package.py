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

MAX_BATCH = 65536


def fail(msg: str):
    """Bad input: one line on stderr, exit status 2."""
    print(f"run_torch_package: {msg}", file=sys.stderr)
    sys.exit(2)


def load(path: str, device: str):
    import torch

    if not os.path.isfile(path):
        fail(f"model file {path} not found")
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
        fail(f"cannot load {path} (corrupt, or not an exported flm_rt graph): {str(e).strip().splitlines()[0][:300]}")
    fn = getattr(module, "generate", None) or module.forward
    return fn


def check_batch_arg(value: str) -> int:
    try:
        b = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if not 1 <= b <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"must be in [1, {MAX_BATCH}], got {b}")
    return b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help=".pt (TorchScript) or .pt2 (AOTInductor package); <model>.json beside it")
    p.add_argument("--noise", help=".npy file of standard-normal draws [S, B, L, V] (the first S are used)")
    p.add_argument("--batch", type=check_batch_arg, default=None)
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for generated noise")
    p.add_argument("--device", default="cpu", help="device the package was compiled for (AOTI) / to map to")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    side = args.model + ".json"
    if not os.path.isfile(args.model):
        fail(f"model file {args.model} not found")
    if not os.path.isfile(side):
        fail(f"sidecar {side} not found (written by flm-rt export beside the model)")
    try:
        with open(side) as f:
            meta = json.load(f)
        draws, length, vocab = (int(meta[k]) for k in ("draws", "length", "vocab_size"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"cannot read the sidecar {side} ({type(e).__name__}: {e}); was it written by flm-rt export?")
    if meta.get("what") != "generate":
        fail("this is a denoiser graph; this script runs generate graphs")
    fixed = meta.get("batch")
    batch = args.batch if args.batch is not None else (fixed or 1)
    if fixed and batch != fixed:
        fail(f"this graph was exported for batch {fixed}; got --batch {batch}")
    run = load(args.model, args.device)
    try:
        if meta.get("self_noise"):
            torch.manual_seed(args.seed)
            x = torch.zeros(batch, dtype=torch.int64, device=args.device)
        elif args.noise:
            try:
                arr = np.load(args.noise, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                fail(f"cannot read --noise {args.noise}: {e}")
            if not np.issubdtype(arr.dtype, np.floating):
                fail(f"--noise must hold floating-point draws, got {arr.dtype}")
            if arr.ndim != 4 or arr.shape[0] < draws:
                fail(f"--noise must be [S, B, L, V] with S >= {draws}, got {list(arr.shape)}")
            arr = np.ascontiguousarray(arr[:draws], dtype=np.float32)
            if not np.isfinite(arr).all():
                fail("--noise contains NaN or infinite values")
            x = torch.from_numpy(arr).to(args.device)
        else:
            g = torch.Generator().manual_seed(args.seed)
            x = torch.randn(draws, batch, length, vocab, generator=g).to(args.device)
    except (MemoryError, RuntimeError) as e:
        fail(f"cannot make the input: {str(e).strip().splitlines()[0][:200]}")
    # Every input is checked here, whatever the graph itself checks: a graph run on a wrong shape may read past it.
    want = [draws, fixed, length, vocab] if not meta.get("self_noise") else [fixed]
    bdim = 1 if not meta.get("self_noise") else 0
    if x.dim() != len(want) or any(w is not None and w != n for w, n in zip(want, x.shape)) or x.shape[bdim] < 1:
        fail(f"input has shape {list(x.shape)}, the graph takes {['B' if w is None else w for w in want]} "
             f"with B >= 1 (see {side})")
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
        fail(f"the exported graph refused the input: {str(e).strip().splitlines()[0][:300]}")
    if isinstance(ids, (list, tuple)):
        ids = ids[0]
    ids = ids[:n]
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
