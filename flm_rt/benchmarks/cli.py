"""``flm-rt bench``: run the benchmark suite and write results.json / results.md / plots."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional, Sequence

from .. import cli_args
from ..model import PRESET_SHAPES
from .suite import ALL_ROWS, AR_ROW, BF16_EMB_ROW, BF16_ROWS, EMB_ROW, EXPORT_ROWS, MODEL_SHAPE

QUICK_HELP = ("a subset that finishes in under 10 minutes on a 2-core CPU: lm1b batch 1 at steps 1,2,4,8 (reference, "
              "flm_rt) and at 1 step (flm_rt[torch-kernels], flm_rt[embedding-noise], the bf16 rows, onnx when "
              "onnxruntime is installed); owt batch 1 at 1 step (reference, flm_rt, flm_rt[embedding-noise], "
              "flm_rt[bfloat16+embedding-noise]); the autoregressive baseline generating 1024 tokens; 3 warm-ups "
              "and 5 timed runs per case (median, min-max, IQR)")


def _ints(s: str) -> list:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def _names(known: Sequence[str]):
    def parse(s: str) -> list:
        out = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in out if x not in known]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"unknown {bad or s!r}; choose from {', '.join(known)}")
        return out
    return parse


def _cases(s: str) -> list:
    """'shapes:rows:steps:batches;...' -> [(shape, row, steps or None, batch), ...] in the given order."""
    out = []
    for group in filter(None, (g.strip() for g in s.split(";"))):
        parts = group.split(":")
        if len(parts) != 4:
            raise argparse.ArgumentTypeError(f"case group {group!r} must be SHAPES:ROWS:STEPS:BATCHES")
        shapes = _names(list(PRESET_SHAPES))(parts[0])
        rows = _names(ALL_ROWS)(parts[1])
        steps = [None] if parts[2].strip() == "-" else _ints(parts[2])
        batches = _ints(parts[3])
        for shape in shapes:
            for b in batches:
                for n in steps:
                    for row in rows:
                        if (n is None) != (row == AR_ROW):
                            raise argparse.ArgumentTypeError(
                                f"case group {group!r}: steps are '-' exactly for the {AR_ROW} row")
                        out.append((shape, row, n, b))
    if not out:
        raise argparse.ArgumentTypeError("--cases is empty")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flm-rt bench",
        description="Time flm_rt against the research-code sampler, exported graphs and an autoregressive LM; "
                    "write results.json, results.md and plots under bench/results/<device>/. "
                    "`flm-rt bench serve --help`: the HTTP server load test.")
    p.add_argument("--quick", action="store_true", help=QUICK_HELP)
    p.add_argument("--shapes", type=_names(list(PRESET_SHAPES)), default=None,
                   help=f"comma-separated from {', '.join(PRESET_SHAPES)} (default lm1b,owt)")
    p.add_argument("--model", default=None, metavar="PATH_OR_NAME",
                   help="bench this checkpoint (a path in any format flm_rt.load reads, or a Hub name / alias) "
                        "instead of random models of --shapes; "
                        "its rows are labelled shape 'model'")
    p.add_argument("--steps", type=_ints, default=None, help="comma-separated step counts (default 1,2,4,8)")
    p.add_argument("--batch", type=_ints, default=None, help="comma-separated batch sizes (default 1,8 on CPU, "
                                                             "1,8,64 on GPU)")
    p.add_argument("--rows", type=_names(ALL_ROWS), default=None,
                   help=f"comma-separated from {', '.join(ALL_ROWS)} (default all)")
    p.add_argument("--cases", type=_cases, default=None, metavar="SHAPES:ROWS:STEPS:BATCHES[;...]",
                   help="exactly these cases instead of --shapes x --rows x --steps x --batch: ';'-separated "
                        "groups, each the product of its comma-separated shapes, rows, steps and batch sizes "
                        "('-' for the autoregressive row's steps), e.g. 'lm1b:flm_rt,reference:1,4:1,8;"
                        "owt:autoregressive:-:1'")
    cli_args.add_device(p, dtype_help="float32 | bfloat16 | float16 (default float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--stochasticity", type=float, default=0.0, help="FMLM stochasticity s (default 0.0)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case, median and spread reported (default 5; "
                                                             "never fewer than 5 unless asked)")
    p.add_argument("--max-case-s", type=float, default=None,
                   help="fewer repeats when one run is slow: at most about this many seconds per case "
                        "(default 60, quick 12)")
    p.add_argument("--ar-tokens", type=int, default=None,
                   help="tokens the autoregressive baseline actually generates (default: the shape's length); "
                        "fewer are scaled up to the length per token, which favours the baseline")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--rate-size", type=int, default=None, metavar="N",
                   help="size of the square products that measure the machine's matmul rates (default 2048 on "
                        "CPU, 8192 on GPU)")
    p.add_argument("--no-adjacent-rate", action="store_true",
                   help="CPU: do not measure the matmul rate right before and after each case (saves ~1-2 s a case)")
    cli_args.add_seed(p)
    p.add_argument("--out", default=None, help="output directory (default bench/results/<device-name>)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def settings_from_args(args):
    import torch

    from ..devices import resolve_device
    from .suite import BenchSettings

    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    s = BenchSettings(device=str(dev), dtype=dtype, stochasticity=args.stochasticity, seed=args.seed,
                      model_path=args.model)
    if args.model:
        args.shapes = [MODEL_SHAPE]
    if args.quick:
        s.repeats, s.max_case_s = 5, 12.0
        rows = args.rows or list(ALL_ROWS)
        shapes = args.shapes or ["lm1b", "owt"]
        steps = args.steps or [1, 2, 4, 8]
        batch = args.batch or [1]
        cases = []
        for shape in shapes:
            for b in batch:
                if shape == "owt":  # one step only: a 1024 x 50258 state
                    owt_rows = ("reference", "flm_rt", EMB_ROW) + ((BF16_EMB_ROW,) if dtype == "float32" else ())
                    cases += [(shape, r, min(steps), b) for r in owt_rows if r in rows]
                    if AR_ROW in rows:
                        cases.append((shape, AR_ROW, None, b))
                    continue
                cases += [(shape, r, n, b) for n in steps for r in ("reference", "flm_rt") if r in rows]
                extra = ("flm_rt[torch-kernels]", EMB_ROW) + (BF16_ROWS if dtype == "float32" else ())
                cases += [(shape, r, min(steps), b) for r in extra if r in rows]
                cases += [(shape, r, min(steps), b) for r in EXPORT_ROWS[:1] if r in rows]
        s.cases = cases
    else:
        s.shapes = args.shapes or ["lm1b", "owt"]
        s.steps = args.steps or [1, 2, 4, 8]
        s.batches = args.batch or ([1, 8, 64] if gpu else [1, 8])
        s.rows = args.rows or [r for r in ALL_ROWS if r not in BF16_ROWS or dtype == "float32"]
    if args.repeats is not None:
        s.repeats = max(1, args.repeats)
    if args.max_case_s is not None:
        s.max_case_s = args.max_case_s
    if args.cases:
        s.cases = args.cases
    s.ar_tokens = args.ar_tokens
    s.rate_n = args.rate_size
    s.adjacent_rate = not args.no_adjacent_rate
    if args.threads:
        torch.set_num_threads(args.threads)
    return s


def default_out_dir(device) -> str:
    from .suite import device_slug

    root = os.getcwd()
    return os.path.join(root, "bench", "results", device_slug(device))


def cli_bench(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv[:1] == ["--"]:  # `flm-rt bench -- --option ...` (the top-level parser's remainder keeps the "--")
        argv = argv[1:]
    if argv[:1] == ["serve"]:  # the HTTP load test has its own options
        from .serve import cli_bench_serve

        return cli_bench_serve(argv[1:])
    args = build_parser().parse_args(argv)
    if args.model is not None:  # a path or a Hub name / alias, as everywhere else
        from ..api import resolve_source
        from ..errors import FlmError

        try:
            args.model, _ = resolve_source(args.model)
        except FlmError as e:
            print(f"flm-rt bench: error: --model: {e}", file=sys.stderr)
            return 2
    from .report import write_report
    from .suite import Suite

    settings = settings_from_args(args)
    settings.command = "flm-rt bench " + " ".join(shlex.quote(a) for a in argv)
    suite = Suite(settings)
    cases = suite.case_list()
    out_dir = args.out or default_out_dir(suite.device)
    print(f"flm-rt bench: {len(cases)} case(s) on {suite.device} ({suite.dtype_name}); results -> {out_dir}",
          file=sys.stderr)
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(cases), unit="case", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            bar = None

    def on_case(case, res):
        shape, row, steps, b = case
        msg = (f"{shape} {row} steps={steps} B={b}: "
               + (f"{res.median_s * 1e3:.1f} ms" if res.status == "ok" else f"{res.status} ({res.reason})"))
        if bar is not None:
            bar.set_postfix_str(msg[:80])
            bar.update(1)
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    results = suite.run(on_case)
    if bar is not None:
        bar.close()
    written = write_report(results, suite.meta, out_dir)
    print(written["markdown"])
    print(f"wrote {written['json']}, {written['md']}, " + ", ".join(written["plots"]), file=sys.stderr)
    return 0 if all(r.status != "error" for r in results) else 1


if __name__ == "__main__":
    sys.exit(cli_bench())
