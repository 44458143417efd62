"""Export a model to self-contained graphs: ONNX, TorchScript or an AOTInductor package.

Two graphs can be exported (``what``):

* ``"generate"``: the whole sampler, unrolled over ``steps`` with its schedule (network times and update
  coefficients of :func:`flm_rt.samplers.make_plan`) baked in as constants.
  ``forward(noise [S, B, L, V] float32) -> token_ids [B, L] int64``; ``S`` = the number of Gaussian draws the
  plan consumes (z_0, then one per stochastic step, SPEC order), so feeding the golden draws reproduces the golden
  ids. With ``self_noise=True`` the draws are taken inside the graph instead and the input is
  ``batch_like int64 [B]`` (only its length matters: it sets the batch size).
* ``"denoiser"``: one network call, ``forward(x [B, L, V], t [B][, t_prime [B]]) -> soft-capped logits [B, L, V]``.

Every artifact gets a JSON sidecar ``<path>.json`` (shapes, schedule, tokenizer, inputs/outputs, version) that the
standalone consumers in ``export/`` read; they do not need flm_rt. Writes are atomic: a failed export leaves
nothing under the requested name.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from .errors import FlmError

__all__ = ["export", "cli_export", "ExportError", "GenerateGraph", "DenoiserGraph", "FORMATS", "WHATS", "read_sidecar",
           "load_exported", "time_exported"]

FORMATS = ("onnx", "torchscript", "aoti")
WHATS = ("generate", "denoiser")
DEFAULT_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "aoti": ".pt2"}
MIN_OPSET = 18
ONNX_EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with room for the graph itself
SIDECAR_SCHEMA = 1


class ExportError(FlmError, ValueError):
    """An export request that cannot be carried out (bad format/what/steps, unwritable output, unsupported model)."""


# ------------------------------------------------------------------------------------------------- graphs
def _noise_check_ts(noise: torch.Tensor, draws: int, length: int, vocab: int, batch: int) -> torch.Tensor:
    # Compiled with torch.jit.script (below) so that the checks survive torch.jit.trace of the wrapper.
    if noise.dim() != 4:
        raise RuntimeError("flm_rt generate graph: noise must be [S, B, L, V] = [" + str(draws) + ", B, "
                           + str(length) + ", " + str(vocab) + "], got a " + str(noise.dim()) + "-d tensor")
    if noise.size(0) != draws or noise.size(2) != length or noise.size(3) != vocab:
        raise RuntimeError("flm_rt generate graph: noise must be [S, B, L, V] = [" + str(draws) + ", B, "
                           + str(length) + ", " + str(vocab) + "], got " + str(noise.size()))
    if batch > 0 and noise.size(1) != batch:
        raise RuntimeError("flm_rt generate graph: this graph was exported for batch " + str(batch)
                           + ", got " + str(noise.size(1)))
    if noise.size(1) < 1:
        raise RuntimeError("flm_rt generate graph: empty batch")
    return noise


def _denoiser_check_ts(x: torch.Tensor, t: torch.Tensor, length: int, vocab: int) -> torch.Tensor:
    if x.dim() != 3 or x.size(1) != length or x.size(2) != vocab:
        raise RuntimeError("flm_rt denoiser graph: x must be [B, " + str(length) + ", " + str(vocab) + "], got "
                           + str(x.size()))
    if t.dim() != 1 or t.size(0) != x.size(0):
        raise RuntimeError("flm_rt denoiser graph: t must be [B] with B = " + str(x.size(0)) + ", got "
                           + str(t.size()))
    return x


_SCRIPTED: dict = {}


def _scripted(fn):
    """torch.jit.script(fn), compiled lazily and once (TorchScript is only needed for that format)."""
    if fn.__name__ not in _SCRIPTED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _SCRIPTED[fn.__name__] = torch.jit.script(fn)
    return _SCRIPTED[fn.__name__]


class GenerateGraph(nn.Module):
    """The sampler of :mod:`flm_rt.samplers`, unrolled, with the plan's constants as buffers."""

    def __init__(self, denoiser: nn.Module, plan, *, vocab_size: int, length: int, batch: Optional[int] = None,
                 self_noise: bool = False):
        super().__init__()
        from .samplers import draws_needed

        self.denoiser = denoiser
        self.plan = tuple(plan)
        self.draws = draws_needed(self.plan)
        self.vocab_size = int(vocab_size)
        self.length = int(length)
        self.batch = int(batch) if batch else 0
        self.self_noise = bool(self_noise)
        for i, st in enumerate(self.plan):
            # float32, exactly as run_plan builds them, so the graphs reproduce generate() bit for bit
            self.register_buffer(f"coef{i}", torch.tensor([st.a, st.b, st.c], dtype=torch.float32))

    def _draws(self, x: torch.Tensor) -> torch.Tensor:
        if not self.self_noise:
            if torch.jit.is_tracing():
                _scripted(_noise_check_ts)(x, self.draws, self.length, self.vocab_size, self.batch)
            else:
                torch._check(x.dim() == 4, lambda: "noise must be [S, B, L, V]")
                torch._check(x.shape[0] == self.draws, lambda: f"noise must hold S={self.draws} draws")
                torch._check(x.shape[2] == self.length, lambda: f"noise must have L={self.length}")
                torch._check(x.shape[3] == self.vocab_size, lambda: f"noise must have V={self.vocab_size}")
            return x
        b = self.batch if self.batch else x.shape[0]
        return torch.randn((self.draws, b, self.length, self.vocab_size), dtype=torch.float32, device=x.device)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        from . import ops
        from .model import LOGIT_SOFTCAP
        from .samplers import output_ids

        noise = self._draws(noise)
        z = noise[0]
        used = 1
        for i, st in enumerate(self.plan):
            t = torch.full_like(z[:, 0, 0], st.t)
            tp = None if st.t_prime is None else torch.full_like(z[:, 0, 0], st.t_prime)
            logits = self.denoiser(z, t, tp)
            if st.last:
                return output_ids(logits, kernels="torch").to(torch.int64)
            coef = getattr(self, f"coef{i}")
            eps = None
            if st.uses_draw:
                eps = noise[used]
                used += 1
            z = ops.flow_map_step(z, logits, coef[0:1], coef[1:2], coef[2:3], eps, LOGIT_SOFTCAP, backend="torch")
        raise AssertionError("a plan always ends with a last step")


class DenoiserGraph(nn.Module):
    """One network call returning the 30-soft-capped logits (the model's distribution is their softmax)."""

    def __init__(self, denoiser: nn.Module, *, vocab_size: int, length: int, two_time: bool):
        super().__init__()
        self.denoiser = denoiser
        self.vocab_size, self.length, self.two_time = int(vocab_size), int(length), bool(two_time)

    def _check(self, x, t):
        if torch.jit.is_tracing():
            _scripted(_denoiser_check_ts)(x, t, self.length, self.vocab_size)
        else:
            torch._check(x.shape[-1] == self.vocab_size, lambda: f"x must have V={self.vocab_size}")
            torch._check(x.shape[-2] == self.length, lambda: f"x must have L={self.length}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, t_prime: Optional[torch.Tensor] = None) -> torch.Tensor:
        from .model import LOGIT_SOFTCAP, softcap_logits

        self._check(x, t)
        return softcap_logits(self.denoiser(x, t, t_prime if self.two_time else None).float(), LOGIT_SOFTCAP)


class _TorchScriptFacade(nn.Module):
    """What gets traced: forward, plus the same graph under a meaningful name: generate(noise) for the sampler,
    denoise(x, t[, t_prime]) for the denoiser."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)

    def generate(self, noise):
        return self.inner(noise)

    def denoise(self, *args):
        return self.inner(*args)


# ------------------------------------------------------------------------------------------- ONNX attention
_ONNX_ATTENTION_NS = "flm_rt_export"
_attention_op = None


def _softcap_attention_op():
    """A custom op standing for softcapped_attention, translated to the ONNX (opset 23) Attention op."""
    global _attention_op
    if _attention_op is None:
        from .model import ATTN_SOFTCAP

        @torch.library.custom_op(f"{_ONNX_ATTENTION_NS}::softcap_attention", mutates_args=())
        def softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            scores = ATTN_SOFTCAP * torch.tanh(scores / ATTN_SOFTCAP)
            return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)

        @softcap_attention.register_fake
        def _(q, k, v):
            return torch.empty_like(q)

        _attention_op = softcap_attention
    return _attention_op


def _onnx_attention_translation(head_dim: int):
    from onnxscript import opset23 as op23

    from .model import ATTN_SOFTCAP

    scale = 1.0 / math.sqrt(head_dim)

    def attention(q, k, v):
        # q, k, v [B, H, L, d] (4-d form of the op): softmax(softcap * tanh(scale * q k^T / softcap)) v
        out = op23.Attention(q, k, v, scale=scale, softcap=ATTN_SOFTCAP)
        return out[0] if isinstance(out, (tuple, list)) else out

    return attention


@contextlib.contextmanager
def _patched_attention(enabled: bool):
    if not enabled:
        yield
        return
    from . import model as model_mod

    op = _softcap_attention_op()
    saved = model_mod.softcapped_attention

    def attention(q, k, v, workspace=None):  # no workspace while exporting (flm_rt.prepack.cpu_fp32_inference)
        return op(q, k, v)

    model_mod.softcapped_attention = attention
    try:
        yield
    finally:
        model_mod.softcapped_attention = saved


# ------------------------------------------------------------------------------------------------ helpers
def _resolve_dtype(dtype, model) -> torch.dtype:
    from .api import resolve_dtype

    if dtype is None:
        return getattr(model, "dtype", torch.float32)
    try:
        return resolve_dtype(dtype)
    except FlmError as e:
        raise ExportError(str(e)) from None


def _check_args(format, what, steps, stochasticity, batch, seq_len, opset, cfg) -> None:
    if format not in FORMATS:
        raise ExportError(f"unsupported export format {format!r}: use one of {', '.join(FORMATS)}")
    if what not in WHATS:
        raise ExportError(f"unsupported export target what={what!r}: use 'generate' or 'denoiser'")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ExportError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(stochasticity, bool) or not isinstance(stochasticity, (int, float)) \
            or not 0.0 <= float(stochasticity) <= 1.0:
        raise ExportError(f"stochasticity must be a number in [0, 1], got {stochasticity!r}")
    if not cfg.two_time and float(stochasticity) != 0.0:
        raise ExportError("stochasticity applies to two-time (FMLM) models only; this is an FLM model")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ExportError(f"batch must be an int >= 1 (or None for a dynamic batch), got {batch!r}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int)
                                or not 1 <= seq_len <= cfg.length):
        raise ExportError(f"seq_len must be an int in [1, {cfg.length}] (the trained length), got {seq_len!r}")
    if opset is not None:
        if format != "onnx":
            raise ExportError("opset applies to format='onnx' only")
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
            raise ExportError(f"opset must be an int >= {MIN_OPSET} (the torch.onnx dynamo exporter), got {opset!r}")


def _check_model(model) -> None:
    from .model import Denoiser, ModelConfig

    cfg = getattr(model, "config", None)
    net = getattr(model, "denoiser", None)
    if not isinstance(cfg, ModelConfig) or not isinstance(net, Denoiser):
        raise ExportError(f"export needs an flm_rt.Model (from flm_rt.load or flm_rt.random_model), "
                          f"got {type(model).__name__}")
    for name, p in net.named_parameters():
        if p.device.type == "meta":
            raise ExportError(f"cannot export: parameter {name} has no data (meta tensor); load real weights")


def _check_output_path(path: str, overwrite: bool = False) -> str:
    from .outputs import check_destination

    path = os.fspath(path)
    if not path or os.path.isdir(path):
        raise ExportError(f"output path {path!r} is a directory; give a file name such as model.onnx")
    for p in (path, path + ".json"):  # the same rule as convert: refuse, or replace only a previous export
        check_destination(p, overwrite=overwrite, error=ExportError, hint="pass overwrite=True (--overwrite)",
                          replaceable=os.path.isfile)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ExportError(f"output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"output directory {parent} is not writable")
    return path


def _version() -> str:
    try:
        from . import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def _tokenizer_kind(cfg) -> Optional[str]:
    kind = cfg.tokenizer
    if kind == "gpt2" and cfg.vocab_size not in (50257, 50258):
        return None
    if kind == "bert-base-uncased" and cfg.vocab_size != 30522:
        return None
    return kind


def _sidecar(*, format, what, cfg, plan, steps, stochasticity, batch, length, dtype, self_noise, opset,
             attention, inputs, outputs, extra=None) -> dict:
    from .samplers import draws_needed

    d = {
        "schema": SIDECAR_SCHEMA,
        "producer": "flm_rt", "flm_rt_version": _version(), "torch_version": torch.__version__,
        "format": format, "what": what,
        "kind": "fmlm" if cfg.two_time else "flm", "two_time": cfg.two_time,
        "vocab_size": cfg.vocab_size, "length": length, "trained_length": cfg.length,
        "hidden_size": cfg.hidden_size, "n_blocks": cfg.n_blocks, "n_heads": cfg.n_heads, "cond_dim": cfg.cond_dim,
        "tokenizer": _tokenizer_kind(cfg),
        "steps": steps if what == "generate" else None,
        "stochasticity": stochasticity if what == "generate" else None,
        "draws": draws_needed(plan) if (what == "generate" and plan) else None,
        "self_noise": self_noise, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
        "logit_softcap": 30.0,
        "plan": [{"t": s.t, "t_prime": s.t_prime, "a": s.a, "b": s.b, "c": s.c, "last": s.last} for s in plan]
        if what == "generate" else None,
        "inputs": inputs, "outputs": outputs,
    }
    if format == "onnx":
        d["opset"] = opset
        d["attention"] = attention
    d.update(extra or {})
    return d


@contextlib.contextmanager
def _quiet_loggers(*names):
    """The exporters log harmless notes at WARNING (missing torchvision ops, optimizer skips): keep ERRORs only."""
    import logging

    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


# ------------------------------------------------------------------------------------------------ exporters
def _export_onnx(module, example, input_names, output_names, dynamic_shapes, out_file, opset, use_attention,
                 head_dim, param_bytes) -> dict:
    try:
        import onnx
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnx, onnxruntime and onnxscript: pip install 'flm_rt[export]' ({e})")
    table = None
    if use_attention:
        table = {_softcap_attention_op()._opoverload: _onnx_attention_translation(head_dim)}
    external = param_bytes > ONNX_EXTERNAL_DATA_BYTES
    with _patched_attention(use_attention), warnings.catch_warnings(), _quiet_loggers("torch.onnx", "onnxscript"):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module, example, input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
            opset_version=opset, dynamo=True, external_data=external, custom_translation_table=table,
            verbose=False, report=False, optimize=True,
        )
    if prog is None:  # pragma: no cover
        raise ExportError("torch.onnx.export returned no program")
    prog.save(out_file, external_data=external)
    onnx.checker.check_model(out_file, full_check=False)
    m = onnx.load(out_file, load_external_data=False)
    ops_used = sorted({n.op_type for n in m.graph.node})
    opset_used = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=None)
    data_files = sorted({e.value for init in m.graph.initializer for e in init.external_data if e.key == "location"})
    return {"opset": opset_used, "onnx_ops": ops_used, "external_data": data_files}


def _export_torchscript(module, example, out_file, what) -> dict:
    method = "generate" if what == "generate" else "denoise"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about constant shapes: the scripted checks cover them
        traced = torch.jit.trace_module(_TorchScriptFacade(module), {"forward": example, method: example},
                                        check_trace=False)
    torch.jit.save(traced, out_file)
    return {"methods": ["forward", method]}


def _export_aoti(module, example, dynamic_shapes, out_file) -> dict:
    import torch._inductor

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)
        t1 = time.perf_counter()
        torch._inductor.aoti_compile_and_package(ep, package_path=out_file)
    t2 = time.perf_counter()
    return {"export_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3)}


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def export(model, path, *, format: str = "onnx", what: str = "generate", steps: int = 1,
           stochasticity: float = 0.0, batch: Optional[int] = None, seq_len: Optional[int] = None, dtype=None,
           opset: Optional[int] = None, self_noise: bool = False, onnx_attention: Optional[str] = None,
           progress: bool = False, overwrite: bool = False) -> str:
    """Export ``model`` (an :class:`flm_rt.Model`) to ``path``; returns ``path``. Also writes ``<path>.json``.

    format: "onnx" (torch.onnx dynamo exporter, standard ops, opset >= 18), "torchscript" (torch.jit.trace, saved
    with torch.jit.save; deprecated upstream, prefer "aoti") or "aoti" (torch.export + AOTInductor ``.pt2``).
    what: "generate" (noise [S, B, L, V] -> ids [B, L]; steps/stochasticity baked in) or "denoiser"
    (x [B, L, V], t [B][, t_prime [B]] -> soft-capped logits [B, L, V]).
    batch: fix the batch size (default: dynamic). seq_len: L (default: the trained length).
    dtype: compute dtype (default: the model's); float32 reproduces generate() exactly.
    self_noise: generate graph draws its own Gaussian noise; input ``batch_like int64 [B]``.
    onnx_attention: "decomposed" (default) or "attention" (the opset-23 Attention op with softcap).
    progress: a tqdm bar over the stages (prepare, export, write); the export stage is the long one (10-60 s).
    overwrite: replace an existing ``path`` (default: refuse it, as convert does).
    """
    from .samplers import make_plan

    _check_model(model)
    cfg = model.config
    _check_args(format, what, steps, stochasticity, batch, seq_len, opset, cfg)
    if self_noise and what != "generate":
        raise ExportError("self_noise applies to what='generate' only")
    if onnx_attention not in (None, "decomposed", "attention"):
        raise ExportError(f"onnx_attention must be 'decomposed' or 'attention', got {onnx_attention!r}")
    use_attention = format == "onnx" and onnx_attention == "attention"
    if onnx_attention is not None and format != "onnx":
        raise ExportError("onnx_attention applies to format='onnx' only")
    stochasticity = float(stochasticity)
    dt = _resolve_dtype(dtype, model)
    if format == "onnx" and dt != torch.float32:
        raise ExportError(f"ONNX export supports float32 only (got {dt}); mixed-precision autocast regions do not "
                          "map onto standard ONNX ops. Use format='aoti' or 'torchscript' for bf16/fp16")
    if use_attention:
        opset = max(opset or 23, 23)
    path = _check_output_path(path, overwrite)
    length = seq_len or cfg.length
    plan = make_plan(two_time=cfg.two_time, steps=steps, stochasticity=stochasticity,
                     vocab_size=cfg.vocab_size) if what == "generate" else ()

    from tqdm.auto import tqdm

    stages = tqdm(total=3, desc="export: prepare", unit="stage", disable=not progress, leave=False)
    device = torch.device("cpu") if format == "onnx" else model.device
    net = copy.deepcopy(model.denoiser).to(device).eval().requires_grad_(False)
    net.set_compute_dtype(dt)
    V = cfg.vocab_size
    bsz_example = batch or 2  # 2, not 1: a size-1 example would be specialised by torch.export

    if what == "generate":
        module = GenerateGraph(net, plan, vocab_size=V, length=length, batch=batch, self_noise=self_noise).eval()
        if self_noise:
            example = (torch.zeros(bsz_example, dtype=torch.int64, device=device),)
            input_names = ["batch_like"]
            inputs = [{"name": "batch_like", "dtype": "int64", "shape": [batch or "B"],
                       "doc": "only its length matters: the batch size"}]
            dyn = None if batch else ({0: torch.export.Dim("B", min=1, max=65536)},)
        else:
            example = (torch.zeros(module.draws, bsz_example, length, V, device=device),)
            input_names = ["noise"]
            inputs = [{"name": "noise", "dtype": "float32", "shape": [module.draws, batch or "B", length, V],
                       "doc": "standard-normal draws z_0, eps_0, ... (SPEC order)"}]
            dyn = None if batch else ({1: torch.export.Dim("B", min=1, max=65536)},)
        output_names = ["token_ids"]
        outputs = [{"name": "token_ids", "dtype": "int64", "shape": [batch or "B", length]}]
    else:
        module = DenoiserGraph(net, vocab_size=V, length=length, two_time=cfg.two_time).eval()
        x = torch.zeros(bsz_example, length, V, device=device)
        t = torch.zeros(bsz_example, device=device)
        example = (x, t, t.clone()) if cfg.two_time else (x, t)
        input_names = ["x", "t", "t_prime"][: len(example)]
        bdim = batch or "B"
        inputs = [{"name": "x", "dtype": "float32", "shape": [bdim, length, V]},
                  {"name": "t", "dtype": "float32", "shape": [bdim]},
                  {"name": "t_prime", "dtype": "float32", "shape": [bdim]}][: len(example)]
        if batch:
            dyn = None
        else:
            b = torch.export.Dim("B", min=1, max=65536)
            dyn = ({0: b}, {0: b}, {0: b})[: len(example)]
        output_names = ["logits"]
        outputs = [{"name": "logits", "dtype": "float32", "shape": [bdim, length, V],
                    "doc": "30 * tanh(raw / 30); softmax of these is the model's distribution"}]

    parent = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    tmpdir = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
    try:
        tmp_file = os.path.join(tmpdir, base)
        stages.set_description(f"export: {format} {what} graph")
        stages.update(1)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                if format == "onnx":
                    info = _export_onnx(module, example, input_names, output_names, dyn, tmp_file, opset,
                                        use_attention, cfg.head_dim, _param_bytes(module))
                elif format == "torchscript":
                    info = _export_torchscript(module, example, tmp_file, what)
                else:
                    info = _export_aoti(module, example, dyn, tmp_file)
        except ExportError:
            raise
        except Exception as e:  # the exporters raise many types; name the stage and keep the cause
            raise ExportError(f"{format} export of the {what} graph failed: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        info["total_s"] = round(time.perf_counter() - t0, 3)
        stages.set_description("export: write")
        stages.update(1)
        meta = _sidecar(format=format, what=what, cfg=cfg, plan=plan, steps=steps, stochasticity=stochasticity,
                        batch=batch, length=length, dtype=dt, self_noise=self_noise,
                        opset=info.get("opset"), attention=("onnx-attention-softcap" if use_attention
                                                            else "decomposed"),
                        inputs=inputs, outputs=outputs, extra={"export_info": info})
        with open(tmp_file + ".json", "w") as f:
            json.dump(meta, f, indent=1)
        # move into place: data files first, the sidecar, the main file last
        for name in info.get("external_data", []):
            os.replace(os.path.join(tmpdir, name), os.path.join(parent, name))
        os.replace(tmp_file + ".json", path + ".json")
        os.replace(tmp_file, path)
        stages.update(1)
    finally:
        stages.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


# ------------------------------------------------------------------------------------- running artifacts
def read_sidecar(path) -> dict:
    """The JSON sidecar ``<path>.json`` written next to an exported artifact."""
    side = os.fspath(path) + ".json"
    if not os.path.isfile(side):
        raise ExportError(f"no sidecar {side}: was {path} written by flm_rt.export?")
    with open(side) as f:
        return json.load(f)


def load_exported(path, *, threads: Optional[int] = None):
    """Load an exported generate or denoiser artifact (.onnx via onnxruntime, TorchScript .pt, AOTInductor .pt2)
    as a function of torch tensors returning a torch tensor (CPU for ONNX). AOTI input checks are turned on."""
    path = os.fspath(path)
    meta = read_sidecar(path)
    fmt = meta["format"]
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]

        def run_onnx(*args):
            feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
            return torch.from_numpy(sess.run(None, feeds)[0])
        return run_onnx
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(path)
        return module.forward
    if fmt == "aoti":
        os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"  # always: unchecked, a wrong shape is read past its end
        from torch._inductor import aoti_load_package

        return aoti_load_package(path)
    raise ExportError(f"unknown format {fmt!r} in {path}.json")


def time_exported(path, *, batch: int = 1, repeats: int = 10, warmup: int = 2, seed: int = 0,
                  threads: Optional[int] = None, noise: Optional[torch.Tensor] = None) -> dict:
    """Time an exported generate graph on standard-normal noise (drawn once, outside the timing).

    Returns ``{"format", "steps", "batch", "length", "median_s", "min_s", "tokens_per_s", "ms_per_token",
    "times_s"}``. ``threads`` sets ONNX Runtime's intra-op threads (torch's are left as they are)."""
    meta = read_sidecar(path)
    if meta.get("what") != "generate":
        raise ExportError("time_exported times generate graphs")
    run = load_exported(path, threads=threads)
    b = meta.get("batch") or batch
    if meta.get("self_noise"):
        x = torch.zeros(b, dtype=torch.int64)
    elif noise is not None:
        x = noise[: meta["draws"]].contiguous()
        b = x.shape[1]
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(meta["draws"], b, meta["length"], meta["vocab_size"], generator=g)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            run(x)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    n_tok = b * meta["length"]
    return {"format": meta["format"], "steps": meta["steps"], "batch": b, "length": meta["length"],
            "median_s": med, "min_s": times[0], "tokens_per_s": n_tok / med, "ms_per_token": 1e3 * med / n_tok,
            "times_s": times}


# ----------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flm-rt export", description="Export a model to ONNX, TorchScript or an "
                                "AOTInductor package (+ a JSON sidecar <OUT>.json).")
    p.add_argument("model", help="Hub name (e.g. david3684/FMLM-B-OWT), .ckpt file, hub or flm_rt directory")
    p.add_argument("out", help="output file (e.g. model.onnx, model.pt, model.pt2)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--what", default="generate", choices=WHATS)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--stochasticity", type=float, default=None,
                   help="FMLM only, in [0, 1] (default: the checkpoint's, else 0)")
    p.add_argument("--batch", type=int, default=None, help="fixed batch size (default: dynamic)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--dtype", default=None, help="float32 (default) | bfloat16 | float16 (not ONNX)")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (>= {MIN_OPSET})")
    p.add_argument("--self-noise", action="store_true", help="draw the noise inside the graph")
    p.add_argument("--onnx-attention", choices=["decomposed", "attention"], default=None)
    p.add_argument("--device", default="cpu", help="device to load/export on (AOTI compiles for it)")
    p.add_argument("--n-heads", type=int, default=None)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a bar over the export stages (default: on in a terminal)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (and OUT.json)")
    return p


def cli_export(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    from .api import load

    model = load(args.model, device=args.device, n_heads=args.n_heads, use_ema=not args.no_ema)
    s = args.stochasticity
    if s is None:
        s = model.config.default_stochasticity if model.config.two_time else 0.0
    t0 = time.perf_counter()
    out = export(model, args.out, format=args.format, what=args.what, steps=args.steps, stochasticity=s,
                 batch=args.batch, seq_len=args.seq_len, dtype=args.dtype, opset=args.opset,
                 self_noise=args.self_noise, onnx_attention=args.onnx_attention,
                 progress=sys.stderr.isatty() if args.progress is None else args.progress,
                 overwrite=args.overwrite)
    print(f"wrote {out} (+ {out}.json): {args.format} {args.what}"
          + (f", {args.steps} step(s), stochasticity {s}" if args.what == "generate" else "")
          + f" in {time.perf_counter() - t0:.1f} s", file=sys.stdout)
    return 0
