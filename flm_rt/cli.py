"""The ``flm-rt`` command line: generate, convert, info, models, demo; export, bench and profile delegate to their
modules. Every command that takes a model takes a local path or a Hugging Face Hub name (see ``flm-rt models``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from . import cli_args
from .errors import CheckpointError, FlmError, GenerationError

DEMO_DIR_ENV = "FLM_RT_DEMO_MODEL"


def _print_generation(model, gen, as_json: bool, timing: Optional[dict] = None) -> None:
    if as_json:
        print(json.dumps({
            "model": model.source, "steps": gen.steps, "stochasticity": gen.stochasticity, "seed": gen.seed,
            "device": gen.device, "dtype": gen.dtype, "elapsed_s": gen.elapsed_s, "tokens_per_s": gen.tokens_per_s,
            "ms_per_token": gen.ms_per_token, "token_ids": gen.token_ids.tolist(), "text": gen.text,
            "text_unavailable_reason": gen.text_unavailable_reason, **(timing or {}),
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
    if timing:
        cold = timing["first_call_s"]
        warm = timing["warm_calls_s"]
        print(f"[load {timing['load_s']:.2f} s ({model.source}); "
              + (f"first call {cold * 1e3:.1f} ms (cold, 1-step warm-up, not counted); " if cold is not None
                 else "no warm-up: the timed call was the cold first call; ")
              + (f"warm calls {', '.join(f'{w * 1e3:.1f}' for w in warm)} ms "
                 f"(median {timing['warm_median_s'] * 1e3:.1f})" if len(warm) > 1 else f"timed call {warm[0] * 1e3:.1f} ms")
              + "]")


def _show_step(tokenizer):
    """--show-steps: the text (or ids) of every sample after each step, on stderr."""
    from tqdm import tqdm

    def show(step: int, t: float, ids) -> None:
        lines = [f"--- step {step + 1} (t = {t:.4f}) ---"]
        for k, row in enumerate(ids.tolist()):
            lines.append(f"[{k}] " + (tokenizer.decode(row) if tokenizer is not None else " ".join(map(str, row))))
        tqdm.write("\n".join(lines), file=sys.stderr)  # above a --progress bar, not through it

    return show


def cmd_generate(args) -> int:
    import statistics
    import time

    from . import hub
    from .api import generate
    from .limits import MAX_SAMPLES
    from .noise import check_int
    from .samplers import check_settings

    if args.repeat < 1:
        raise GenerationError(f"--repeat must be >= 1, got {args.repeat}")
    steps = args.steps
    if steps is None:
        published = hub.find_published(args.model) if not os.path.exists(args.model) else None
        steps = published.default_steps if published else 1
    # settings that do not depend on the model are refused before it is loaded (seconds for a large checkpoint)
    check_settings(two_time=True, steps=steps, stochasticity=0.0 if args.stochasticity is None else args.stochasticity)
    check_int("num_samples", args.num_samples, 1, MAX_SAMPLES)
    t0 = time.perf_counter()
    model = cli_args.load_model(args)
    load_s = time.perf_counter() - t0
    progress = args.progress if args.progress is not None else (sys.stderr.isatty() and steps >= 64)
    cold_s = None
    if not args.no_warmup:  # the first call pays one-time costs (prepacking, allocations); time it apart
        cold_s = model.warmup(args.num_samples, 1, seq_len=args.seq_len, noise_space=args.noise_space,
                              kernels=args.kernels)
    callback = _show_step(model.tokenizer) if args.show_steps else None
    runs = []
    for _ in range(args.repeat):
        gen = generate(model, num_samples=args.num_samples, steps=steps, stochasticity=args.stochasticity,
                       seq_len=args.seq_len, seed=args.seed, kernels=args.kernels, noise_space=args.noise_space,
                       callback=callback, progress=progress)
        runs.append(gen.elapsed_s)
    timing = {"load_s": load_s, "first_call_s": cold_s, "warm_calls_s": runs,
              "warm_median_s": statistics.median(runs)}
    _print_generation(model, gen, args.json, timing)
    return 0


def cmd_convert(args) -> int:
    from .api import convert

    out = convert(args.src, args.dst, dtype=args.dtype, n_heads=args.n_heads, use_ema=not args.no_ema,
                  overwrite=args.overwrite, **cli_args.hub_kwargs(args))
    print(f"wrote {out}")
    return 0


def cmd_info(args) -> int:
    from ._ext import build_info

    model = cli_args.load_model(args)
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
    print("formats     reads: Hub names, Lightning .ckpt (safe), hub dir, flm_rt dir; writes: hub dir (convert), "
          "ONNX / TorchScript / AOTInductor (export)")
    for note in info["notes"]:
        print(f"note        {note}")
    return 0


def cmd_models(args) -> int:
    from . import hub

    folder = hub.cache_folder(args.cache_dir)
    rows = [{**m.__dict__, "cached": hub.is_cached(m.repo_id, m.revision, args.cache_dir)} for m in hub.PUBLISHED]
    if args.json:
        print(json.dumps({"cache_folder": folder, "models": rows}, indent=1))
        return 0
    print(f"{'repo':<24}{'alias':<11}{'kind':<6}{'data':<13}{'tokenizer':<19}{'L':>5}{'steps':>7}  "
          f"{'revision':<9}cached")
    for r in rows:
        print(f"{r['repo_id']:<24}{r['alias']:<11}{r['kind']:<6}{r['dataset']:<13}{r['tokenizer']:<19}"
              f"{r['length']:>5}{r['default_steps']:>7}  {r['revision'][:7]:<9}{'yes' if r['cached'] else 'no'}")
    print(f"cache folder: {folder}  (load by repo id or alias; the first use downloads config.json + "
          "model.safetensors)")
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
            from .loading import written_by_flm_rt

            if not written_by_flm_rt(path):  # not another process's finished copy
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


# Commands with parsers of their own: main() hands them their argv untouched (argparse REMAINDER would not pass
# every option through); build_parser() lists them for --help.
_DELEGATED = {
    "export": ("flm_rt.exporting.cli", "cli_export", "export ONNX / TorchScript / AOTInductor graphs"),
    "bench": ("flm_rt.benchmarks.cli", "cli_bench", "run the benchmark suite, write JSON/Markdown/PNG"),
    "profile": ("flm_rt.profiling", "cli_profile", "torch.profiler trace and top kernels"),
    "serve": ("flm_rt.serving.server", "cli_serve", "OpenAI-compatible HTTP server with dynamic batching"),
}


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(prog="flm-rt", description="Run FLM / FMLM text generators.")
    p.add_argument("--version", action="version", version=f"flm-rt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a checkpoint or a Hub name")
    cli_args.add_model(g)
    g.add_argument("-n", "--num-samples", type=int, default=4)
    g.add_argument("--steps", type=int, default=None,
                   help="network calls (default: the paper's for a published model, else 1)")
    cli_args.add_seed(g)
    g.add_argument("--stochasticity", type=float, default=None, help="FMLM only, in [0, 1]")
    g.add_argument("--seq-len", type=int, default=None)
    cli_args.add_kernels(g)
    g.add_argument("--noise-space", choices=["vocab", "embedding"], default="vocab",
                   help="embedding: same distribution, faster (no [B, L, V] noise); other draws per seed")
    g.add_argument("--json", action="store_true", help="one JSON object on stdout")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar over the steps (default: on in a terminal for 64+ steps)")
    g.add_argument("--show-steps", action="store_true", help="print the text (argmax of the state) after each step, "
                                                             "on stderr")
    g.add_argument("--repeat", type=int, default=1, help="timed (warm) generations; the text is the last one's")
    g.add_argument("--no-warmup", action="store_true", help="time the cold first call instead of warming up")
    cli_args.add_device(g)
    cli_args.add_reading(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="convert a checkpoint or Hub name to the hub layout "
                                        "(model.safetensors + config.json)")
    c.add_argument("src", help=cli_args.MODEL_HELP)
    c.add_argument("dst", help="the output folder")
    c.add_argument("--dtype", default=None, help="store weights as float32 | bfloat16 | float16")
    cli_args.add_reading(c)
    c.add_argument("--overwrite", action="store_true", help="replace an existing flm_rt model at DST")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="architecture, parameter count, tokenizer, formats")
    cli_args.add_model(i)
    i.add_argument("--json", action="store_true")
    cli_args.add_device(i)
    cli_args.add_reading(i)
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("models", help="the published models, their pinned revisions and whether each is cached")
    m.add_argument("--cache-dir", default=None)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    d = sub.add_parser("demo", help="generate from the small built-in random-weight model")
    d.add_argument("-n", "--num-samples", type=int, default=2)
    d.add_argument("--steps", type=int, default=1)
    cli_args.add_seed(d)
    d.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    d.set_defaults(func=cmd_demo)

    for name, (_, _, helptext) in _DELEGATED.items():
        e = sub.add_parser(name, help=helptext, add_help=False)
        e.add_argument("rest", nargs=argparse.REMAINDER)
    return p



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

        module, func, _ = _DELEGATED[argv[0]]
        return _run_reporting(lambda: getattr(importlib.import_module(module), func)(argv[1:]))
    args = build_parser().parse_args(argv)
    return _run_reporting(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
