"""What the CPU (as torch and oneDNN will use it) can do natively: the ISA summary the benchmarks record, and whether
bfloat16 matrix products are native (AVX512-BF16 or AMX-BF16) or emulated.

Emulated bf16 (no avx512_bf16 / amx_bf16, or the ISA capped below them with ``ONEDNN_MAX_CPU_ISA`` or
``ATEN_CPU_CAPABILITY``) converts every operand to fp32 and back: on AVX2-only machines ``dtype="bfloat16"`` ran
4x (LM1B shape, 1 step, 2-core Zen 3, 2026-12-02) to 10x slower than float32, and a bare bf16 ``torch.mm`` ran at
about 1 GFLOP/s there against 92 in fp32, so flm_rt warns when a bf16 model is placed on such a CPU.
"""
from __future__ import annotations

import functools
import os
import platform
import warnings

import torch

__all__ = ["cpu_flags", "cpu_vendor", "native_bf16", "amx_bf16", "bf16_reason", "is_native_reason", "isa_summary",
           "warn_if_emulated", "EmulatedDtypeWarning", "NATIVE_BF16_FLAGS"]

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) at or above which bf16 GEMMs run on bf16 instructions
_ONEDNN_BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                     "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL",
                     "DEFAULT"}
# the caps at or above which they run on AMX tiles
_ONEDNN_AMX_ISAS = {"AVX512_CORE_AMX", "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16",
                    "AVX10_2_512_AMX_2", "ALL", "DEFAULT"}


@functools.lru_cache(maxsize=None)
def _cpuinfo(field: str) -> str:
    """The value of the first ``field`` line of /proc/cpuinfo ("" where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    return frozenset(_cpuinfo("flags").split())


def cpu_vendor() -> str:
    """The CPU's vendor id from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD", ...; "" where there is none)."""
    return _cpuinfo("vendor_id")


def bf16_reason() -> str:
    """One line: why bf16 is or is not native here."""
    flags = cpu_flags()
    have = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if not have:
        return (f"the CPU lacks {' and '.join(NATIVE_BF16_FLAGS)}" if flags else
                "no /proc/cpuinfo flags to tell (not Linux x86-64?)")
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap and cap not in _ONEDNN_BF16_ISAS:
        return f"the CPU has {', '.join(have)} but ONEDNN_MAX_CPU_ISA={cap} caps oneDNN below them"
    aten = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in aten:
        return f"the CPU has {', '.join(have)} but torch's CPU capability is {aten} (ATEN_CPU_CAPABILITY)"
    return f"native: {', '.join(have)} (torch CPU capability {aten})"


def native_bf16() -> bool:
    """True when bf16 matrix products run on bf16 instructions (avx512_bf16 or amx_bf16, not capped)."""
    return is_native_reason(bf16_reason())


def amx_bf16() -> bool:
    """True when oneDNN's bf16 GEMMs run on AMX tiles: bf16 is native, the CPU has amx_bf16 and
    ``ONEDNN_MAX_CPU_ISA`` does not cap oneDNN below AMX."""
    if "amx_bf16" not in cpu_flags() or not native_bf16():
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return not cap or cap in _ONEDNN_AMX_ISAS


def is_native_reason(reason: str) -> bool:
    """Whether a :func:`bf16_reason` string (as the benchmarks record it) says bf16 is native."""
    return reason.startswith("native")


def isa_summary() -> dict:
    """What the benchmarks record about the CPU: the vector ISA torch uses, the relevant flags, BLAS libraries."""
    flags = cpu_flags()
    relevant = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                "amx_bf16", "amx_int8")
    cfg = torch.__config__.show()
    libs = [name for name, key in (("MKL", "USE_MKL=ON"), ("oneDNN", "USE_MKLDNN=ON"), ("OpenBLAS", "BLAS_INFO=open"))
            if key in cfg]
    return {"machine": platform.machine(), "vendor": cpu_vendor(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": [f for f in relevant if f in flags], "native_bf16": native_bf16(), "bf16": bf16_reason(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"), "blas": libs}


class EmulatedDtypeWarning(UserWarning):
    """A low-precision dtype that this CPU runs without native instructions (slower than float32)."""


def warn_if_emulated(dtype: torch.dtype, device_type: str = "cpu") -> bool:
    """Warn (once per call site) when a bf16 model is placed on a CPU without native bf16; True when it warned."""
    if device_type != "cpu" or dtype != torch.bfloat16 or native_bf16():
        return False
    warnings.warn(f"flm_rt: dtype=bfloat16 on this CPU is emulated ({bf16_reason()}): every bf16 product converts "
                  "to float32 and back, so expect it to run several times slower than float32 (4x to 10x on "
                  "AVX2-only machines) with less accurate tokens; use dtype='float32' here",
                  EmulatedDtypeWarning, stacklevel=3)
    return True
