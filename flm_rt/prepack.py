"""Prepacked oneDNN weights for the fp32 CPU matmuls of the denoiser.

``F.linear`` on CPU re-reads the weight in its PyTorch layout on every call; oneDNN's ``_linear_pointwise`` on a
weight reordered once into its blocked layout runs the same GEMM 1.2x to 2.2x faster on this model's shapes
(largest gain on the [V, D] output projection and the [V, D] embedding; figures in docs/KERNELS.md). The
packed copy is made lazily on first use and cached per weight tensor, keyed on the tensor's storage and version
counter, so an in-place change or a reload of the weight re-packs it. The cache lives outside the modules
(state dicts, ``deepcopy`` and export see plain ``nn.Linear`` weights).

It applies only where it computes the same function as ``F.linear`` up to float rounding (relative 1e-6): fp32
tensors on CPU, autocast off, no autograd, not while tracing or exporting, and when torch has oneDNN; and to the bf16
weights of ``dtype="bfloat16"`` models under CPU bf16 autocast where the CPU has native bf16 (flm_rt.cpu_features),
computing what autocast's ``F.linear`` computes (bf16 inputs and output) up to bf16 rounding. Anything
else takes ``F.linear``. ``FLM_RT_PREPACK=0`` (or :func:`set_enabled`) turns it off; the cost is one more copy
of the weights in memory while it is on.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from .limits import env_switch
from .tracing import is_capturing

__all__ = ["linear", "set_enabled", "is_enabled", "clear_cache", "cpu_fp32_inference"]

_ENABLED: Optional[bool] = None  # None: read FLM_RT_PREPACK on first use
_CACHE: dict = {}  # id(weight) -> (weakref to weight, key, packed); an entry dies with its weight
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


def clear_cache() -> None:
    _CACHE.clear()


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


def _packed(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), transposed)
    wid = id(weight)
    hit = _CACHE.get(wid)
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2]
    with torch.no_grad():
        w = weight.detach()
        packed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous() if transposed else w.contiguous(), None)
    _CACHE[wid] = (weakref.ref(weight, lambda _, wid=wid: _CACHE.pop(wid, None)), key, packed)
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           activation: Optional[str] = None, transposed: bool = False) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))``, through a prepacked oneDNN weight where that applies.

    ``transposed=True``: ``weight`` is [in, out] and the product is ``x @ weight`` (the embedding matmul).
    ``activation``: None or "gelu_tanh" (fused into the GEMM on the prepacked path).
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
    if _applies(x, weight, bias) or (not transposed and _applies_bf16(x, weight, bias)):
        attr, algorithm = _ACTIVATIONS[activation]
        b = None if bias is None else bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x.to(weight.dtype), _packed(weight, transposed), b, attr, [],
                                                  algorithm)
    y = torch.matmul(x, weight) if transposed else F.linear(x, weight, bias)
    if transposed and bias is not None:
        y = y + bias
    return F.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y
