"""``flm-rt bench serve``: load test of the HTTP server at several concurrencies, with and without batching.

Starts ``flm-rt serve`` on 127.0.0.1 (free ports) in two modes (``--max-batch 64`` and ``--max-batch 1``) and
alternates between them level by level, or drives a running server given by ``--url``. Each level sends a
bounded number of requests from C concurrent clients (stopping early at ``--max-level-s``) and reports p50/p99
latency, requests/s and tokens/s. Writes results.json, results.md and serve.png under
bench/results/<device>/serve/.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

MODES = {"batching": ["--max-batch", "64", "--max-wait-ms", "5"], "no batching": ["--max-batch", "1"]}


@dataclass
class Level:
    mode: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    p50_ms: float
    p99_ms: float
    requests_per_s: float
    tokens_per_s: float
    mean_batch: Optional[float]   # samples per generate call over the level, from /metrics


def _percentile(xs: list, q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _batch_counters(client, url: str) -> tuple:
    from prometheus_client.parser import text_string_to_metric_families

    vals = {s.name: s.value for f in text_string_to_metric_families(client.get(url + "/metrics").text)
            for s in f.samples if s.name in ("flm_rt_batch_size_sum", "flm_rt_batch_size_count")}
    return vals.get("flm_rt_batch_size_sum", 0.0), vals.get("flm_rt_batch_size_count", 0.0)


async def _level(url: str, model: str, concurrency: int, n_requests: int, max_s: float, body: dict) -> tuple:
    import httpx2

    latencies, errors = [], 0
    sent = 0
    deadline = time.monotonic() + max_s
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(timeout=300, limits=limits) as client:
        async def worker():
            nonlocal sent, errors
            while sent < n_requests and time.monotonic() < deadline:
                seed = sent
                sent += 1
                t0 = time.perf_counter()
                r = await client.post(url + "/v1/completions", json={"model": model, "prompt": "", "seed": seed,
                                                                      **body})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, errors, wall


def _card(url: str) -> dict:
    import httpx2

    with httpx2.Client(timeout=30) as c:
        return c.get(url + "/v1/models").json()["data"][0]


def warm(url: str, concurrency: int, args) -> None:
    """Allocations and thread pools at the largest concurrency, not timed."""
    card = _card(url)
    body = {"max_tokens": args.max_tokens or card["length"], "steps": args.steps}
    asyncio.run(_level(url, card["id"], concurrency, concurrency, 30, body))


def run_levels(url: str, mode: str, concurrencies: Sequence[int], args) -> list:
    import httpx2

    card = _card(url)
    tokens = args.max_tokens or card["length"]
    body = {"max_tokens": tokens, "steps": args.steps}
    out = []
    for conc in concurrencies:
        with httpx2.Client(timeout=30) as c:
            s0, n0 = _batch_counters(c, url)
            lat, errors, wall = asyncio.run(_level(url, card["id"], conc, max(args.requests_per_client * conc,
                                                                          args.min_requests), args.max_level_s, body))
            s1, n1 = _batch_counters(c, url)
        done = len(lat)
        level = Level(mode=mode, concurrency=conc, requests=done, errors=errors, wall_s=round(wall, 3),
                      p50_ms=round(1e3 * _percentile(lat, 0.5), 2), p99_ms=round(1e3 * _percentile(lat, 0.99), 2),
                      requests_per_s=round(done / wall, 3), tokens_per_s=round(done * tokens / wall, 1),
                      mean_batch=round((s1 - s0) / (n1 - n0), 2) if n1 > n0 else None)
        print(f"  {mode:12s} c={conc:3d}: {done} requests ({errors} errors) in {wall:.1f} s; "
              f"p50 {level.p50_ms:.0f} ms, p99 {level.p99_ms:.0f} ms, {level.requests_per_s:.2f} req/s, {level.tokens_per_s:.0f} tokens/s, "
              f"mean batch {level.mean_batch}", file=sys.stderr, flush=True)
        out.append(level)
    return out


def _load_average() -> Optional[list]:
    return [round(x, 1) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``flm-rt serve`` in a subprocess on 127.0.0.1, stopped with SIGTERM."""

    def __init__(self, model: str, extra: list, device: Optional[str]):
        import httpx2

        self.url = f"http://127.0.0.1:{_free_port()}"
        cmd = [sys.executable, "-m", "flm_rt.cli", "serve", model, "--port", self.url.rsplit(":", 1)[1],
               "--model-name", "bench", "--max-queue", "1024", "--log-level", "warning", *extra]
        if device:
            cmd += ["--device", device]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flm-rt serve exited: {self.proc.stderr.read()}")
            try:
                if httpx2.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.3)
        self.close()
        raise RuntimeError("flm-rt serve did not become ready within 180 s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _plot(levels: list, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(lv.mode for lv in levels):
        sub = [lv for lv in levels if lv.mode == mode]
        x = [lv.concurrency for lv in sub]
        a.plot(x, [lv.p50_ms for lv in sub], "o-", label=f"{mode} p50")
        a.plot(x, [lv.p99_ms for lv in sub], "x--", label=f"{mode} p99")
        b.plot(x, [lv.tokens_per_s for lv in sub], "o-", label=mode)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    a.set_yscale("log")
    a.set_ylabel("request latency (ms)")
    b.set_ylabel("tokens / s")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _markdown(levels: list, meta: dict) -> str:
    lines = [f"# flm-rt serve load test ({meta['date']})", "",
             f"Model: {meta['model_desc']}. Server and clients on {meta['machine']} ({meta['device']}), "
             f"127.0.0.1; {meta['note']}. Load average (1, 5, 15 min) before {meta['load_average_before']}, "
             f"after {meta['load_average_after']}.", "",
             "| mode | concurrency | requests | errors | p50 ms | p99 ms | requests/s | tokens/s | mean batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        lines.append(f"| {lv.mode} | {lv.concurrency} | {lv.requests} | {lv.errors} | {lv.p50_ms:.0f} | "
                     f"{lv.p99_ms:.0f} | {lv.requests_per_s:.2f} | {lv.tokens_per_s:.0f} | {lv.mean_batch} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flm-rt bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model to serve (default: the random-weight demo model, "
                                                 "flm-rt demo's: V=50258 L=128 D=128, 2 blocks)")
    p.add_argument("--url", default=None, help="drive this running server instead of starting one per mode")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--min-requests", type=int, default=16, help="at least this many requests per level")
    p.add_argument("--max-level-s", type=float, default=20.0, help="stop sending after this long per level")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default: the model's length)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<device>/serve)")
    return p


def cli_bench_serve(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(argv or []))
    try:
        conc = [int(x) for x in args.concurrency.split(",") if x.strip()]
        assert conc and all(c > 0 for c in conc)
    except (ValueError, AssertionError):
        build_parser().error(f"--concurrency takes positive integers, got {args.concurrency!r}")
    import torch

    from ..devices import resolve_device
    from ..cli import demo_model_path
    from .cli import default_out_dir
    from .suite import device_name

    dev = resolve_device(args.device)
    model_path = args.model or (None if args.url else demo_model_path())
    load_before = _load_average()
    levels = []
    if args.url:
        warm(args.url.rstrip("/"), max(conc), args)
        levels += run_levels(args.url.rstrip("/"), "as running", conc, args)
    else:
        # Both servers up at once (an idle one costs memory only); the modes alternate level by level, so
        # that both see the same background load on a shared machine.
        servers = {}
        try:
            for mode, extra in MODES.items():
                print(f"flm-rt bench serve: starting '{mode}' ({' '.join(extra)})", file=sys.stderr, flush=True)
                servers[mode] = _Server(model_path, extra, args.device)
            for srv in servers.values():
                warm(srv.url, max(conc), args)
            card_seen = _card(servers["batching"].url)
            for c in conc:
                for mode, srv in servers.items():
                    levels += run_levels(srv.url, mode, [c], args)
        finally:
            for srv in servers.values():
                srv.close()
        levels.sort(key=lambda lv: (list(MODES).index(lv.mode), lv.concurrency))
    card = _card(args.url.rstrip("/")) if args.url else card_seen
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{device_name(dev)}, {platform.system()}", "device": str(dev),
            "model": args.url or model_path,
            "model_desc": f"{card['id']}: {card['kind']} V={card['vocab_size']} L={card['length']}, {args.steps} "
                          f"step(s), {args.max_tokens or card['length']} tokens/request"
                          + ("" if args.model or args.url else " (the demo model: D=128, 2 blocks, random weights)"),
            "torch": torch.__version__, "load_average_before": load_before,
            "load_average_after": _load_average(),
            "note": "batching: --max-batch 64 --max-wait-ms 5; no batching: --max-batch 1; latency includes "
                    "queueing; the clients share the CPU with the server"}
    out = args.out or os.path.join(default_out_dir(dev), "serve")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "levels": [asdict(lv) for lv in levels]}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(_markdown(levels, meta))
    _plot(levels, os.path.join(out, "serve.png"), f"flm-rt serve, {meta['model_desc']}\n"
                                                  f"{meta['machine']}, {meta['date']}")
    print(f"flm-rt bench serve: wrote {out}/results.{{json,md}} and serve.png", file=sys.stderr)
    return 0
