"""The ``flm-rt`` command line: generate, convert, info, demo; export, bench and profile delegate to their modules."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from .errors import CheckpointError, FlmError

DEMO_DIR_ENV = "FLM_RT_DEMO_MODEL"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 (default) | bfloat16 | float16 (mixed precision)")
    p.add_argument("--n-heads", type=int, default=None, help="override the number of attention heads")
    p.add_argument("--no-ema", action="store_true", help="use the training weights instead of the EMA weights")


def _load(args):
    from .api import load

    return load(args.model, device=args.device, dtype=args.dtype, n_heads=args.n_heads, use_ema=not args.no_ema)


def _print_generation(model, gen, as_json: bool) -> None:
    if as_json:
        print(json.dumps({
            "model": model.source, "steps": gen.steps, "stochasticity": gen.stochasticity, "seed": gen.seed,
            "device": gen.device, "dtype": gen.dtype, "elapsed_s": gen.elapsed_s, "tokens_per_s": gen.tokens_per_s,
            "ms_per_token": gen.ms_per_token, "token_ids": gen.token_ids.tolist(), "text": gen.text,
            "text_unavailable_reason": gen.text_unavailable_reason,
        }))
        return
    b, length = gen.token_ids.shape
    for k in range(b):
        print(f"=== sample {k} ===")
        if gen.text is not None:
            print(gen.text[k])
        else:
            print(" ".join(str(i) for i in gen.token_ids[k].tolist()))
    if gen.text is None and gen.text_unavailable_reason:
        print(f"[no text: {gen.text_unavailable_reason}]")
    print(f"[{b} x {length} tokens, {gen.steps} step(s), stochasticity {gen.stochasticity}, seed {gen.seed}, "
          f"{gen.device}/{gen.dtype}: {gen.elapsed_s * 1e3:.1f} ms, {gen.ms_per_token:.4f} ms/token, "
          f"{gen.tokens_per_s:,.0f} tokens/s]")


def cmd_generate(args) -> int:
    from .api import generate

    model = _load(args)
    gen = generate(model, num_samples=args.num_samples, steps=args.steps, stochasticity=args.stochasticity,
                   seq_len=args.seq_len, seed=args.seed, kernels=args.kernels, noise_space=args.noise_space)
    _print_generation(model, gen, args.json)
    return 0


def cmd_convert(args) -> int:
    from .api import convert

    out = convert(args.src, args.dst, dtype=args.dtype, n_heads=args.n_heads, use_ema=not args.no_ema,
                  overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_info(args) -> int:
    from ._ext import build_info

    model = _load(args)
    info = model.info()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    c = info["config"]
    print(f"model       {info['source']}  ({info['format']}, {info['weights']} weights)")
    print(f"kind        {info['kind']}")
    print(f"shape       V={c['vocab_size']} L={c['length']} D={c['hidden_size']} blocks={c['n_blocks']} "
          f"heads={c['n_heads']} cond={c['cond_dim']}")
    print(f"parameters  {info['parameters']:,}")
    print(f"tokenizer   {info['tokenizer']}")
    print(f"sampling    default stochasticity {c['default_stochasticity']}")
    print(f"runtime     {info['device']}/{info['dtype']}; {build_info(short=True)}")
    print("formats     reads: Lightning .ckpt (safe), hub dir, flm_rt dir; writes: flm_rt dir (convert), "
          "ONNX / TorchScript / AOTInductor (export)")
    for note in info["notes"]:
        print(f"note        {note}")
    return 0


def demo_model_path() -> str:
    """The small default model: random weights, created by flm_rt and saved in its own format on first use."""
    from .api import random_model
    from .model import ModelConfig

    path = os.environ.get(DEMO_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flm_rt", "demo-random-gpt2-v1")
    if not os.path.isdir(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create the demo model's folder {os.path.dirname(path)}: "
                                  f"{e.strerror or e}") from None
        cfg = ModelConfig(vocab_size=50258, length=128, hidden_size=128, n_blocks=2, n_heads=4, cond_dim=64,
                          two_time=True, tokenizer="gpt2")
        try:
            random_model(cfg, seed=0, device="cpu", output_scale=8.0).save(path)
        except CheckpointError:
            if not os.path.isfile(os.path.join(path, "flm_rt.json")):  # not another process's finished copy
                raise
    return path


def cmd_demo(args) -> int:
    from .api import generate, load

    path = demo_model_path()
    print(f"flm_rt demo: a small two-time (FMLM) model with RANDOM weights (not trained), V=50258 (GPT-2 BPE), "
          f"L=128, saved at {path}. The text is therefore gibberish; the point is the pipeline and its speed.")
    model = load(path, device=args.device)
    generate(model, num_samples=1, steps=1, seed=0)  # warm-up
    gen = generate(model, num_samples=args.num_samples, steps=args.steps, seed=args.seed)
    _print_generation(model, gen, as_json=False)
    return 0


def _delegate(module: str, func: str):
    def run(args) -> int:
        import importlib

        return importlib.import_module(module).__getattribute__(func)(args.rest)
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flm-rt", description="Run FLM / FMLM text generators.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("model", help=".ckpt file, hub directory or flm_rt directory")
    g.add_argument("-n", "--num-samples", type=int, default=4)
    g.add_argument("--steps", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stochasticity", type=float, default=None, help="FMLM only, in [0, 1]")
    g.add_argument("--seq-len", type=int, default=None)
    g.add_argument("--kernels", choices=["auto", "torch", "ext"], default=None)
    g.add_argument("--noise-space", choices=["vocab", "embedding"], default="vocab",
                   help="embedding: same distribution, faster (no [B, L, V] noise); other draws per seed")
    g.add_argument("--json", action="store_true", help="one JSON object on stdout")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="convert a checkpoint to flm_rt's format (safetensors + JSON)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default=None, help="store weights as float32 | bfloat16 | float16")
    c.add_argument("--n-heads", type=int, default=None)
    c.add_argument("--no-ema", action="store_true")
    c.add_argument("--overwrite", action="store_true", help="replace an existing flm_rt model at DST")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="architecture, parameter count, tokenizer, formats")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    _add_model_args(i)
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="generate from the small built-in random-weight model")
    d.add_argument("-n", "--num-samples", type=int, default=2)
    d.add_argument("--steps", type=int, default=1)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default=None)
    d.set_defaults(func=cmd_demo)

    for name, module, func, helptext in (
        ("export", "flm_rt.export", "cli_export", "export ONNX / TorchScript / AOTInductor graphs"),
        ("bench", "flm_rt.benchmarks.cli", "cli_bench", "run the benchmark suite, write JSON/Markdown/PNG"),
        ("profile", "flm_rt.profiling", "cli_profile", "torch.profiler trace and top kernels"),
    ):
        e = sub.add_parser(name, help=helptext, add_help=False)
        e.add_argument("rest", nargs=argparse.REMAINDER)
        e.set_defaults(func=_delegate(module, func))
    return p


_DELEGATED = {"export": ("flm_rt.export", "cli_export"), "bench": ("flm_rt.benchmarks.cli", "cli_bench"),
              "profile": ("flm_rt.profiling", "cli_profile")}


def _run_reporting(func, *args) -> int:
    """The CLI's one error path: FlmError (bad input) -> one line, exit 2; anything else is a bug in flm_rt ->
    one line asking for a report, exit 1 (FLM_RT_DEBUG=1 shows the traceback)."""
    try:
        return func(*args)
    except FlmError as e:
        print(f"flm-rt: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message holds
        return 2
    except KeyboardInterrupt:
        return 130
    except MemoryError:
        print("flm-rt: error: out of memory; use a smaller request (fewer samples, shorter seq_len)", file=sys.stderr)
        return 2
    except Exception as e:
        if os.environ.get("FLM_RT_DEBUG", "").strip() not in ("", "0"):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"flm-rt: internal error: {type(e).__name__}: {first} (this is a bug in flm_rt; please report it with "
              "the command line; FLM_RT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:  # their own parsers take every option (argparse REMAINDER would not)
        import importlib

        module, func = _DELEGATED[argv[0]]
        return _run_reporting(lambda: getattr(importlib.import_module(module), func)(argv[1:]))
    args = build_parser().parse_args(argv)
    return _run_reporting(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
