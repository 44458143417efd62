"""Prepacked weights for the CPU matmuls of the denoiser: MKL's packed sgemm or oneDNN's blocked layout.

``F.linear`` on CPU re-reads the weight in its PyTorch layout on every call; a GEMM on a weight reordered once into
the library's own layout runs the same product faster on this model's shapes (1.2x to 2.2x with oneDNN on the
[V, D] output projection and embedding; figures in docs/KERNELS.md). Two libraries, one per process for fp32
(:func:`fp32_library`): MKL's packed sgemm (``cblas_sgemm_pack``/``compute`` through ``torch.ops.mkl``), 5-15%
faster than oneDNN on every block shape on the Intel machines measured, but packed for one row count M (a weight
keeps its packed copies for the last :data:`MKL_ROW_COUNTS` row counts it met); and oneDNN's
``_linear_pointwise``, which runs the bf16 products. The MLP's GELU runs after the product as the in-place
``flm_rt::gelu_tanh_`` (oneDNN's fused GELU post-op, the fallback without the compiled extension, made the
[1024 x 3072 x 768] product 1.25x slower than the plain product plus that pass on a 2-core AVX2 Zen 3);
``FLM_RT_GELU_PASS=0`` goes back to the post-op. The packed copies are made lazily on first use and cached per
weight tensor, keyed on the tensor's storage and version counter, so an in-place change or a reload of the weight
re-packs it (weights made under ``torch.inference_mode`` have no version counter: an in-place change to one,
possible only inside inference mode, is not seen; call :func:`clear_cache` after one). The cache lives outside the
modules (state dicts, ``deepcopy`` and export see plain ``nn.Linear`` weights).

It applies only where it computes the same function as ``F.linear`` up to float rounding (relative 1e-6): fp32
tensors on CPU, autocast off, no autograd, not while tracing or exporting, and when torch has the library's ops; and
to the bf16 weights of ``dtype="bfloat16"`` models under CPU bf16 autocast where the CPU has native bf16
(flm_rt.cpu_features), computing what autocast's ``F.linear`` computes (bf16 inputs and output) up to bf16
rounding. Anything else takes ``F.linear``. ``FLM_RT_PREPACK=0`` (or :func:`set_enabled`) turns it off;
``FLM_RT_PREPACK_LIBRARY=mkl|onednn`` overrides the fp32 library (default ``auto``: MKL on Intel CPUs where torch
has it, else oneDNN). The cost is one more copy of the weights in memory per packed row count.

One bf16 shape class takes another product: a narrow weight (out <= 1024) against more rows than outputs, e.g. the
blocks' [1024 x 768] attn_out and mlp.2 products at 1024 rows, where oneDNN's linear ran at about half its rate
(1000-1250 GFLOP/s against 2000 on the 2-core development machine with AMX, docs/KERNELS.md). There, for a caller
that accepts it (``any_layout=True``), the product is computed as ``W @ X^T`` and returned as the transposed view of
that [out, rows] result; ``flm_rt.ops.scaled_add`` reads such a view by tiles. This is the default only where the
bf16 GEMMs run on AMX: on a 2-core Zen 5 with AVX512-BF16 and no AMX, oneDNN's linear ran those shapes at
810-880 GFLOP/s, faster than the transposed product, which made a B 8 step 9% slower there.
``FLM_RT_TRANSPOSED_GEMM=1`` / ``0`` forces it on / off.
"""
from __future__ import annotations

import functools
import os
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from .limits import env_switch
from .tracing import is_capturing

__all__ = ["linear", "set_enabled", "is_enabled", "clear_cache", "reread_switches", "cpu_fp32_inference",
           "fp32_library", "MKL_ROW_COUNTS"]

_ENABLED: Optional[bool] = None  # None: read FLM_RT_PREPACK on first use
_TRANSPOSED_MAX_OUT = 1024  # the bf16 transposed product: weights with at most this many outputs, more rows than outputs
# id(weight) -> (weakref to weight, key, {form: packed}); form ("onednn", transposed) or ("mkl", transposed, rows);
# an entry dies with its weight
_CACHE: dict = {}
MKL_ROW_COUNTS = 2  # MKL packed copies kept per weight (one per row count M, the most recently used)
_LIBRARIES = ("auto", "mkl", "onednn")
_ACTIVATIONS = {None: ("none", ""), "gelu_tanh": ("gelu", "tanh")}


def set_enabled(enabled: bool) -> None:
    """Turn the prepacked path on or off for this process (overrides FLM_RT_PREPACK); off also frees the cache."""
    global _ENABLED
    _ENABLED = bool(enabled)
    if not _ENABLED:
        clear_cache()


def is_enabled() -> bool:
    global _ENABLED
    if _ENABLED is None:
        _ENABLED = env_switch("FLM_RT_PREPACK")
    return _ENABLED and _HAVE_ONEDNN_LINEAR


# torch built with oneDNN and registering the two ops used here (builds for other CPU architectures may lack them)
_HAVE_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and all(
    hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))


_HAVE_MKL_LINEAR = torch.backends.mkl.is_available() and all(
    hasattr(torch.ops.mkl, op) for op in ("_mkl_reorder_linear_weight", "_mkl_linear"))


def clear_cache() -> None:
    """Drop every packed weight and re-read the switches."""
    _CACHE.clear()
    reread_switches()


def reread_switches() -> None:
    """Re-read the environment switches read once per process (``FLM_RT_PREPACK_LIBRARY``,
    ``FLM_RT_TRANSPOSED_GEMM``, ``FLM_RT_GELU_PASS``) at their next use, keeping the packed weights."""
    fp32_library.cache_clear()
    transposed_gemm_enabled.cache_clear()
    gelu_pass_enabled.cache_clear()


@functools.lru_cache(maxsize=1)
def fp32_library() -> str:
    """The library of the fp32 prepacked products without a fused activation: "mkl" or "onednn".

    ``FLM_RT_PREPACK_LIBRARY`` (auto | mkl | onednn) chooses; auto takes MKL on Intel CPUs where torch has its packed
    sgemm ops (it ran 5-15% faster than oneDNN on every block shape there, docs/KERNELS.md) and oneDNN elsewhere
    (MKL is not tuned for other vendors' CPUs). Read once per process (:func:`clear_cache` re-reads it)."""
    raw = os.environ.get("FLM_RT_PREPACK_LIBRARY", "auto").strip().lower() or "auto"
    if raw not in _LIBRARIES:
        raise ValueError(f"FLM_RT_PREPACK_LIBRARY must be one of {', '.join(_LIBRARIES)}, got {raw!r}")
    if raw == "auto":
        from .cpu_features import cpu_vendor

        raw = "mkl" if cpu_vendor() == "GenuineIntel" else "onednn"
    return "mkl" if raw == "mkl" and _HAVE_MKL_LINEAR else "onednn"


def cpu_fp32_inference(*tensors: torch.Tensor) -> bool:
    """True when every tensor is a dense fp32 CPU tensor, autocast is off, nothing needs gradients and nothing
    is being traced or exported: where flm_rt may use oneDNN-specific, in-place and ``out=`` fast paths."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.is_mkldnn for t in tensors)
            and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not is_capturing())


def _applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return x.dim() >= 2 and weight.dim() == 2 and is_enabled() and cpu_fp32_inference(*tensors)


def _applies_bf16(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """bf16 weights under CPU bf16 autocast (the model's dtype="bfloat16" mode) on a CPU with native bf16: the
    product autocast would run (input cast to bf16, bf16 GEMM, bf16 output), on a prepacked weight."""
    if not (x.dim() >= 2 and weight.dim() == 2 and weight.dtype == torch.bfloat16 and is_enabled()
            and x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and (bias is None or bias.dtype == torch.bfloat16)
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) and not is_capturing()):
        return False
    from .cpu_features import native_bf16

    return native_bf16()


@functools.lru_cache(maxsize=1)
def transposed_gemm_enabled() -> bool:
    """``FLM_RT_TRANSPOSED_GEMM`` (default: on where oneDNN's bf16 GEMMs run on AMX, the machine where the
    transposed product was measured faster; off elsewhere, e.g. AVX512-BF16 without AMX, where it was 9% slower
    end to end), read once per process (:func:`clear_cache` re-reads it)."""
    from .cpu_features import amx_bf16

    return env_switch("FLM_RT_TRANSPOSED_GEMM", default=amx_bf16())


@functools.lru_cache(maxsize=1)
def gelu_pass_enabled() -> bool:
    """``FLM_RT_GELU_PASS`` (default on): the MLP's GELU as the ``flm_rt::gelu_tanh_`` pass after the plain product
    rather than oneDNN's fused post-op; read once per process (:func:`clear_cache` re-reads it)."""
    return env_switch("FLM_RT_GELU_PASS")


def _transposed_product(rows: int, out_features: int) -> bool:
    """Where the bf16 product runs as W @ X^T (see the module docstring)."""
    return 0 < out_features <= _TRANSPOSED_MAX_OUT and rows > out_features and transposed_gemm_enabled()


def _forms(weight: torch.Tensor) -> dict:
    """The packed copies of ``weight`` ({form: packed}), emptied when the weight changed in place or was replaced."""
    # an inference tensor (made under torch.inference_mode) has no version counter; it can change in place only
    # inside inference mode, which this key cannot see
    key = (weight.data_ptr(), 0 if weight.is_inference() else weight._version, tuple(weight.shape))
    wid = id(weight)
    hit = _CACHE.get(wid)
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2]
    forms: dict = {}
    _CACHE[wid] = (weakref.ref(weight, lambda _, wid=wid: _CACHE.pop(wid, None)), key, forms)
    return forms


def _dense(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The [out, in] contiguous weight the libraries pack from."""
    w = weight.detach()
    return w.t().contiguous() if transposed else w.contiguous()


def _packed_onednn(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    forms = _forms(weight)
    form = ("onednn", transposed)
    if form not in forms:
        with torch.no_grad():
            forms[form] = torch.ops.mkldnn._reorder_linear_weight(_dense(weight, transposed), None)
    return forms[form]


def _packed_mkl(weight: torch.Tensor, transposed: bool, rows: int) -> torch.Tensor:
    """MKL's packed copy for products with ``rows`` rows (torch's op falls back to a plain GEMM on any other M);
    the least recently used row count is dropped beyond MKL_ROW_COUNTS."""
    forms = _forms(weight)
    form = ("mkl", transposed, rows)
    packed = forms.pop(form, None)
    if packed is None:
        with torch.no_grad():
            packed = torch.ops.mkl._mkl_reorder_linear_weight(_dense(weight, transposed), rows)
        mkl_forms = [f for f in forms if f[0] == "mkl" and f[1] == transposed]
        for old in mkl_forms[:max(0, len(mkl_forms) - MKL_ROW_COUNTS + 1)]:
            del forms[old]
    forms[form] = packed  # re-inserted last: dict order is the recency order
    return packed


def _transposed_bf16(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias) in bf16 computed as weight @ x^T ([out, rows], then viewed as [..., out])."""
    xt = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).t()
    w = weight.detach()
    yt = torch.mm(w, xt) if bias is None else torch.addmm(bias.detach()[:, None], w, xt)
    return yt.t().view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           activation: Optional[str] = None, transposed: bool = False, any_layout: bool = False) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))``, on a prepacked weight where that applies: MKL's packed sgemm (fp32, no
    activation, where :func:`fp32_library` is "mkl") or oneDNN's linear (the rest, bf16 included).

    ``transposed=True``: ``weight`` is [in, out] and the product is ``x @ weight`` (the embedding matmul).
    ``activation``: None or "gelu_tanh": on the prepacked path, the plain product followed by the in-place
    ``flm_rt::gelu_tanh_`` pass where the extension has it, else oneDNN's GEMM with the GELU fused as a post-op.
    ``any_layout=True``: the caller accepts a result with non-contiguous strides (the bf16 transposed product).
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
    fp32 = _applies(x, weight, bias)
    bf16 = not fp32 and not transposed and _applies_bf16(x, weight, bias)
    if not (fp32 or bf16):
        y = torch.matmul(x, weight) if transposed else F.linear(x, weight, bias)
        if transposed and bias is not None:
            y = y + bias
        return F.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y
    gelu_pass = activation == "gelu_tanh" and _gelu_pass_applies(torch.float32 if fp32 else torch.bfloat16)
    fused = None if gelu_pass else activation  # the activation oneDNN's GEMM applies
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    b = None if bias is None else bias.detach()
    if fp32 and fused is None and rows > 0 and fp32_library() == "mkl":
        w = weight.detach()
        # the [out, in] view of the weight is only read on a row-count mismatch, which the cache key rules out
        y = torch.ops.mkl._mkl_linear(x, _packed_mkl(weight, transposed, rows), w.t() if transposed else w, b, rows)
    elif bf16 and any_layout and activation is None and _transposed_product(rows, weight.shape[0]):
        y = _transposed_bf16(x, weight, bias)
    else:
        attr, algorithm = _ACTIVATIONS[fused]
        y = torch.ops.mkldnn._linear_pointwise(x.to(weight.dtype), _packed_onednn(weight, transposed), b, attr, [],
                                               algorithm)
    if gelu_pass:
        from . import ops  # (ops imports this module)

        ops.gelu_tanh_(y, backend="ext")
    return y


def _gelu_pass_applies(dtype: torch.dtype) -> bool:
    """Whether the prepacked product's GELU runs as the compiled ``flm_rt::gelu_tanh_`` pass (on CPU, ``dtype``)."""
    if not gelu_pass_enabled():
        return False
    from . import ops  # (ops imports this module)

    return ops.kernels_backend("cpu", dtype, "gelu_tanh_") == "ext"
