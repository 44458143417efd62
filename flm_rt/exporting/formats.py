"""The three writers (ONNX, TorchScript, AOTInductor), each turning an exported module into one file, and the
ONNX form of the soft-capped attention (opset 23 ``Attention`` with ``softcap``), which the denoiser takes through
:meth:`flm_rt.model.Denoiser.set_attention`."""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings

import torch

from ..errors import ExportError
from ..model import softcapped_attention
from ..spec import ATTN_SOFTCAP
from .graphs import TorchScriptFacade

ONNX_EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with room for the graph itself

_ONNX_ATTENTION_NS = "flm_rt_export"
_attention_op = None


def _softcap_attention_op():
    """A custom op standing for softcapped_attention, translated to the ONNX (opset 23) Attention op."""
    global _attention_op
    if _attention_op is None:
        @torch.library.custom_op(f"{_ONNX_ATTENTION_NS}::softcap_attention", mutates_args=())
        def softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return softcapped_attention(q, k, v)

        @softcap_attention.register_fake
        def _(q, k, v):
            return torch.empty_like(q)

        _attention_op = softcap_attention
    return _attention_op


def _onnx_attention_translation(head_dim: int):
    from onnxscript import opset23 as op23

    scale = 1.0 / math.sqrt(head_dim)

    def attention(q, k, v):
        # q, k, v [B, H, L, d] (4-d form of the op): softmax(softcap * tanh(scale * q k^T / softcap)) v
        out = op23.Attention(q, k, v, scale=scale, softcap=ATTN_SOFTCAP)
        return out[0] if isinstance(out, (tuple, list)) else out

    return attention


def onnx_softcap_attention():
    """An attention function for :meth:`Denoiser.set_attention` that the ONNX exporter translates to the opset-23
    Attention op (see :func:`write_onnx`). There is no workspace while exporting (``prepack.cpu_fp32_inference``)."""
    op = _softcap_attention_op()

    def attention(q, k, v, workspace=None):
        return op(q, k, v)

    return attention


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


def write_onnx(module, example, input_names, output_names, dynamic_shapes, out_file, opset, use_attention,
                 head_dim, param_bytes) -> dict:
    try:
        import onnx  # noqa: F401  (checked here, before the long export, for a clear error)
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnx, onnxruntime and onnxscript: pip install 'flm_rt[export]' ({e})")
    table = None
    if use_attention:
        table = {_softcap_attention_op()._opoverload: _onnx_attention_translation(head_dim)}
    external = param_bytes > ONNX_EXTERNAL_DATA_BYTES
    with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "onnxscript"):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module, example, input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
            opset_version=opset, dynamo=True, external_data=external, custom_translation_table=table,
            verbose=False, report=False, optimize=True,
        )
    if prog is None:  # pragma: no cover
        raise ExportError("torch.onnx.export returned no program")
    prog.save(out_file, external_data=external)
    m, info = _checked_contents(out_file)
    info["opset"] = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=None)
    return info


def _checked_contents(out_file):
    """(the graph without its weights' data, {"onnx_ops", "external_data"}) of a written ONNX file, after the
    checker has passed it."""
    import onnx

    onnx.checker.check_model(out_file, full_check=False)
    m = onnx.load(out_file, load_external_data=False)
    data = sorted({e.value for init in m.graph.initializer for e in init.external_data if e.key == "location"})
    return m, {"onnx_ops": sorted({n.op_type for n in m.graph.node}), "external_data": data}


# Kept in float32 inside a float16 graph: the reductions whose fp16 form loses the distribution (Softmax,
# LayerNormalization's statistics), the ops that pick tokens (ArgMax, TopK), which must see the fp32 logits, and
# the self-noise draws (the converter would retype ConstantOfShape but not RandomNormalLike's dtype attribute).
ONNX_FP16_KEEP_FP32_OPS = ("Softmax", "LayerNormalization", "ReduceMean", "ArgMax", "TopK", "CumSum",
                           "ConstantOfShape", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike")


def convert_onnx_float16(out_file, external: bool) -> dict:
    """Rewrite the float32 graph ``out_file`` with float16 weights and compute (onnxconverter-common), keeping its
    inputs and outputs as they are (``keep_io_types``) and the ops of :data:`ONNX_FP16_KEEP_FP32_OPS` in float32."""
    import onnx
    try:
        from onnxconverter_common import float16
    except ImportError as e:
        raise ExportError(f"a float16 ONNX graph needs onnxconverter-common: pip install 'flm_rt[export]' ({e})")
    model = onnx.load(out_file, load_external_data=True)
    block = list(float16.DEFAULT_OP_BLOCK_LIST) + list(ONNX_FP16_KEEP_FP32_OPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "values were truncated to fp16 range": the soft-capped weights are small
        model = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block,
                                                 disable_shape_infer=external)
    base = os.path.basename(out_file)
    onnx.save_model(model, out_file, save_as_external_data=external, all_tensors_to_one_file=True,
                    location=base + ".data" if external else None)
    m, info = _checked_contents(out_file)
    inits = m.graph.initializer
    return {**info, "fp16_converter": "onnxconverter-common float16.convert_float_to_float16(keep_io_types=True)",
            "fp32_ops": list(ONNX_FP16_KEEP_FP32_OPS),
            "float16_initializers": sum(i.data_type == onnx.TensorProto.FLOAT16 for i in inits),
            "initializers": len(inits)}


def write_torchscript(module, example, out_file, what) -> dict:
    method = "generate" if what == "generate" else "denoise"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about constant shapes: the scripted checks cover them
        traced = torch.jit.trace_module(TorchScriptFacade(module), {"forward": example, method: example},
                                        check_trace=False)
    torch.jit.save(traced, out_file)
    return {"methods": ["forward", method]}


def write_aoti(module, example, dynamic_shapes, out_file) -> dict:
    import torch._inductor

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)
        t1 = time.perf_counter()
        torch._inductor.aoti_compile_and_package(ep, package_path=out_file)
    t2 = time.perf_counter()
    return {"export_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3)}
