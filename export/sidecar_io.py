"""What the standalone consumers of exported generate graphs (run_onnx.py, run_torch_package.py) share: the command
line, the sidecar `<model>.json` written by `flm-rt export`, --noise files, and printing the result.

Needs only numpy and the standard library (not flm_rt, not torch). The consumers run as scripts, so this file is
imported from the script's own folder (Python puts it first on sys.path); keep it beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

import numpy as np

MAX_BATCH = 65536


def prog() -> str:
    """The running script's name without .py, e.g. run_onnx (the prefix of its error lines)."""
    return os.path.splitext(os.path.basename(sys.argv[0] or "export"))[0]


def fail(msg: str) -> NoReturn:
    """Bad input: one line on stderr, exit status 2."""
    print(f"{prog()}: {msg}", file=sys.stderr)
    sys.exit(2)


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (runtimes put pages of context after it)."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


def check_batch_arg(value: str) -> int:
    try:
        b = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if not 1 <= b <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"must be in [1, {MAX_BATCH}], got {b}")
    return b


def argument_parser(description: str, model_help: str, seed_help: str) -> argparse.ArgumentParser:
    """model, --noise, --batch, --seed, --json; a consumer adds its own options."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("model", help=model_help)
    p.add_argument("--noise", help=".npy file of standard-normal draws [S, B, L, V] (the first S are used)")
    p.add_argument("--batch", type=check_batch_arg, default=None, help="batch size when the noise is generated here")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def read_sidecar(model_path: str) -> dict:
    """The sidecar of a generate graph, checked: `what` == "generate" and positive int draws / length / vocab_size."""
    path = model_path + ".json"
    if not os.path.isfile(model_path):
        fail(f"model file {model_path} not found")
    if not os.path.isfile(path):
        fail(f"sidecar {path} not found (it is written by flm-rt export next to the graph)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read the sidecar {path}: {e}")
    if not isinstance(meta, dict) or not isinstance(meta.get("what"), str):
        fail(f"sidecar {path} does not say what the graph is; was it written by flm-rt export?")
    if meta["what"] != "generate":
        fail(f"this is a {meta['what']} graph (what={meta['what']} in {path}); {prog()}.py runs generate graphs")
    need = ("draws", "length", "vocab_size")
    if any(type(meta.get(k)) is not int or meta[k] < 1 for k in need):
        fail(f"sidecar {path} lacks {', '.join(need)} (positive integers); was it written by flm-rt export?")
    return meta


def batch_size(meta: dict, requested: int | None) -> int:
    """--batch, or the batch the graph was exported for (else 1); a fixed-batch graph takes only its own."""
    fixed = meta.get("batch")
    b = requested if requested is not None else (fixed or 1)
    if fixed and b != fixed:
        fail(f"this graph was exported for batch {fixed}; got --batch {b}")
    return b


def noise_shape(meta: dict, batch: int) -> tuple[int, int, int, int]:
    """[S, B, L, V] of the standard-normal draws a generate graph takes."""
    return meta["draws"], batch, meta["length"], meta["vocab_size"]


def load_noise(path: str, meta: dict) -> np.ndarray:
    """The first S draws of a .npy file, float32 contiguous, checked against the sidecar (S, L, V, fixed batch)."""
    want = noise_shape(meta, meta.get("batch") or 1)
    try:
        noise = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        fail(f"cannot read --noise {path}: {e}")
    if noise.ndim != 4 or noise.shape[0] < want[0] or tuple(noise.shape[2:]) != want[2:] or noise.shape[1] < 1:
        fail(f"--noise must be [S, B, L, V] with S >= {want[0]}, B >= 1, L = {want[2]}, V = {want[3]}; "
             f"got {list(noise.shape)}")
    if meta.get("batch") and noise.shape[1] != meta["batch"]:
        fail(f"this graph was exported for batch {meta['batch']}; --noise has batch {noise.shape[1]}")
    if not np.issubdtype(noise.dtype, np.floating):
        fail(f"--noise must hold floating-point draws, got {noise.dtype}")
    noise = np.ascontiguousarray(noise[: want[0]], dtype=np.float32)
    if not np.isfinite(noise).all():
        fail("--noise contains NaN or infinite values")
    return noise


def print_result(ids: list[list[int]], elapsed_s: float, meta: dict, as_json: bool, runtime: str,
                 texts: list[str] | None = None, **json_fields) -> None:
    """One JSON object (token_ids, the json_fields, elapsed_s) on stdout, or each sample (its text when texts is
    given, else its ids) and a one-line summary on stderr."""
    if as_json:
        print(json.dumps({"token_ids": ids, **json_fields, "elapsed_s": elapsed_s}))
        return
    for k, row in enumerate(ids):
        print(f"=== sample {k} ===")
        print(texts[k] if texts is not None else " ".join(str(i) for i in row))
    print(f"[{len(ids)} x {len(ids[0]) if ids else 0} tokens, {meta.get('steps')} step(s), {runtime}: "
          f"{elapsed_s * 1e3:.1f} ms]", file=sys.stderr)
