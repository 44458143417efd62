"""Write benchmark results: ``results.json`` (raw), ``results.md`` (Markdown table), ``latency_vs_steps.png`` and,
when more than one batch size was run (the GPU suite), ``throughput_vs_batch.png``."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence


def _fmt(v, spec: str, dash: str = "-") -> str:
    return dash if v is None else format(v, spec)


def _spread(lo, hi) -> str:
    return "-" if lo is None or hi is None else f"{lo * 1e3:.1f}-{hi * 1e3:.1f}"


def rates_table(meta: dict) -> str:
    """The machine's matrix-product rates measured in the run (what the efficiencies are measured against)."""
    rates = meta.get("matmul_rates") or {}
    if not rates:
        return ""
    lines = ["| dtype | torch.mm GFLOP/s | prepacked oneDNN GFLOP/s | MKL packed sgemm GFLOP/s | best (used) | "
             "start / end of run |",
             "|---|---:|---:|---:|---|---:|"]
    for dt, r in rates.items():
        libs = " | ".join(_fmt(r.get(k), ".1f") for k in ("torch.mm", "onednn_prepacked", "mkl_prepacked"))
        lines.append(f"| {dt} | {libs} | {_fmt(r.get('best'), '.1f')} ({r.get('best_library')}) | "
                     f"{_fmt(r.get('best_start'), '.1f')} / {_fmt(r.get('best_end'), '.1f')} |")
    n = next(iter(rates.values()))
    return ("\n".join(lines) + f"\n\n{n.get('n')}-square products, {n.get('threads')} thread(s), best of "
            f"{n.get('repeats')} after 3 warm-ups each, measured at the start and the end of the run (the higher "
            "is used).\n")


def gemm_profile_table(meta: dict) -> str:
    profiles = [p for p in meta.get("gemm_profile") or [] if "gemms" in p]
    if not profiles:
        return ""
    lines = ["| shape | B | GEMM | M x N x K | GFLOP | median ms (min-max) | GFLOP/s | % of square |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for p in profiles:
        for g in p["gemms"]:
            lines.append(f"| {p['shape']} | {p['batch']} | {g['gemm']} | {g['M']} x {g['N']} x {g['K']} | "
                         f"{g['gflop']:.2f} | {g['median_ms']:.2f} ({g['min_ms']:.2f}-{g['max_ms']:.2f}) | "
                         f"{g['gflops']:.1f} | {100 * g['frac_square']:.0f} |")
    chunks = ", ".join(f"{p['shape']} B {p['batch']}: {p.get('vocab_chunk')}" for p in profiles)
    return ("\n".join(lines) + f"\n\nOne network call's products timed alone ({profiles[0]['dtype']}; 3 warm-ups, "
            f"median of 5), against the square product of the same dtype measured in this run. The fused rows "
            f"include their reductions (argmax; online softmax), and the P @ E row counts both of its GEMMs "
            f"(vocabulary chunk: {chunks}).\n")


def _row_dict(r) -> dict:
    return r if isinstance(r, dict) else r.as_dict()


def markdown_table(results: Sequence, meta: Optional[dict] = None) -> str:
    rows = [_row_dict(r) for r in results]
    lines = []
    if meta:
        lines.append(f"Device: **{meta.get('device_name')}** ({meta.get('device')}), dtype {meta.get('dtype')}, "
                     f"torch {meta.get('torch')}, {meta.get('threads')} thread(s), kernels: {meta.get('build_info')}; "
                     f"peak {_fmt(meta.get('peak_tflops'), '.3g')} TFLOP/s ({meta.get('peak_source')}); "
                     f"stochasticity {meta.get('stochasticity')}; load average at start {meta.get('loadavg_start')}; "
                     f"{meta.get('date_utc')}, commit {meta.get('git_commit')}.")
        if meta.get("command"):
            lines += ["", f"Command: `{meta['command']}`"]
        if meta.get("note"):
            lines += ["", f"Note: {meta['note']}"]
        isa = meta.get("cpu_isa")
        if isa:
            lines.append("")
            lines.append(f"CPU ISA: torch capability {isa.get('torch_cpu_capability')}, flags "
                         f"{', '.join(isa.get('flags') or []) or '-'}; bf16: {isa.get('bf16')}; BLAS: "
                         f"{', '.join(isa.get('blas') or [])}"
                         + (f"; fp32 products on prepacked weights: {isa['fp32_prepack_library']}"
                            if isa.get("fp32_prepack_library") else "")
                         + (f"; vendor {isa['vendor']}" if isa.get("vendor") else "") + "."
                         + (f" Checkpoint: {meta['model_path']}."
                                                                    if meta.get("model_path") else ""))
        lines.append("")
    lines.append("| shape | row | steps | B | L | V | median ms | min-max ms | IQR ms | ms/token | tokens/s | "
                 "GFLOP/sample | TFLOP/s | efficiency % | eff. % adjacent | weights MB | ids = reference | note |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        note = ""
        if r["status"] != "ok":
            note = f"{r['status']}: {r.get('reason') or ''}"
        else:
            ex = r.get("extra") or {}
            if r["row"] == "autoregressive":
                note = f"{ex.get('ar_model')}"
                if ex.get("ar_extrapolated"):
                    note += f"; timed {ex.get('ar_tokens_generated')} tokens, scaled to {ex.get('ar_tokens_reported')}"
            if r.get("noise") == "drawn in the loop":
                note += "noise drawn in the loop"
            if ex.get("tokens_match_fp32") is not None:
                note += f"ids = fp32 flm_rt: {100 * ex['tokens_match_fp32']:.1f}%"
            if r.get("rate_dtype") and meta and r["rate_dtype"] != meta.get("dtype"):
                note += f"; efficiency vs the {r['rate_dtype']} rate"
            if r["row"] in ("flm_rt[embedding-noise]", "flm_rt[bfloat16+embedding-noise]"):
                note += ("; " if note else "") + "FLOPs of the embedding-space process"
            note += f" ({len(r.get('times_s') or [])} runs)"
        note = note.replace("|", "/")
        match = r.get("tokens_match_reference")
        lines.append(
            f"| {r['shape']} | {r['row']} | {_fmt(r.get('steps'), 'd', 'n/a')} | {r['batch']} | {r['seq_len']} | "
            f"{r['vocab_size']} | {_fmt(r.get('median_s') and r['median_s'] * 1e3, '.1f')} | "
            f"{_spread(r.get('min_s'), r.get('max_s'))} | {_spread(*(r.get('iqr_s') or (None, None)))} | "
            f"{_fmt(r.get('per_token_ms'), '.4f')} | {_fmt(r.get('tokens_per_s'), ',.0f')} | "
            f"{_fmt(r.get('flops_per_sample') and r['flops_per_sample'] / 1e9, ',.1f')} | "
            f"{_fmt(r.get('achieved_tflops'), '.3f')} | {_fmt(r.get('frac_peak') and 100 * r['frac_peak'], '.1f')} | "
            f"{_fmt(r.get('frac_adjacent') and 100 * r['frac_adjacent'], '.1f')} | "
            f"{_fmt(r.get('weight_bytes') and r['weight_bytes'] / 1e6, ',.0f')} | "
            f"{_fmt(match and 100 * match, '.1f') + ('%' if match is not None else '')} | {note} |")
    return "\n".join(lines) + "\n"


def speedups(results: Sequence) -> list:
    """Per (shape, steps, batch) and row other than the reference: reference time / row time, and
    autoregressive time (same number of tokens) / row time."""
    rows = [_row_dict(r) for r in results if _row_dict(r)["status"] == "ok"]
    by = {(r["shape"], r["row"], r.get("steps"), r["batch"]): r for r in rows}
    out = []
    order = {"flm_rt": 0, "flm_rt[embedding-noise]": 1, "flm_rt[bfloat16]": 2, "flm_rt[bfloat16+embedding-noise]": 3,
             "flm_rt[torch-kernels]": 4}
    keys = sorted(by, key=lambda k: (k[0], k[3], k[2] or 0, order.get(k[1], 3), k[1]))
    for shape, row, steps, b in keys:
        if row in ("reference", "autoregressive"):
            continue
        r = by[(shape, row, steps, b)]
        ref = by.get((shape, "reference", steps, b))
        ar = by.get((shape, "autoregressive", None, b))
        out.append({"shape": shape, "row": row, "steps": steps, "batch": b,
                    "vs_reference": ref["median_s"] / r["median_s"] if ref else None,
                    "ids_match_reference": r.get("tokens_match_reference"),
                    "vs_autoregressive": ar["median_s"] / r["median_s"] if ar else None})
    return out


def speedup_table(results: Sequence) -> str:
    sp = speedups(results)
    if not sp:
        return ""
    lines = ["| shape | steps | B | row | speed-up vs reference | ids = reference | "
             "speed-up vs autoregressive (same number of tokens) |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for s in sp:
        m = s["ids_match_reference"]
        lines.append(f"| {s['shape']} | {s['steps']} | {s['batch']} | {s['row']} | "
                     f"{_fmt(s['vs_reference'], '.2f')}{'x' if s['vs_reference'] else ''} | "
                     f"{'-' if m is None else f'{100 * m:.1f}%'} | "
                     f"{_fmt(s['vs_autoregressive'], '.1f')}{'x' if s['vs_autoregressive'] else ''} |")
    return "\n".join(lines) + "\n"


def _plots(rows: list, out_dir: str, meta: dict) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    written = []
    ok = [r for r in rows if r["status"] == "ok"]
    shapes = [s for s in dict.fromkeys(r["shape"] for r in ok)] or ["(none)"]
    title = f"{meta.get('device_name', '')}, {meta.get('dtype', '')}"

    # Per-token latency vs steps, one line per row (per batch size when several), one panel per shape.
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sub = [r for r in ok if r["shape"] == shape]
        batches = sorted({r["batch"] for r in sub})
        all_steps = sorted({r["steps"] for r in sub if r.get("steps")}) or [1]
        for row in dict.fromkeys(r["row"] for r in sub):
            for b in batches:
                pts = sorted((r["steps"], r["per_token_ms"]) for r in sub
                             if r["row"] == row and r["batch"] == b and r.get("steps"))
                label = row if len(batches) == 1 else f"{row}, B={b}"
                if row == "autoregressive":
                    ar = [r for r in sub if r["row"] == row and r["batch"] == b]
                    if ar:
                        ax.axhline(ar[0]["per_token_ms"], ls="--", color="gray",
                                   label=f"{label} ({ar[0]['seq_len']} tokens, KV cache; any steps)")
                elif pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        _log_log_panel(ax, shape, "sampling steps (network calls)", "ms per generated token (median / (B L))")
        ax.set_xticks(all_steps)
        ax.set_xticklabels([str(s) for s in all_steps])
        if len(all_steps) == 1:
            ax.set_xlim(all_steps[0] / 1.5, all_steps[0] * 1.5)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    written.append(_save(fig, f"Per-token latency vs steps - {title}", os.path.join(out_dir, "latency_vs_steps.png")))

    # Throughput vs batch (when several batch sizes were run), at the smallest step count.
    if len({r["batch"] for r in ok}) > 1:
        fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes), 4.2), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            sub = [r for r in ok if r["shape"] == shape]
            steps_min = min((r["steps"] for r in sub if r.get("steps")), default=None)
            for row in dict.fromkeys(r["row"] for r in sub):
                pts = sorted((r["batch"], r["tokens_per_s"]) for r in sub if r["row"] == row
                             and (r.get("steps") == steps_min or row == "autoregressive"))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if row != "autoregressive" else "s--",
                            label=row if row == "autoregressive" else f"{row}, {steps_min} step(s)")
            _log_log_panel(ax, shape, "batch size B", "generated tokens / s")
        written.append(_save(fig, f"Throughput vs batch - {title}", os.path.join(out_dir, "throughput_vs_batch.png")))
    return written


def _log_log_panel(ax, title: str, xlabel: str, ylabel: str) -> None:
    """Log-2 x axis, log y axis, labels, grid and legend of one plot panel (after its lines are drawn)."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, suptitle: str, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


HISTORY = "history.jsonl"


def history_entry(rows: Sequence, meta: dict, sp: Optional[Sequence] = None) -> dict:
    """One run in a line: when, which commit, and every case's median beside its speed-ups (``sp``: the
    rows' ``speedups``, when already computed)."""
    sp = {(s["shape"], s["row"], s["steps"], s["batch"]): s for s in (speedups(rows) if sp is None else sp)}
    cases = []
    for r in rows:
        if r["status"] != "ok":
            continue
        s = sp.get((r["shape"], r["row"], r.get("steps"), r["batch"]), {})
        cases.append({"shape": r["shape"], "row": r["row"], "steps": r.get("steps"), "batch": r["batch"],
                      "median_ms": round(r["median_s"] * 1e3, 3), "per_token_ms": r.get("per_token_ms"),
                      "vs_reference": s.get("vs_reference"), "vs_autoregressive": s.get("vs_autoregressive")})
    return {"date_utc": meta.get("date_utc"), "git_commit": meta.get("git_commit"), "dtype": meta.get("dtype"),
            "threads": meta.get("threads"), "loadavg_start": meta.get("loadavg_start"), "cases": cases}


def read_history(out_dir: str) -> list:
    path = os.path.join(out_dir, HISTORY)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def history_table(history: Sequence, max_runs: int = 12) -> str:
    """flm_rt against the reference (and the autoregressive baseline) at 1 step, batch 1, run by run."""
    lines = ["| date (UTC) | commit | threads | shape | flm_rt ms | reference ms | speed-up vs reference | "
             "speed-up vs autoregressive |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for run in list(history)[-max_runs:]:
        by = {(c["shape"], c["row"], c["steps"], c["batch"]): c for c in run["cases"]}
        for shape in sorted({c["shape"] for c in run["cases"]}):
            f, ref = by.get((shape, "flm_rt", 1, 1)), by.get((shape, "reference", 1, 1))
            if f is None:
                continue
            lines.append(f"| {(run.get('date_utc') or '')[:16]} | {(run.get('git_commit') or '-')[:7]} | "
                         f"{run.get('threads', '-')} | {shape} | "
                         f"{f['median_ms']:.1f} | {_fmt(ref and ref['median_ms'], '.1f')} | "
                         f"{_fmt(f.get('vs_reference'), '.2f')} | {_fmt(f.get('vs_autoregressive'), '.1f')} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def write_report(results: Sequence, meta: dict, out_dir: str, *, record_history: bool = True) -> dict:
    """Write the files into ``out_dir`` (created). Returns {"json", "md", "plots": [...], "markdown": str}.

    ``record_history``: also append this run to ``history.jsonl`` there (results.md shows the last runs), so
    that a regression shows up beside the figures it replaces."""
    os.makedirs(out_dir, exist_ok=True)
    rows = [_row_dict(r) for r in results]
    sp = speedups(rows)
    if record_history:
        with open(os.path.join(out_dir, HISTORY), "a") as f:
            f.write(json.dumps(history_entry(rows, meta, sp), default=str) + "\n")
    pj = os.path.join(out_dir, "results.json")
    with open(pj, "w") as f:
        json.dump({"meta": meta, "speedups": sp, "results": rows}, f, indent=1, default=str)
        f.write("\n")
    md = "# flm_rt benchmark results\n\n" + markdown_table(rows, meta)
    st = speedup_table(rows)
    if st:
        md += "\n" + st
    md += ("\nms/token = median latency / (B x L); min-max and IQR over the timed runs (after the warm-ups). "
           "GFLOP/sample counts the matmuls (dense V-space embedding, blocks, attention, output projection) for all "
           "steps; state updates are memory-bound and not counted; the embedding-noise row counts its own process "
           "(no V-space embedding, P @ E per intermediate step). Efficiency = GFLOP / (median x the machine's best "
           "matrix-product rate for the row's dtype, measured in this run); eff. % adjacent: the same against that "
           "rate measured right before and right after the case (the higher; results.json has both), which follows "
           "the machine's state during the case on a shared VM. Raw numbers, timings and notes: results.json.\n")
    rt = rates_table(meta)
    if rt:
        md += "\n## Matrix-product rates of this machine (this run)\n\n" + rt
    gt = gemm_profile_table(meta)
    if gt:
        md += "\n## Per-GEMM profile\n\n" + gt
    ht = history_table(read_history(out_dir))
    if ht:
        md += "\n## Earlier runs in this folder (1 step, batch 1; history.jsonl)\n\n" + ht
    pm = os.path.join(out_dir, "results.md")
    with open(pm, "w") as f:
        f.write(md)
    plots = _plots(rows, out_dir, meta)
    return {"json": pj, "md": pm, "plots": plots, "markdown": md}


def rewrite_from_json(path: str, out_dir: Optional[str] = None) -> dict:
    """Re-write results.md and the plots from an existing results.json (e.g. after changing the report code)."""
    with open(path) as f:
        data = json.load(f)
    return write_report(data["results"], data["meta"], out_dir or os.path.dirname(os.path.abspath(path)),
                        record_history=False)
