"""The benchmark cases: shapes x steps x batch x rows, timed, with FLOPs, bytes and fraction of peak.

Rows (what is timed, always from pre-drawn Gaussian noise unless the noise does not fit in memory):
- ``flm_rt``: ``flm_rt.generate(..., kernels="auto")`` (compiled ops when built);
- ``flm_rt[torch-kernels]``: the same with the pure-PyTorch ops (``kernels="torch"``);
- ``reference``: :func:`flm_rt.benchmarks.reference.reference_generate`, the research code's computation;
- ``onnx`` / ``torchscript`` / ``aoti``: graphs from ``flm_rt.export`` (``flm_rt.exporting``);
- ``autoregressive``: a SmolLM2-135M-class causal LM generating the same number of tokens with a KV cache.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .. import prepack
from ..devices import dtype_name
from ..model import PRESET_SHAPES, preset_config
from .timing import synchronize, time_calls

FLM_ROWS = ("flm_rt", "flm_rt[torch-kernels]", "reference")
EMB_ROW = "flm_rt[embedding-noise]"  # noise_space="embedding": draws in R^D, no [B, L, V] noise (other draws)
BF16_ROW = "flm_rt[bfloat16]"  # the same weights rounded to bf16 (blocks and output layer), the fp32 row's draws
BF16_EMB_ROW = "flm_rt[bfloat16+embedding-noise]"  # both: the fastest CPU mode where bf16 is native
EXPORT_ROWS = ("onnx", "torchscript", "aoti")
AR_ROW = "autoregressive"
ALL_ROWS = FLM_ROWS + (EMB_ROW, BF16_ROW, BF16_EMB_ROW) + EXPORT_ROWS + (AR_ROW,)
BF16_ROWS = (BF16_ROW, BF16_EMB_ROW)
EMB_ROWS = (EMB_ROW, BF16_EMB_ROW)
MODEL_SHAPE = "model"  # `flm-rt bench --model PATH`: the user's checkpoint instead of a random model
OUTPUT_SCALE = 8.0  # random output projection scaled up: peaked distributions, as in a trained model

# Datasheet dense peaks, TFLOP/s (no sparsity). fp32 = non-tensor-core FP32 (torch's default for fp32 matmuls).
GPU_PEAKS_TFLOPS = {
    "h100 sxm": {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9},
    "h100 nvl": {"bfloat16": 835.0, "float16": 835.0, "float32": 60.0},
    "h100 pcie": {"bfloat16": 756.5, "float16": 756.5, "float32": 51.2},
    "h100": {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9},
    "h200": {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9},
    "a100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
    "l4": {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3},
}


# ------------------------------------------------------------------------------------------------ accounting
def flops_per_call(cfg, seq_len: Optional[int] = None, float_input: bool = True) -> float:
    """Forward FLOPs of one denoiser call on one sample (multiply-add = 2 FLOPs).

    embedding 2 L V D (dense float input) + per block [qkv 6 L D^2 + out 2 L D^2 + MLP 16 L D^2 + attention
    scores and values 4 L^2 D + adaLN 12 C D] + output layer 2 L D V + its adaLN 4 C D + time MLPs. The state
    update, soft-caps, softmax and argmax are O(L V) memory-bound work and are not counted.
    """
    L = seq_len or cfg.length
    V, D, C, N = cfg.vocab_size, cfg.hidden_size, cfg.cond_dim, cfg.n_blocks
    emb = 2 * L * V * D if float_input else 0
    block = 24 * L * D * D + 4 * L * L * D + 2 * C * 6 * D
    out = 2 * L * D * V + 2 * C * 2 * D
    time_mlp = (2 if cfg.two_time else 1) * 2 * (256 * C + C * C)
    return float(emb + N * block + out + time_mlp)


def flops_per_sample(cfg, steps: int, seq_len: Optional[int] = None, noise_space: str = "vocab") -> float:
    """All steps' FLOPs for one sample. ``noise_space="embedding"``: no dense V-space embedding of the state
    (the network gets h directly); the intermediate steps' P @ E (2 L V D each) is counted instead."""
    if noise_space == "vocab":
        return steps * flops_per_call(cfg, seq_len)
    L = seq_len or cfg.length
    return steps * flops_per_call(cfg, seq_len, float_input=False) + (steps - 1) * 2 * L * cfg.vocab_size * cfg.hidden_size


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.denoiser.parameters())


# ------------------------------------------------------------------------------------------------ device info
def cpu_name() -> str:
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def cpu_isa() -> dict:
    """cpu_features.isa_summary() and the library of flm_rt.prepack's fp32 products in this process."""
    from ..cpu_features import isa_summary

    return dict(isa_summary(), fp32_prepack_library=prepack.fp32_library())


def native_bf16_summary() -> str:
    from ..cpu_features import bf16_reason

    return bf16_reason()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_slug(device: torch.device) -> str:
    """Folder name for results, the same as the kernels' benchmarks use: ``cpu-amd-epyc``,
    ``cuda-nvidia-h100-80gb-hbm3``."""
    if device.type == "cuda":
        raw = torch.cuda.get_device_name(device)
    else:
        raw = cpu_name().split(" (")[0]
    short = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")
    short = re.sub(r"-(r|tm|cpu|processor|with-radeon.*|\d+-core)\b", "", short).strip("-")
    return f"{device.type}-{short or 'unknown'}"


RATE_LIBRARIES = ("torch.mm", "onednn_prepacked", "mkl_prepacked")  # matmul_rates' keys, in its tables' order
EMULATED_RATE_N = 512  # matmul_rates' largest square where the CPU emulates bf16 (2048 would take minutes)


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: Optional[int] = None,
                          repeats: int = 5) -> float:
    """Best-of-``repeats`` throughput of one large square GEMM in ``dtype`` (TFLOP/s): ``torch.mm``, and on CPU
    also the prepacked GEMM that flm_rt itself uses (flm_rt.prepack, its library for this process), whichever is
    faster. (The benchmark suite's efficiencies use :func:`matmul_rates`, which times every library.)"""
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    gemms = [lambda: torch.mm(a, b)]
    if device.type == "cpu":
        gemms.append(lambda: prepack.linear(a, b))  # F.linear where the prepacked path does not apply
    with torch.no_grad():
        best = min(time_calls(gemm, device, repeats=repeats, warmup=1).min_s for gemm in gemms)
    return 2 * n**3 / best / 1e12


def _time_best(fn, device: torch.device, repeats: int, warmup: int = 3) -> tuple[float, list]:
    with torch.no_grad():
        t = time_calls(fn, device, repeats=repeats, warmup=warmup)
    return t.min_s, t.times_s


def matmul_rates(device: torch.device, dtype: torch.dtype, n: Optional[int] = None, repeats: int = 5) -> dict:
    """The machine's matrix-product rate in ``dtype`` (GFLOP/s), per library, with the same threads as the run:
    ``torch.mm`` (MKL / oneDNN as torch dispatches) and, on CPU, oneDNN's linear on a prepacked weight (what
    flm_rt.prepack and the fused vocabulary pass use) and, in fp32, MKL's packed sgemm (flm_rt.prepack's other
    library). Best of ``repeats`` after 3 warm-ups, each; ``best`` is the fastest library, the rate efficiencies
    are measured against. bf16 on a CPU without native bf16 (emulated, about 1 GFLOP/s on an AVX2-only Zen 3) is
    measured at n <= 512 and flagged ``emulated``; a library that refuses the dtype is left out, its reason under
    ``<library>_unavailable``."""
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    emulated = None
    if device.type == "cpu" and dtype == torch.bfloat16:
        from ..cpu_features import bf16_reason, native_bf16

        if not native_bf16():
            emulated, n = bf16_reason(), min(n, EMULATED_RATE_N)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    flops = 2 * n**3
    out = {"n": n, "threads": torch.get_num_threads(), "repeats": repeats}
    if emulated:
        out["emulated"] = emulated

    def record(name, fn):
        best_s, times = _time_best(fn, device, repeats)
        out[name] = flops / best_s / 1e9
        out[name + "_spread"] = [flops / max(times) / 1e9, flops / min(times) / 1e9]

    record("torch.mm", lambda: torch.mm(a, b))
    if device.type == "cpu" and prepack._HAVE_ONEDNN_LINEAR:
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(b, None)
        except RuntimeError as e:  # oneDNN refuses bf16 weights below AVX512-BW / AVX-NE-CONVERT (e.g. AVX2 CPUs)
            out["onednn_prepacked_unavailable"] = str(e).splitlines()[0][:200]
        else:
            record("onednn_prepacked", lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    if device.type == "cpu" and dtype == torch.float32 and prepack._HAVE_MKL_LINEAR:
        mkl_packed = torch.ops.mkl._mkl_reorder_linear_weight(b, n)
        record("mkl_prepacked", lambda: torch.ops.mkl._mkl_linear(a, mkl_packed, b, None, n))
    libs = {k: v for k, v in out.items() if k in RATE_LIBRARIES}
    out["best_library"] = max(libs, key=libs.get)
    out["best"] = libs[out["best_library"]]
    return out


def device_peak(device: torch.device, dtype: torch.dtype, measured: Optional[float] = None) -> dict:
    """The peak used for "fraction of peak": the datasheet figure on known GPUs, else the measured matmul rate."""
    dt = dtype_name(dtype)
    if measured is None:
        measured = measure_matmul_tflops(device, dtype)
    if device.type == "cuda":
        gname = torch.cuda.get_device_name(device).lower()
        for key, peaks in GPU_PEAKS_TFLOPS.items():
            if all(part in gname for part in key.split()):
                return {"peak_tflops": peaks[dt], "peak_source": f"datasheet dense {dt}, {key.upper()}",
                        "measured_matmul_tflops": measured}
    return {"peak_tflops": measured,
            "peak_source": f"measured: best of 5 "
                           f"{'torch.mm or flm_rt.prepack GEMM' if device.type == 'cpu' else 'torch.mm'} "
                           f"{'2048' if device.type == 'cpu' else '8192'}^2 in {dt}, "
                           f"{torch.get_num_threads()} thread(s)",
            "measured_matmul_tflops": measured}


def git_commit() -> Optional[str]:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def loadavg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class BenchSettings:
    shapes: Sequence[str] = ("lm1b",)
    steps: Sequence[int] = (1, 2, 4, 8)
    batches: Sequence[int] = (1,)
    rows: Sequence[str] = FLM_ROWS
    device: Optional[str] = None
    dtype: str = "float32"
    stochasticity: float = 0.0
    repeats: int = 5
    warmup: int = 3
    max_case_s: float = 60.0            # fewer repeats when one run is slow (never fewer than min(5, repeats))
    ar_tokens: Optional[int] = None     # AR tokens actually generated (default: the shape's L); per-token
                                        # latency is extrapolated to L tokens when fewer
    cases: Optional[list] = None        # explicit (shape, row, steps, batch) list (overrides the product)
    seed: int = 0
    noise_budget_frac: float = 0.25     # pre-draw noise only when it fits in this fraction of memory
    check_tokens: bool = True           # compare flm_rt rows' ids against the reference row (same draws)
    model_path: Optional[str] = None    # bench this checkpoint (shape "model") instead of random models
    command: Optional[str] = None       # the command line that made this run (recorded in the results)
    gemm_profile: bool = True           # time each GEMM of one network call per (shape, batch)
    rate_n: Optional[int] = None        # size of the square products that set the machine's rates (2048 CPU)
    adjacent_rate: bool = True          # CPU: also measure the rate right before and right after each case


@dataclass
class CaseResult:
    shape: str
    row: str
    steps: Optional[int]
    batch: int
    seq_len: int
    vocab_size: int
    hidden_size: int
    n_blocks: int
    device: str
    device_name: str
    dtype: str
    stochasticity: Optional[float]
    status: str = "ok"                  # ok | skipped | error
    reason: Optional[str] = None
    times_s: list = field(default_factory=list)
    median_s: Optional[float] = None
    min_s: Optional[float] = None
    max_s: Optional[float] = None
    iqr_s: Optional[list] = None        # [first quartile, third quartile]
    per_token_ms: Optional[float] = None
    tokens_per_s: Optional[float] = None
    flops_per_sample: Optional[float] = None
    achieved_tflops: Optional[float] = None
    peak_tflops: Optional[float] = None
    frac_peak: Optional[float] = None   # efficiency: the row's own FLOPs / (median x the best GEMM rate of its dtype)
    rate_dtype: Optional[str] = None    # the dtype whose best GEMM rate frac_peak is measured against
    adjacent_tflops: Optional[float] = None  # that rate measured right before / after this case (the higher)
    frac_adjacent: Optional[float] = None    # efficiency against adjacent_tflops
    weight_bytes: Optional[int] = None
    noise: Optional[str] = None         # "pre-drawn" | "drawn in the loop"
    tokens_match_reference: Optional[float] = None
    threads: int = 0
    loadavg: Optional[list] = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


# ------------------------------------------------------------------------------------------------ the suite
class Suite:
    """Runs cases, caching models per shape. Use :meth:`run` (with an optional progress callback)."""

    def __init__(self, settings: BenchSettings):
        from ..devices import resolve_device, resolve_dtype

        self.s = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype)
        self.dtype_name = dtype_name(self.dtype)
        self._models: dict = {}
        self._exported: dict = {}
        self._ref_ids: dict = {}
        self._fp32_ids: dict = {}
        self._peak: Optional[dict] = None
        self._rates: dict = {}
        self._user_cfg: Optional[dict] = None
        self.gemm_profiles: list = []
        self.meta: dict = {}

    # -- setup -------------------------------------------------------------------------------------------
    def shape_cfg(self, shape: str) -> dict:
        if shape == MODEL_SHAPE:
            if self._user_cfg is None:
                c = self.model(shape).config
                self._user_cfg = dict(vocab_size=c.vocab_size, length=c.length, hidden_size=c.hidden_size,
                                      n_blocks=c.n_blocks, n_heads=c.n_heads, cond_dim=c.cond_dim)
            return self._user_cfg
        if shape not in PRESET_SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {', '.join(PRESET_SHAPES)}")
        return PRESET_SHAPES[shape]

    def model(self, shape: str, dtype: Optional[torch.dtype] = None):
        dtype = dtype or self.dtype
        key = (shape, dtype)
        if key not in self._models:
            from ..api import load, random_model

            keep = {k: m for k, m in self._models.items() if k[0] == shape}  # one shape at a time
            self._models.clear()
            self._models.update(keep)
            self._exported.clear()
            if shape == MODEL_SHAPE:
                if not self.s.model_path:
                    raise ValueError("shape 'model' needs BenchSettings.model_path (flm-rt bench --model PATH)")
                self._models[key] = load(self.s.model_path, device=self.device, dtype=dtype)
            else:
                self._models[key] = random_model(preset_config(shape), seed=0, device=self.device, dtype=dtype,
                                                 output_scale=OUTPUT_SCALE)
        return self._models[key]

    def rates(self) -> dict:
        """{dtype: matmul_rates} for float32 and bfloat16 (and the run's dtype), measured once at the start."""
        if not self._rates:
            names = dict.fromkeys(["float32", "bfloat16", self.dtype_name])
            for name in names:
                self._rates[name] = matmul_rates(self.device, getattr(torch, name), self.s.rate_n)
        return self._rates

    def rate_tflops(self, dtype_name: str) -> Optional[float]:
        r = self.rates().get(dtype_name)
        return r["best"] / 1e3 if r else None

    def peak(self) -> dict:
        if self._peak is None:
            if self.device.type == "cuda":
                self._peak = device_peak(self.device, self.dtype)
            else:
                r = self.rates()[self.dtype_name]
                self._peak = {"peak_tflops": r["best"] / 1e3, "measured_matmul_tflops": r["best"] / 1e3,
                              "peak_source": self._cpu_peak_source(r)}
        return self._peak

    def _cpu_peak_source(self, r: dict) -> str:
        names = {"torch.mm": "torch.mm", "onednn_prepacked": "a prepacked oneDNN linear",
                 "mkl_prepacked": "MKL's packed sgemm"}
        timed = [names[k] for k in RATE_LIBRARIES if k in r]
        libs = timed[0] if len(timed) == 1 else ", ".join(timed[:-1]) + " and " + timed[-1]
        return (f"measured: best of {r['repeats']} after 3 warm-ups, the fastest of {libs} "
                f"({r['best_library']} won), {r['n']}^2 in {self.dtype_name}, {r['threads']} thread(s)")

    def remeasure_peak(self) -> None:
        """Measure the matmul rates again (end of the run) and keep the higher figures: on a shared machine the
        first measurement can be depressed by other load, which would inflate the efficiencies."""
        if self.device.type == "cuda" and "datasheet" in self.peak().get("peak_source", ""):
            return
        for name, first in list(self.rates().items()):
            again = matmul_rates(self.device, getattr(torch, name), self.s.rate_n)
            merged = dict(first, best_start=first["best"], best_end=again["best"])
            if again["best"] > first["best"]:
                merged.update({k: again[k] for k in (*RATE_LIBRARIES, "best", "best_library") if k in again})
            self._rates[name] = merged
        r = self._rates[self.dtype_name]
        self._peak = dict(self.peak(), peak_tflops=r["best"] / 1e3, measured_matmul_tflops=r["best"] / 1e3,
                          measured_matmul_tflops_start=r["best_start"] / 1e3,
                          measured_matmul_tflops_end=r["best_end"] / 1e3)
        if self.device.type == "cpu":  # the library that set the kept figure
            self._peak["peak_source"] = self._cpu_peak_source(r)
        if "(max of start and end of run)" not in self._peak["peak_source"]:
            self._peak["peak_source"] += " (max of start and end of run)"

    def case_list(self) -> list:
        if self.s.cases is not None:
            return list(self.s.cases)
        out = []
        for shape in self.s.shapes:
            for b in self.s.batches:
                for row in self.s.rows:
                    if row == AR_ROW:
                        out.append((shape, row, None, b))
                    else:
                        out.extend((shape, row, n, b) for n in self.s.steps)
        return out

    def collect_meta(self) -> dict:
        from .._version import __version__

        try:
            from .._ext import build_info

            bi = build_info(short=True)
        except Exception as e:  # noqa: BLE001
            bi = f"unavailable ({type(e).__name__})"
        self.meta = {
            "device": str(self.device), "device_name": device_name(self.device), "device_slug": device_slug(self.device),
            "dtype": self.dtype_name, "torch": torch.__version__, "flm_rt": __version__, "build_info": bi,
            "git_commit": git_commit(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "threads": torch.get_num_threads(), "loadavg_start": loadavg(), "python": platform.python_version(),
            "stochasticity": self.s.stochasticity, "repeats": self.s.repeats, "warmup": self.s.warmup,
            "output_scale": OUTPUT_SCALE, **self.peak(), "matmul_rates": self.rates(),
            "cpu_isa": cpu_isa() if self.device.type == "cpu" else None,
            "model_path": self.s.model_path,
            "command": self.s.command,
        }
        if self.device.type == "cuda":
            self.meta["cuda"] = torch.version.cuda
        return self.meta

    # -- running -----------------------------------------------------------------------------------------
    def run(self, on_case: Optional[Callable[[tuple, "CaseResult"], None]] = None) -> list:
        self.collect_meta()
        results = []
        # Reference rows first within a (shape, steps, batch) group, so flm_rt rows can be compared with them.
        order = {"reference": 0}
        shapes = list(PRESET_SHAPES)
        cases = sorted(self.case_list(), key=lambda c: (shapes.index(c[0]) if c[0] in shapes else 99,
                                                       c[3], c[2] or 0, order.get(c[1], 1)))
        for case in cases:
            res = self.run_case(*case)
            results.append(res)
            if on_case is not None:
                on_case(case, res)
        if self.s.gemm_profile and self.device.type == "cpu":
            for shape, b in dict.fromkeys((c[0], c[3]) for c in cases if c[1] != AR_ROW):
                try:
                    self.gemm_profiles.append(gemm_profile(self, shape, b))
                except Exception as e:  # noqa: BLE001 - a profile must not end the suite
                    self.gemm_profiles.append({"shape": shape, "batch": b, "error": f"{type(e).__name__}: {e}"})
        self.meta["loadavg_end"] = loadavg()
        self.remeasure_peak()
        for prof in self.gemm_profiles:  # against the final rates
            if "gemms" in prof:
                prof["square_gflops"] = self.rates()[prof["dtype"]]["best"]
                for g in prof["gemms"]:
                    g["frac_square"] = g["gflops"] / prof["square_gflops"]
        self.meta.update(self.peak())
        self.meta["matmul_rates"] = self.rates()
        self.meta["gemm_profile"] = self.gemm_profiles
        for r in results:  # efficiencies against the final rate figures
            if r.status == "ok" and r.achieved_tflops is not None:
                r.peak_tflops = (self.rate_tflops(r.rate_dtype) if self.device.type == "cpu" and r.rate_dtype
                                 else self.peak()["peak_tflops"])
                r.frac_peak = r.achieved_tflops / r.peak_tflops if r.peak_tflops else None
        return results

    def _base(self, shape, row, steps, batch, seq_len=None) -> CaseResult:
        cfg = self.shape_cfg(shape)
        return CaseResult(shape=shape, row=row, steps=steps, batch=batch, seq_len=seq_len or cfg["length"],
                          vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], n_blocks=cfg["n_blocks"],
                          device=str(self.device), device_name=device_name(self.device), dtype=self.dtype_name,
                          stochasticity=self.s.stochasticity if row != AR_ROW else None,
                          threads=torch.get_num_threads())

    def run_case(self, shape: str, row: str, steps: Optional[int], batch: int) -> CaseResult:
        res = self._base(shape, row, steps, batch)
        try:
            if row == AR_ROW:
                self._run_ar(res)
            elif row in FLM_ROWS or row in EXPORT_ROWS or row in EMB_ROWS or row in BF16_ROWS:
                self._run_flm(res)
            else:
                raise ValueError(f"unknown row {row!r}; known: {', '.join(ALL_ROWS)}")
        except _Skip as e:
            res.status, res.reason = "skipped", str(e)
        except torch.OutOfMemoryError as e:
            res.status, res.reason = "skipped", f"out of memory: {str(e).splitlines()[0][:160]}"
        except Exception as e:  # noqa: BLE001 - a failing row must not end the suite
            res.status, res.reason = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        res.loadavg = loadavg()
        return res

    def _finish(self, res: CaseResult, times: list, flops: float, wbytes: int) -> None:
        res.times_s = [round(t, 6) for t in times]
        res.median_s = statistics.median(times)
        res.min_s = min(times)
        res.max_s = max(times)
        if len(times) >= 2:
            q = statistics.quantiles(times, n=4, method="inclusive")
            res.iqr_s = [q[0], q[2]]
        res.rate_dtype = res.rate_dtype or res.dtype
        tokens = res.batch * res.seq_len
        res.per_token_ms = 1e3 * res.median_s / tokens
        res.tokens_per_s = tokens / res.median_s
        res.flops_per_sample = flops
        res.achieved_tflops = flops * res.batch / res.median_s / 1e12
        res.peak_tflops = (self.rate_tflops(res.rate_dtype) if self.device.type == "cpu"
                           else self.peak()["peak_tflops"])
        res.frac_peak = res.achieved_tflops / res.peak_tflops if res.peak_tflops else None
        res.weight_bytes = int(wbytes)

    # -- FLM / FMLM rows -----------------------------------------------------------------------------------
    def _run_flm(self, res: CaseResult) -> None:
        from ..api import generate
        from .reference import draws_needed, reference_generate

        bf16 = res.row in BF16_ROWS
        if bf16:
            res.dtype = res.rate_dtype = "bfloat16"
        model = self.model(res.shape, torch.bfloat16 if bf16 else None)
        cfg = model.config
        s = self.s.stochasticity
        steps, b, L, V = res.steps, res.batch, res.seq_len, cfg.vocab_size
        need = draws_needed(True, steps, s)
        noise_bytes = need * b * L * V * 4
        predrawn = noise_bytes <= self.s.noise_budget_frac * _free_memory_bytes(self.device)
        res.noise = "pre-drawn" if predrawn else "drawn in the loop"
        seed = self.s.seed
        if predrawn:
            g = torch.Generator(device=self.device).manual_seed(seed)
            noise = torch.randn((need, b, L, V), generator=g, device=self.device)
        else:
            noise = None

        def gen():
            return torch.Generator(device=self.device).manual_seed(seed)

        if res.row == "reference":
            autocast = None if self.dtype == torch.float32 else self.dtype
            if predrawn:
                fn = lambda: reference_generate(model, noise, steps, s, autocast_dtype=autocast)  # noqa: E731
            else:
                fn = lambda: reference_generate(model, gen(), steps, s, autocast_dtype=autocast,  # noqa: E731
                                                batch=b, seq_len=L)
            res.extra["reference_precision"] = ("fp32" if autocast is None else
                                                f"{self.dtype_name} autocast, fp32 weights, plain-PyTorch attention")
        elif res.row in FLM_ROWS or res.row == BF16_ROW:
            kernels = "torch" if res.row == "flm_rt[torch-kernels]" else "auto"
            if predrawn:
                fn = lambda: generate(model, noise=noise, steps=steps, stochasticity=s, decode=False,  # noqa: E731
                                      kernels=kernels).token_ids
            else:
                fn = lambda: generate(model, num_samples=b, steps=steps, stochasticity=s,  # noqa: E731
                                      generator=gen(), decode=False, kernels=kernels).token_ids
            if kernels == "auto":
                try:
                    from .._ext import build_info

                    res.extra["kernels"] = build_info(short=True)
                except Exception as e:  # noqa: BLE001
                    res.extra["kernels"] = f"unavailable ({type(e).__name__})"
        elif res.row in EMB_ROWS:
            import inspect

            if "noise_space" not in inspect.signature(generate).parameters:
                raise _Skip("this flm_rt has no noise_space option")
            predrawn = False
            res.noise = "drawn in the loop (R^D, N(0, E^T E))"
            fn = lambda: generate(model, num_samples=b, steps=steps, stochasticity=s,  # noqa: E731
                                  generator=gen(), decode=False, noise_space="embedding").token_ids
            res.extra["note"] = "other Gaussian draws than the V-space rows: ids not comparable"
        else:
            if not predrawn:
                raise _Skip("exported graphs take explicit noise, which does not fit in memory here")
            fn = self._export_runner(res, model, noise, steps, s)

        before = self._adjacent_rate(res.rate_dtype or res.dtype)
        t = time_calls(fn, self.device, repeats=self.s.repeats, warmup=self.s.warmup, max_total_s=self.s.max_case_s)
        after = self._adjacent_rate(res.rate_dtype or res.dtype)
        times, ids = t.times_s, t.out
        space = "embedding" if res.row in EMB_ROWS else "vocab"
        res.extra["flops_counted"] = f"{space}-space process"
        self._finish(res, times, flops_per_sample(cfg, steps, L, space), weight_bytes(model))
        if before is not None and after is not None:
            # 4 significant digits: an emulated bf16 rate is about 1 GFLOP/s
            res.extra["adjacent_rate_gflops"] = [float(f"{before:.4g}"), float(f"{after:.4g}")]
            res.adjacent_tflops = max(before, after) / 1e3
            res.frac_adjacent = res.achieved_tflops / res.adjacent_tflops
        ids = torch.as_tensor(ids).to("cpu", torch.int64)
        key = (res.shape, steps, b)
        if res.row == "reference":
            self._ref_ids[key] = ids
        elif self.s.check_tokens and key in self._ref_ids and res.row not in EMB_ROWS:
            res.tokens_match_reference = float((ids == self._ref_ids[key]).float().mean())
        # bf16 rows against the fp32 row of the same noise space (same draws)
        if res.row in ("flm_rt", EMB_ROW) and res.dtype == "float32":
            self._fp32_ids[(space, *key)] = ids
        if bf16 and (space, *key) in self._fp32_ids:
            res.extra["tokens_match_fp32"] = float((ids == self._fp32_ids[(space, *key)]).float().mean())
            res.extra["native_bf16"] = native_bf16_summary()

    def _adjacent_rate(self, dtype_name: str) -> Optional[float]:
        """The best square-GEMM rate of ``dtype_name`` (GFLOP/s) measured now (CPU, ``adjacent_rate`` on): taken
        right before and right after a case, it sets an efficiency against the machine as it was during the
        case, which on a shared VM can differ from the run's start and end by tens of percent."""
        if not self.s.adjacent_rate or self.device.type != "cpu":
            return None
        return matmul_rates(self.device, getattr(torch, dtype_name), self.s.rate_n, repeats=3)["best"]

    def _export_runner(self, res: CaseResult, model, noise, steps, s):
        import importlib

        try:
            export_mod = importlib.import_module("flm_rt.exporting")
        except ImportError as e:
            raise _Skip(f"flm_rt.exporting is not available ({e})") from None
        fmt = res.row
        suffix = {"onnx": ".onnx", "torchscript": ".pt", "aoti": ".pt2"}[fmt]
        key = (res.shape, fmt, steps, s)
        if key not in self._exported:
            d = tempfile.mkdtemp(prefix="flm_rt_bench_")
            path = os.path.join(d, f"{res.shape}_{steps}_{s}{suffix}")
            t0 = time.perf_counter()
            try:
                export_mod.export(model, path, format=fmt, steps=steps, stochasticity=s)
            except Exception as e:  # noqa: BLE001
                raise _Skip(f"export to {fmt} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
            export_s = time.perf_counter() - t0
            if fmt == "onnx":
                try:
                    import onnxruntime as ort
                except ImportError:
                    raise _Skip("onnxruntime is not installed") from None
                providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda"
                             else ["CPUExecutionProvider"])
                sess = ort.InferenceSession(path, providers=[p for p in providers
                                                             if p in ort.get_available_providers()])
                input_name = sess.get_inputs()[0].name

                def run(x, _sess=sess, _name=input_name):
                    return torch.from_numpy(_sess.run(None, {_name: x.cpu().numpy()})[0])
            elif fmt == "torchscript":
                mod = torch.jit.load(path, map_location=self.device)
                run = mod.generate if hasattr(mod, "generate") else mod
            else:
                from torch._inductor import aoti_load_package

                run = aoti_load_package(path)
            self._exported[key] = (run, export_s, path)
        run, export_s, path = self._exported[key]
        res.extra["export_s"] = round(export_s, 3)
        res.extra["export_file_mb"] = round(os.path.getsize(path) / 1e6, 1) if os.path.exists(path) else None
        return lambda: run(noise)

    # -- autoregressive row --------------------------------------------------------------------------------
    def _run_ar(self, res: CaseResult) -> None:
        from .autoregressive import ar_flops_per_sample, ar_generate, ar_weight_bytes, load_ar_model

        ar = load_ar_model(self.device, self.dtype)
        target = res.seq_len
        n = min(self.s.ar_tokens or target, target)
        # Warm-up: a short decode (lazy initialisation, caches); it also estimates one full run's time, which
        # caps the number of repeats like time_calls does.
        t0 = time.perf_counter()
        ar_generate(ar, res.batch, min(8, n))
        synchronize(self.device)
        est = (time.perf_counter() - t0) / min(8, n) * n
        repeats = max(1, min(self.s.repeats, int(self.s.max_case_s // max(est, 1e-9))))
        times = time_calls(lambda: ar_generate(ar, res.batch, n), self.device, repeats=repeats, warmup=0).times_s
        # Times are scaled to `target` tokens per sample when fewer were generated (flagged; this favours the
        # AR baseline, whose per-token cost grows with the context).
        scale = target / n
        scaled = [t * scale for t in times]
        self._finish(res, scaled, ar_flops_per_sample(ar.config, target), ar_weight_bytes(ar))
        res.noise = None
        res.extra.update({"ar_model": ar.kind, "ar_source": ar.source, "ar_load_notes": ar.notes,
                          "ar_tokens_generated": n, "ar_tokens_reported": target,
                          "ar_extrapolated": n != target, "ar_measured_s": [round(t, 4) for t in times],
                          "ar_params": sum(p.numel() for p in ar.model.parameters())})


class _Skip(Exception):
    pass


# ------------------------------------------------------------------------------------------------ GEMM profile
def gemm_profile(suite: "Suite", shape: str, batch: int, repeats: int = 5) -> dict:
    """Each matrix product of one network call at (shape, batch), timed alone as flm_rt runs it (flm_rt.prepack's
    library in fp32, MKL or oneDNN; the model's own Linear in other dtypes), and the output projection also as the fused
    vocabulary pass (chunked GEMM + running argmax). GFLOP/s against the square product measured in the same run.
    """
    from .. import ops, prepack, samplers

    model = suite.model(shape)
    net = model.denoiser
    cfg = suite.shape_cfg(shape)
    L, D, V = cfg["length"], cfg["hidden_size"], cfg["vocab_size"]
    rows = batch * L
    dt = next(net.blocks.parameters()).dtype
    x = torch.randn(batch, L, D, device=suite.device)
    blk = net.blocks[0]

    def lin(layer, inp, act=None):
        if dt == torch.float32:
            return lambda: prepack.linear(inp, layer.weight, layer.bias, activation=act)
        return lambda: torch.nn.functional.linear(inp.to(dt), layer.weight, layer.bias)

    h4 = torch.randn(batch, L, 4 * D, device=suite.device)
    p = torch.softmax(torch.randn(batch, L, V, device=suite.device), -1)
    gemms = [
        ("attn_qkv", rows, 3 * D, D, lin(blk.attn_qkv, x)),
        ("attn_out", rows, D, D, lin(blk.attn_out, x)),
        ("mlp.0 (+GELU)", rows, 4 * D, D, lin(blk.mlp[0], x, "gelu_tanh")),
        ("mlp.2", rows, D, 4 * D, lin(blk.mlp[2], h4)),
        ("output projection", rows, V, D, lin(net.output_layer.linear, x)),
        ("output projection, fused pass (argmax)", rows, V, D,
         lambda: samplers.fused_output_ids(net, x)),
        ("embedding x @ E (V-space input)", rows, D, V, lambda: net.vocab_embed(p)),
        ("P @ E, fused pass (online softmax)", rows, D, V, None),
    ]
    out = {"shape": shape, "batch": batch, "dtype": str(dt).replace("torch.", ""),
           "square_gflops": suite.rates()[str(dt).replace("torch.", "")]["best"], "gemms": []}
    for name, m, n, k, fn in gemms:
        if name.startswith("P @ E"):  # the pass also does the output projection: count both GEMMs
            fn, flops = (lambda: samplers.fused_softmax_embed(net, x)), 2 * 2 * m * n * k
        else:
            flops = 2 * m * n * k
        best, times = _time_best(fn, suite.device, repeats)
        med = statistics.median(times)
        out["gemms"].append({"gemm": name, "M": m, "N": n, "K": k, "gflop": flops / 1e9,
                             "median_ms": med * 1e3, "min_ms": best * 1e3, "max_ms": max(times) * 1e3,
                             "gflops": flops / med / 1e9, "frac_square": flops / med / 1e9 / out["square_gflops"]})
    out["vocab_chunk"] = ops.vocab_chunk(rows=rows)
    return out

