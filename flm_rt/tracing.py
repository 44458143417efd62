"""Whether code is running under a graph capturer (torch.jit, torch.export, ONNX export, torch.compile).

flm_rt's fast paths (compiled operators, prepacked oneDNN weights, ``out=`` buffers) step aside while a graph is
being captured, so that exporters and the compiler see plain, traceable tensor ops.
"""
from __future__ import annotations

import torch


def is_exporting() -> bool:
    """torch.jit scripting or tracing, torch.export, or the ONNX exporter."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    try:
        if torch.compiler.is_exporting():
            return True
    except AttributeError:  # pragma: no cover - older torch
        pass
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except Exception:  # pragma: no cover
        return False


def is_capturing() -> bool:
    """``is_exporting()``, or torch.compile (dynamo) tracing."""
    return is_exporting() or torch.compiler.is_compiling()
