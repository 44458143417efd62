"""Device and dtype arguments: the one place that turns a user's ``device=`` / ``dtype=`` into torch objects.

Used by the API, export, the CLI, the benchmarks and the server, so every entry point accepts the same spellings
and gives the same errors.
"""
from __future__ import annotations

import torch

from .errors import ConfigError, DeviceError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    """None -> float32; a torch dtype or a name (float32 / fp32, bfloat16 / bf16, float16 / fp16 / half)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise ConfigError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")


def dtype_name(dtype: torch.dtype) -> str:
    """"float32", "bfloat16", ... (torch.dtype's str without the prefix)."""
    return str(dtype).replace("torch.", "")


def resolve_device(device) -> torch.device:
    """None -> cuda when available, else cpu; otherwise the named device, checked to exist on this machine."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available on this machine "
                              "(torch.cuda.is_available() is False); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(f"device {device!r} requested but MPS is not available")
    elif dev.type != "cpu":
        raise DeviceError(f"unsupported device type {dev.type!r}: use 'cpu' or 'cuda'")
    return dev
