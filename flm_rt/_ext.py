"""Loading of the compiled extension ``flm_rt._C`` and build information.

Importing ``flm_rt._C`` registers the operators ``torch.ops.flm_rt.*`` named in ``OPS`` (CPU kernels always,
CUDA kernels when the build had nvcc). If the extension is missing or fails to load, or ``FLM_RT_DISABLE_EXT=1``
is set, flm_rt keeps working on the pure-PyTorch reference operators (flm_rt.ops) and says so once, in one line
on stderr.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch  # must be imported before the extension: _C links against libtorch

__all__ = ["EXT_LOADED", "EXT_ERROR", "build_info", "ext_module", "has_kernel", "OPS"]

OPS = ("flow_map_step", "flow_map_step_", "vocab_argmax", "vocab_pass_argmax", "vocab_pass_embed",
       "softcap_softmax", "softcap_softmax_", "rotary_split",
       "scaled_add", "normal_", "gelu_tanh_")

EXT_LOADED: bool = False
EXT_ERROR: str | None = None
_C: Any = None
_NOTICE_SHOWN = False


def _notice(reason: str) -> None:
    global _NOTICE_SHOWN
    if _NOTICE_SHOWN:
        return
    _NOTICE_SHOWN = True
    print(f"flm_rt: compiled kernels not loaded ({reason}); using the PyTorch reference ops", file=sys.stderr,
          flush=True)


def _load() -> None:
    global EXT_LOADED, EXT_ERROR, _C
    if os.environ.get("FLM_RT_DISABLE_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
        EXT_ERROR = "disabled by FLM_RT_DISABLE_EXT=1"
    else:
        try:
            from . import _C as mod  # type: ignore[attr-defined]

            _C = mod
            EXT_LOADED = hasattr(torch.ops.flm_rt, "flow_map_step") and hasattr(torch.ops.flm_rt, "vocab_argmax")
            if not EXT_LOADED:
                EXT_ERROR = "flm_rt._C imported but did not register the torch.ops.flm_rt operators"
        except ImportError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "No module named" in msg:
                msg = "flm_rt._C is not built (run `make build` or `pip install --no-build-isolation -e .`)"
            EXT_ERROR = f"{type(e).__name__}: {msg}"
        except Exception as e:  # a broken .so (ABI mismatch, missing symbol...) must not break flm_rt
            EXT_ERROR = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not EXT_LOADED:
        _notice(EXT_ERROR or "unknown reason")


_load()


def ext_module() -> Any:
    """The loaded ``flm_rt._C`` module, or None."""
    return _C


def _kernel_table() -> frozenset:
    """(op, dispatch key) pairs that flm_rt._C registered, read once: a plain set that torch.compile can trace
    through (the dispatcher query itself is opaque to it)."""
    table = set()
    if EXT_LOADED:
        for op in OPS:
            for key in ("CPU", "CUDA"):
                try:
                    if torch._C._dispatch_has_kernel_for_dispatch_key(f"flm_rt::{op}", key):
                        table.add((op, key))
                except Exception:
                    pass
    return frozenset(table)


_KERNELS = _kernel_table()
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``flm_rt::<op>`` has a compiled kernel for ``device_type`` ("cpu", "cuda", ...)."""
    return (op, _DEVICE_KEYS.get(str(device_type).lower())) in _KERNELS


def build_info(short: bool = False) -> dict[str, Any] | str:
    """What was compiled and what is used.

    Keys: ext_loaded, ext_error, ops ({op: [device keys with a kernel]}), cuda_compiled, cuda_archs,
    cuda_compiler, cuda_available, cpu_capabilities_compiled, cpu_capability_selected, cpu_kernel, cpu_flags,
    torch_version, torch_cuda_version, torch_version_built, compiler, kernels_env (FLM_RT_KERNELS).
    ``short=True`` gives one line.
    """
    native: dict[str, str] = {}
    if _C is not None:
        try:
            native = dict(_C.build_info())
        except Exception as e:  # pragma: no cover
            native = {"error": str(e)}
    ops = {op: [k for k in ("CPU", "CUDA") if has_kernel(op, k.lower())] for op in OPS} if EXT_LOADED else {}
    info: dict[str, Any] = {
        "ext_loaded": EXT_LOADED,
        "ext_error": EXT_ERROR,
        "ops": ops,
        "cuda_compiled": native.get("cuda_compiled") == "1",
        "cuda_archs": native.get("cuda_archs", ""),
        "cuda_compiler": native.get("cuda_compiler", ""),
        "cuda_available": torch.cuda.is_available(),
        "cpu_capabilities_compiled": [c for c in native.get("cpu_capabilities_compiled", "").split(",") if c],
        "cpu_capability_selected": native.get("cpu_capability_selected", ""),
        "cpu_kernel": native.get("cpu_kernel", ""),
        "cpu_flags": native.get("cpu_flags", ""),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "torch_version_built": native.get("torch_version_built", ""),
        "compiler": native.get("compiler", ""),
        "cxx11_abi": native.get("cxx11_abi", ""),
        "build_flags": native.get("build_flags", ""),
        "kernels_env": os.environ.get("FLM_RT_KERNELS", "auto"),
    }
    if not short:
        return info
    if not EXT_LOADED:
        ext = f"ext: not loaded ({EXT_ERROR}); reference PyTorch ops"
    else:
        # in-place twins of listed ops left out
        ext = "ext: loaded, ops " + ", ".join(f"{op}[{'/'.join(ks) or '-'}]" for op, ks in ops.items()
                                              if op[-1] != "_" or op[:-1] not in ops)
    parts = [f"flm_rt {_version()}", ext]
    if EXT_LOADED:
        parts.append(f"cpu kernels: {info['cpu_capability_selected']} (built {'/'.join(info['cpu_capabilities_compiled'])})")
        if info["cuda_compiled"]:
            parts.append(f"cuda kernels: compiled for {info['cuda_archs']} ({info['cuda_compiler']})"
                         f"{'' if info['cuda_available'] else ', no GPU visible'}")
        else:
            parts.append("cuda kernels: not compiled")
        parts.append(info["compiler"])
    parts.append(f"torch {torch.__version__} (CUDA {torch.version.cuda or '-'})")
    return " | ".join(parts)


def _version() -> str:
    try:
        from ._version import __version__

        return __version__
    except Exception:
        return "?"
