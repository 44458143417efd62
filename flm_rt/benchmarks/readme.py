"""The README's performance table, generated from the committed ``flm-rt bench`` results.

    python -m flm_rt.benchmarks.readme            # rewrite README.md between the perf-table markers (make readme-perf)
    python -m flm_rt.benchmarks.readme --check    # exit 1 when README.md is not what the results give

One result set per machine: of the ``results.json`` files under ``bench/results/<machine>/`` (any depth), the one that
measured the most of the table's cases, the newest (by its ``meta.date_utc``) among those (a later partial run, such
as an A/B of one change, does not replace a full one). Its medians fill the table's cases and columns wherever that
run measured them.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import textwrap
from typing import Optional, Sequence

from ..cpu_features import is_native_reason

BEGIN = "<!-- perf-table:begin -->"
END = "<!-- perf-table:end -->"
CASES = (("lm1b", 1, 1), ("lm1b", 1, 8), ("lm1b", 4, 1), ("lm1b", 4, 8), ("lm1b", 8, 1),
         ("owt", 1, 1))  # (shape, steps, batch)
FASTEST = "flm_rt[bfloat16+embedding-noise]"  # the fastest CPU mode where bf16 is native
COLUMNS = (("reference", "reference"), ("flm_rt", "flm_rt (ids = reference)"),
           ("onnx", "ONNX Runtime (ids = reference)"), ("aoti", "AOTInductor"),
           ("flm_rt[embedding-noise]", '`noise_space="embedding"`'),
           (FASTEST, 'bf16 + `noise_space="embedding"`'), ("autoregressive", "autoregressive"))
ISA_FLAGS = ("avx512_bf16", "amx_bf16")  # beside torch's CPU capability: what sets the native bf16 path


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def result_sets(results_dir: str) -> list:
    """[(path, data)] of the ``results.json`` per machine (its first folder under ``results_dir``) that covers the
    most table cases, the newest among those, in machine order. Files without a dated ``meta`` and a ``results``
    list (other tools' outputs) are not sets."""
    best: dict = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "**", "results.json"), recursive=True)):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from None
        meta = data.get("meta") if isinstance(data, dict) else None
        if not (isinstance(meta, dict) and meta.get("date_utc") and isinstance(data.get("results"), list)):
            continue
        machine = os.path.relpath(path, results_dir).split(os.sep)[0]
        rank = (_cases_covered(data), meta["date_utc"])
        if machine not in best or rank > best[machine][2]:
            best[machine] = (path, data, rank)
    return [best[m][:2] for m in sorted(best)]


def _cases_covered(data: dict) -> int:
    """How many of the table's CASES the set measured in one of its COLUMNS."""
    rows = {c for c, _ in COLUMNS}
    done = {(r.get("shape"), r.get("steps"), r.get("batch")) for r in data["results"]
            if isinstance(r, dict) and r.get("status") == "ok" and r.get("row") in rows}
    return sum(case in done for case in CASES)


def _seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def _times(x: float) -> str:
    return f"{x:.0f}x" if x >= 10 else f"{x:.2f}x"


def _ids_note(row: dict) -> str:
    match = row.get("tokens_match_reference")
    return "" if match is None or match == 1.0 else f", ids {100 * match:.1f}% = reference"


def _isa(meta: dict) -> str:
    if meta.get("device", "").startswith("cuda"):
        return f"CUDA {meta.get('cuda') or '?'}"
    isa = meta.get("cpu_isa")
    if not isa:
        return "not recorded"
    flags = [f for f in ISA_FLAGS if f in (isa.get("flags") or [])]
    return f"{isa.get('torch_cpu_capability')}" + (f" ({', '.join(flags)})" if flags else "")


def _machine(meta: dict) -> str:
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(meta.get("dtype"), meta.get("dtype"))
    return f"{meta.get('device_name')}, {dtype}, {meta.get('threads')} threads"


def _when(meta: dict) -> str:
    load = meta.get("loadavg_start")
    return meta["date_utc"][:10] + (f", {load[0]:.1f}" if load else "")


def _cells(rows: dict, shape: str, steps: int, batch: int) -> Optional[list]:
    """The columns' cells of one case, or None when the run measured none of them."""
    got = {name: rows.get((shape, name, None if name == "autoregressive" else steps, batch)) for name, _ in COLUMNS}
    if not any(got.values()):
        return None
    ref, flm = got["reference"], got["flm_rt"]
    cells = []
    for name, _ in COLUMNS:
        r = got[name]
        if r is None:
            cells.append("")
        elif name == "flm_rt":
            vs = f" ({_times(ref['median_s'] / r['median_s'])})" if ref else ""
            cells.append(f"**{_seconds(r['median_s'])}{vs}**{_ids_note(r)}")
        elif name == "autoregressive" and (flm or got[FASTEST]):
            vs = [f"{label} {_times(r['median_s'] / o['median_s'])} faster"
                  for label, o in (("flm_rt", flm), ("bf16 + embedding", got[FASTEST])) if o]
            cells.append(f"{_seconds(r['median_s'])} ({'; '.join(vs)})")
        elif name == FASTEST and not is_native_reason((r.get("extra") or {}).get("native_bf16", "native")):
            cells.append(_seconds(r["median_s"]) + " (bf16 emulated: slower than fp32)")
        else:
            cells.append(_seconds(r["median_s"]) + (_ids_note(r) if name == "onnx" else ""))
    return cells


def render_table(results_dir: str, root: Optional[str] = None) -> str:
    """The Markdown between the markers: one table, the result set of each machine (:func:`result_sets`), and its
    sources (paths relative to ``root``, the repository by default)."""
    root = root or _repo_root()
    lines = ["| machine | ISA | date, load average | case | " + " | ".join(h for _, h in COLUMNS) + " |",
             "|---|---|---|---|" + "---:|" * len(COLUMNS)]
    sources = []
    for path, data in result_sets(results_dir):
        meta = data["meta"]
        rows = {(r["shape"], r["row"], r.get("steps"), r["batch"]): r for r in data["results"]
                if isinstance(r, dict) and r.get("status") == "ok"}
        first = True
        for shape, steps, batch in CASES:
            cells = _cells(rows, shape, steps, batch)
            if cells is None:
                continue
            folder = os.path.relpath(path, results_dir).split(os.sep)[0]  # tells apart CPUs sold under one name
            head = [f"{_machine(meta)} (`{folder}`)", _isa(meta), _when(meta)] if first else ["", "", ""]
            case = f"{shape}, {steps} step{'s' if steps > 1 else ''}, B {batch}"
            lines.append("| " + " | ".join(head + [case] + cells) + " |")
            first = False
        if not first:
            sources.append(f"`{os.path.relpath(path, root)}` (commit {meta.get('git_commit') or '?'})")
    if not sources:
        raise ValueError(f"no benchmark result sets (results.json with meta and results) under {results_dir}")
    note = ("Medians of one `flm-rt bench` run per machine (the newest of those covering the most of these cases), "
            "random weights; speed-ups are against the reference in the same run. Generated by `make readme-perf` "
            "from " + ", ".join(sources) + ".")
    lines += ["", textwrap.fill(note, width=116, break_long_words=False, break_on_hyphens=False)]
    return "\n".join(lines) + "\n"


def replace_section(text: str, table: str) -> str:
    """``text`` with what lies between the perf-table markers replaced by ``table``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"the README needs exactly one {BEGIN} line followed by one {END} line")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{table}{END}{tail}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    root = _repo_root()
    p = argparse.ArgumentParser(prog="python -m flm_rt.benchmarks.readme", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=os.path.join(root, "bench", "results"), help="results folder")
    p.add_argument("--readme", default=os.path.join(root, "README.md"), help="the README to rewrite")
    p.add_argument("--check", action="store_true", help="only compare: exit 1 when the README is out of date")
    args = p.parse_args(argv)
    try:
        with open(args.readme) as f:
            text = f.read()
        new = replace_section(text, render_table(args.results, os.path.dirname(os.path.abspath(args.readme))))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{args.readme}: the performance table is out of date; run `make readme-perf`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.readme)), prefix=".readme-")
        with os.fdopen(fd, "w") as f:
            f.write(new)
        os.chmod(tmp, os.stat(args.readme).st_mode & 0o777)
        os.replace(tmp, args.readme)
    print(f"{args.readme}: performance table {'rewritten' if new != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
