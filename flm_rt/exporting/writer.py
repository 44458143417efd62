"""``export()``: check a request, build the graph module, run one writer, and move the file, its external data
and its JSON sidecar into place atomically (a failed export leaves nothing under the requested name)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from typing import Optional

import torch
from torch import nn

from .._version import __version__
from ..devices import dtype_name, resolve_dtype
from ..errors import ExportError, FlmError
from ..model import Denoiser, ModelConfig
from ..outputs import check_destination
from ..samplers import SamplerSettingsError, check_settings, draws_needed, make_plan
from ..spec import LOGIT_SOFTCAP
from ..tokenizer import fitting_kind
from .formats import convert_onnx_float16, onnx_softcap_attention, write_aoti, write_onnx, write_torchscript
from .graphs import DenoiserGraph, GenerateGraph

FORMATS = ("onnx", "torchscript", "aoti")
WHATS = ("generate", "denoiser")
MIN_OPSET = 18
SIDECAR_SCHEMA = 1


def _resolve_dtype(dtype, model) -> torch.dtype:
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
    try:
        check_settings(two_time=cfg.two_time, steps=steps, stochasticity=stochasticity)
    except SamplerSettingsError as e:
        raise ExportError(str(e)) from None
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
    cfg = getattr(model, "config", None)
    net = getattr(model, "denoiser", None)
    if not isinstance(cfg, ModelConfig) or not isinstance(net, Denoiser):
        raise ExportError(f"export needs an flm_rt.Model (from flm_rt.load or flm_rt.random_model), "
                          f"got {type(model).__name__}")
    for name, p in net.named_parameters():
        if p.device.type == "meta":
            raise ExportError(f"cannot export: parameter {name} has no data (meta tensor); load real weights")


def _check_output_path(path: str, overwrite: bool = False) -> str:
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


def _sidecar(*, format, what, cfg, plan, steps, stochasticity, batch, length, dtype, self_noise, opset,
             attention, inputs, outputs, extra=None) -> dict:
    d = {
        "schema": SIDECAR_SCHEMA,
        "producer": "flm_rt", "flm_rt_version": __version__, "torch_version": torch.__version__,
        "format": format, "what": what,
        "kind": "fmlm" if cfg.two_time else "flm", "two_time": cfg.two_time,
        "vocab_size": cfg.vocab_size, "length": length, "trained_length": cfg.length,
        "hidden_size": cfg.hidden_size, "n_blocks": cfg.n_blocks, "n_heads": cfg.n_heads, "cond_dim": cfg.cond_dim,
        "tokenizer": fitting_kind(cfg.tokenizer, cfg.vocab_size),
        "steps": steps if what == "generate" else None,
        "stochasticity": stochasticity if what == "generate" else None,
        "draws": draws_needed(plan) if (what == "generate" and plan) else None,
        "self_noise": self_noise, "batch": batch, "dtype": dtype_name(dtype),
        "logit_softcap": LOGIT_SOFTCAP,
        "plan": [{"t": s.t, "t_prime": s.t_prime, "a": s.a, "b": s.b, "c": s.c, "last": s.last} for s in plan]
        if what == "generate" else None,
        "inputs": inputs, "outputs": outputs,
    }
    if format == "onnx":
        d["opset"] = opset
        d["attention"] = attention
    d.update(extra or {})
    return d


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
    dtype: compute dtype (default: the model's); float32 reproduces generate() exactly. ONNX: float32, or float16
    (the float32 graph converted by onnxconverter-common, float32 noise in, int64 ids out); bfloat16 is refused.
    self_noise: generate graph draws its own Gaussian noise; input ``batch_like int64 [B]``.
    onnx_attention: "decomposed" (default) or "attention" (the opset-23 Attention op with softcap).
    progress: a tqdm bar over the stages (prepare, export, write); the export stage is the long one (10-60 s).
    overwrite: replace an existing ``path`` (default: refuse it, as convert does).
    """
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
    if format == "onnx" and dt == torch.bfloat16:
        raise ExportError("ONNX export does not write bfloat16 graphs: ONNX Runtime has no bfloat16 kernels for most "
                          "ops (MatMul, Add, Tanh, Softmax, ... are NOT_IMPLEMENTED on the CPU provider), so the "
                          "graph would not run. Use dtype='float16' (a converted float16 graph), or "
                          "format='aoti'/'torchscript' for bfloat16")
    if format == "onnx" and dt not in (torch.float32, torch.float16):
        raise ExportError(f"ONNX export supports float32 and float16, got {dt}")
    onnx_fp16 = format == "onnx" and dt == torch.float16  # exported in float32, then converted
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
    net.set_compute_dtype(torch.float32 if onnx_fp16 else dt)
    if use_attention:
        net.set_attention(onnx_softcap_attention())
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
                    info = write_onnx(module, example, input_names, output_names, dyn, tmp_file, opset,
                                        use_attention, cfg.head_dim, _param_bytes(module))
                    if onnx_fp16:
                        info.update(convert_onnx_float16(tmp_file, bool(info["external_data"])))
                elif format == "torchscript":
                    info = write_torchscript(module, example, tmp_file, what)
                else:
                    info = write_aoti(module, example, dyn, tmp_file)
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
