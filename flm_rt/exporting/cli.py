"""``flm-rt export MODEL OUT --format ...``: the command line of :func:`flm_rt.exporting.export`."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from .. import cli_args
from .writer import FORMATS, MIN_OPSET, WHATS, export


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flm-rt export", description="Export a model to ONNX, TorchScript or an "
                                "AOTInductor package (+ a JSON sidecar <OUT>.json).")
    cli_args.add_model(p)
    p.add_argument("out", help="output file (e.g. model.onnx, model.pt, model.pt2)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--what", default="generate", choices=WHATS)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--stochasticity", type=float, default=None,
                   help="FMLM only, in [0, 1] (default: the checkpoint's, else 0)")
    p.add_argument("--batch", type=int, default=None, help="fixed batch size (default: dynamic)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (>= {MIN_OPSET})")
    p.add_argument("--self-noise", action="store_true", help="draw the noise inside the graph")
    p.add_argument("--onnx-attention", choices=["decomposed", "attention"], default=None)
    cli_args.add_device(p, default="cpu", dtype_help="float32 (default) | float16 | bfloat16 (not ONNX)")
    cli_args.add_reading(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a bar over the export stages (default: on in a terminal)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (and OUT.json)")
    return p


def cli_export(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    model = cli_args.load_model(args, dtype=None)  # loaded in fp32; --dtype is the export's compute dtype
    s = args.stochasticity
    if s is None:
        s = model.config.default_stochasticity if model.config.two_time else 0.0
    t0 = time.perf_counter()
    out = export(model, args.out, format=args.format, what=args.what, steps=args.steps, stochasticity=s,
                 batch=args.batch, seq_len=args.seq_len, dtype=args.dtype, opset=args.opset,
                 self_noise=args.self_noise, onnx_attention=args.onnx_attention,
                 progress=sys.stderr.isatty() if args.progress is None else args.progress,
                 overwrite=args.overwrite)
    print(f"wrote {out} (+ {out}.json): {args.format} {args.what}"
          + (f", {args.steps} step(s), stochasticity {s}" if args.what == "generate" else "")
          + f" in {time.perf_counter() - t0:.1f} s", file=sys.stdout)
    return 0
