"""Build script for the compiled part of flm_rt: the extension module ``flm_rt._C``.

Package metadata lives in pyproject.toml; this file only adds the extension.

* CPU kernels are always built. Their vectorised row kernels (csrc/cpu/vec_kernels.cpp, at::vec) are
  compiled once per CPU capability (DEFAULT, AVX2, AVX512 on x86-64) with PyTorch's own flags for those
  levels and chosen at run time from ``at::get_cpu_capability()`` (so ``ATEN_CPU_CAPABILITY`` works).
* CUDA kernels (csrc/cuda/*.cu) are built when nvcc and a CUDA build of torch are found.

Environment:
  FLM_RT_CUDA=0|1            force the CUDA kernels off / on (1 without nvcc is an error); default: auto
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0")
  FLM_RT_CPU_CAPABILITIES    comma list restricting the CPU variants, e.g. "DEFAULT,AVX2"
  MAX_JOBS                   parallel compile jobs (default 2)
  FLM_RT_PTXAS_VERBOSE=1     print each CUDA kernel's registers / shared memory / spills (nvcc -Xptxas -v)
  CUDA_HOME                  CUDA toolkit root (default: found from nvcc on PATH)

Build (editable): pip install --no-deps --no-build-isolation -e .
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import re
import shlex
import shutil
import site
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    line = f"[flm_rt build] {msg}"
    print(line, flush=True)


def log_banner(*lines: str) -> None:
    for line in ("=" * 78, *lines, "=" * 78):
        log(line)


# --------------------------------------------------------------------------------------------------
# CUDA discovery (before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import time)
# --------------------------------------------------------------------------------------------------
def _looks_like_cuda_home(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home() -> tuple[str | None, str | None]:
    """(CUDA toolkit root, nvcc on PATH or None). Follows wrapper scripts such as `exec /x/bin/nvcc "$@"`."""
    candidates: list[str] = []
    env_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env_home:
        candidates.append(env_home)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            with open(nvcc, "rb") as f:
                head = f.read(8192)
            if head.startswith(b"#!"):
                for m in re.finditer(r"(/[^\s\"']+)/bin/nvcc\b", head.decode("utf-8", "ignore")):
                    candidates.append(m.group(1))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if _looks_like_cuda_home(c):
            return os.path.abspath(c), nvcc or os.path.join(c, "bin", "nvcc")
    return None, nvcc


def find_pip_cuda_dir(cuda_major: str | None) -> str | None:
    """<site-packages>/nvidia/cuXX (the CUDA headers/libraries of the pip-installed runtime torch uses)."""
    roots: list[str] = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots += list(spec.submodule_search_locations)
    try:
        sp = site.getsitepackages()
    except AttributeError:  # very old virtualenv
        sp = []
    import sysconfig

    sp += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    roots += [os.path.join(p, "nvidia") for p in sp]
    seen = []
    for r in roots:
        if r not in seen and os.path.isdir(r):
            seen.append(r)
    preferred = f"cu{cuda_major}" if cuda_major else None
    found = []
    for r in seen:
        for d in sorted(glob.glob(os.path.join(r, "cu[0-9]*"))):
            if os.path.isdir(os.path.join(d, "include")):
                found.append(d)
    for d in found:
        if preferred and os.path.basename(d) == preferred:
            return d
    return found[0] if found else None


CUDA_HOME, NVCC_ON_PATH = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("MAX_JOBS", "2")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, include_paths  # noqa: E402

TORCH_CUDA = torch.version.cuda  # None for a CPU-only torch

_force = os.environ.get("FLM_RT_CUDA", "").strip().lower()
if _force in ("0", "false", "no", "off"):
    WITH_CUDA, CUDA_REASON = False, "disabled by FLM_RT_CUDA=0"
elif _force in ("1", "true", "yes", "on"):
    if not CUDA_HOME:
        raise SystemExit(
            "[flm_rt build] FLM_RT_CUDA=1 but no CUDA toolkit was found: no nvcc on PATH (or CUDA_HOME) with "
            "include/cuda_runtime.h next to it. Install the CUDA toolkit, set CUDA_HOME, or use FLM_RT_CUDA=0.")
    if not TORCH_CUDA:
        raise SystemExit(
            f"[flm_rt build] FLM_RT_CUDA=1 but torch {torch.__version__} is a CPU-only build (torch.version.cuda is "
            "None); install a CUDA build of torch or use FLM_RT_CUDA=0.")
    WITH_CUDA, CUDA_REASON = True, "forced by FLM_RT_CUDA=1"
elif _force in ("", "auto"):
    if CUDA_HOME and TORCH_CUDA:
        WITH_CUDA, CUDA_REASON = True, "nvcc found and torch is a CUDA build"
    elif not CUDA_HOME:
        WITH_CUDA, CUDA_REASON = False, "no nvcc / CUDA toolkit found"
    else:
        WITH_CUDA, CUDA_REASON = False, f"torch {torch.__version__} is a CPU-only build"
else:
    raise SystemExit(f"[flm_rt build] FLM_RT_CUDA must be 0, 1 or auto, got {_force!r}")


CUDA_ARCHS = os.environ["TORCH_CUDA_ARCH_LIST"] if WITH_CUDA else ""  # what the build reports, in one place


def nvcc_version(home: str) -> str:
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
        m = re.search(r"release ([0-9.]+), (V[0-9.]+)", out)
        return f"{m.group(1)} ({m.group(2)})" if m else out.strip().splitlines()[-1]
    except Exception as e:  # pragma: no cover - diagnostic only
        return f"unknown ({e})"


# --------------------------------------------------------------------------------------------------
# CPU capability variants of csrc/cpu/vec_kernels.cpp (same flags PyTorch uses for its own kernels)
# --------------------------------------------------------------------------------------------------
CPU_VARIANT_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def cpu_variants() -> list[str]:
    machine = platform.machine().lower()
    variants = ["DEFAULT"]
    if machine in ("x86_64", "amd64") and sys.platform.startswith("linux"):
        variants += ["AVX2", "AVX512"]
    wanted = os.environ.get("FLM_RT_CPU_CAPABILITIES")
    if wanted:
        w = {x.strip().upper() for x in wanted.split(",") if x.strip()}
        variants = [v for v in variants if v in w or v == "DEFAULT"]
    return variants


CPU_VARIANTS = cpu_variants()
CXX_OPT = ["-O3", "-std=c++20", "-fPIC", "-DNDEBUG"]
ABI = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"


def _write_if_changed(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


def _c_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_cpu_variants(build_temp: str) -> list[str]:
    """Compile vec_kernels.cpp once per CPU capability (and normal_avx2.cpp with AVX2) with a small ninja file
    (incremental, depfiles)."""
    out_dir = os.path.abspath(os.path.join(build_temp, "flm_rt_cpu_variants"))
    os.makedirs(out_dir, exist_ok=True)
    cxx = os.environ.get("CXX", "c++")
    src = os.path.join(ROOT, "csrc", "cpu", "vec_kernels.cpp")
    incs = [f"-I{p}" for p in [os.path.join(ROOT, "csrc")] + include_paths()]
    # No implicit contraction of a * b + c into one FMA: the kernels round exactly where their source does (the
    # rotary embedding equals ATen's separate mul and sub bit for bit); FMAs only where written (at::vec::fmadd).
    common = CXX_OPT + ["-ffp-contract=off", ABI] + incs
    lines = [
        "ninja_required_version = 1.3",
        f"cxx = {cxx}",
        "rule cxx",
        "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX [$variant] $in",
        "",
    ]
    objs = []
    for v in CPU_VARIANTS:
        flags = common + CPU_VARIANT_FLAGS[v] + [
            f"-DCPU_CAPABILITY={v}",
            f"-DCPU_CAPABILITY_{v}",
            f"-DFLM_RT_CPU_FLAGS={_c_str(' '.join(CPU_VARIANT_FLAGS[v]) or 'baseline')}",
        ]
        obj = os.path.join(out_dir, f"vec_kernels.{v}.o")
        objs.append(obj)
        lines += [f"build {obj}: cxx {src}", f"  cflags = {' '.join(shlex.quote(f) for f in flags)}",
                  f"  variant = {v}", ""]
    if "AVX2" in CPU_VARIANTS:
        # flm_rt::normal_'s AVX2 Box-Muller, with ATen's flags for its AVX2 kernels (GCC's default contraction)
        flags = CXX_OPT + ["-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math", ABI] + incs + [
            "-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"]
        obj = os.path.join(out_dir, "normal_avx2.o")
        objs.append(obj)
        lines += [f"build {obj}: cxx {os.path.join(ROOT, 'csrc', 'cpu', 'normal_avx2.cpp')}",
                  f"  cflags = {' '.join(shlex.quote(f) for f in flags)}", "  variant = AVX2", ""]
    _write_if_changed(os.path.join(out_dir, "build.ninja"), "\n".join(lines))
    ninja = shutil.which("ninja")
    if ninja is None:
        import ninja as _ninja  # the pip package

        ninja = os.path.join(_ninja.BIN_DIR, "ninja")
    log(f"CPU kernel variants: {', '.join(CPU_VARIANTS)} (csrc/cpu/vec_kernels.cpp, at::vec)")
    subprocess.run([ninja, "-C", out_dir, "-j", os.environ.get("MAX_JOBS", "2")], check=True)
    return objs


def generated_config_header(build_temp: str, cxx_flags: list[str], nvcc_flags: list[str]) -> str:
    """build_config.h with the string facts the C++ code reports (avoids quoting string -D flags)."""
    inc_dir = os.path.abspath(os.path.join(build_temp, "flm_rt_generated"))
    cpu_flags = "; ".join(f"{v}: {' '.join(CPU_VARIANT_FLAGS[v]) or 'baseline'}" for v in CPU_VARIANTS)
    text = "\n".join([
        "// Generated by setup.py; do not edit.",
        "#pragma once",
        f"#define FLM_RT_CUDA_ARCHS {_c_str(CUDA_ARCHS)}",
        f"#define FLM_RT_CPU_FLAGS_ALL {_c_str(cpu_flags)}",
        f"#define FLM_RT_BUILD_FLAGS {_c_str('setuptools; cxx: ' + ' '.join(cxx_flags) + ('; nvcc: ' + ' '.join(nvcc_flags) if WITH_CUDA else ''))}",
        "",
    ])
    _write_if_changed(os.path.join(inc_dir, "flm_rt_build_config.h"), text)
    return inc_dir


# --------------------------------------------------------------------------------------------------
# Extension
# --------------------------------------------------------------------------------------------------
CPU_SOURCES = [
    "csrc/registration.cpp",
    "csrc/cpu/dispatch.cpp",
    "csrc/cpu/flow_map_step.cpp",
    "csrc/cpu/vocab_argmax.cpp",
    "csrc/cpu/vocab_pass.cpp",
    "csrc/cpu/softcap_softmax.cpp",
    "csrc/cpu/rotary.cpp",
    "csrc/cpu/scaled_add.cpp",
    "csrc/cpu/gelu.cpp",
    "csrc/cpu/normal.cpp",
]
CUDA_SOURCES = ["csrc/cuda/build_info.cu", "csrc/cuda/flow_map_step.cu", "csrc/cuda/vocab_argmax.cu",
                "csrc/cuda/vocab_pass.cu"]

variant_defs = [f"-DFLM_RT_HAVE_CPU_{v}" for v in CPU_VARIANTS if v != "DEFAULT"]
cxx_flags = CXX_OPT[:1] + ["-fopenmp", "-DFLM_RT_WITH_PYTHON"] + variant_defs
nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
if os.environ.get("FLM_RT_PTXAS_VERBOSE", "0") not in ("", "0"):
    nvcc_flags.append("-Xptxas=-v")
if WITH_CUDA:
    cxx_flags.append("-DFLM_RT_WITH_CUDA")
    nvcc_flags.append("-DFLM_RT_WITH_CUDA")

include_dirs = [os.path.join(ROOT, "csrc")]
library_dirs: list[str] = []
PIP_CUDA = find_pip_cuda_dir(TORCH_CUDA.split(".")[0] if TORCH_CUDA else None) if TORCH_CUDA else None

if WITH_CUDA:
    log_banner(f"CUDA kernels: ENABLED ({CUDA_REASON})",
               f"  nvcc {nvcc_version(CUDA_HOME)} from CUDA_HOME={CUDA_HOME} (nvcc on PATH: {NVCC_ON_PATH})",
               f"  TORCH_CUDA_ARCH_LIST={CUDA_ARCHS}, torch CUDA {TORCH_CUDA}",
               f"  pip CUDA headers/libraries: {PIP_CUDA or 'not found'}",
               f"  compiling with nvcc: {', '.join(CUDA_SOURCES)}")
    ext = CUDAExtension(
        name="flm_rt._C",
        sources=CPU_SOURCES + CUDA_SOURCES,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    # The pip runtime's include dir goes last: the toolkit's own headers win where both exist, the pip
    # package supplies what a minimal toolkit lacks (cuBLAS, cuSPARSE, cuSOLVER, cuRAND headers ATen includes).
    if PIP_CUDA:
        ext.include_dirs.append(os.path.join(PIP_CUDA, "include"))
        ext.library_dirs.append(os.path.join(PIP_CUDA, "lib"))
        has_unversioned = any(os.path.exists(os.path.join(d, "libcudart.so")) for d in ext.library_dirs)
        pip_cudart = sorted(glob.glob(os.path.join(PIP_CUDA, "lib", "libcudart.so.*")))
        if not has_unversioned and pip_cudart and "cudart" in ext.libraries:
            ext.libraries[ext.libraries.index("cudart")] = ":" + os.path.basename(pip_cudart[0])
else:
    log_banner(f"CUDA kernels: DISABLED ({CUDA_REASON}); building the CPU kernels only")
    ext = CppExtension(
        name="flm_rt._C",
        sources=CPU_SOURCES,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
    )
    if PIP_CUDA:  # harmless for the host compiler; keeps include behaviour identical with/without CUDA
        ext.include_dirs.append(os.path.join(PIP_CUDA, "include"))
ext.extra_link_args = list(getattr(ext, "extra_link_args", []) or []) + ["-fopenmp"]


class BuildExt(BuildExtension):
    def build_extensions(self):
        # PEP 660 editable builds use a fresh temporary build_temp each time; a fixed directory under build/
        # keeps ninja's state so that rebuilds only recompile what changed.
        if os.environ.get("FLM_RT_PERSISTENT_BUILD_TEMP", "1") != "0":
            tag = f"{sys.implementation.cache_tag}-{platform.machine()}-{'cuda' if WITH_CUDA else 'cpu'}"
            self.build_temp = os.path.join(ROOT, "build", f"temp.{tag}")
            os.makedirs(self.build_temp, exist_ok=True)
        for e in self.extensions:
            gen_dir = generated_config_header(self.build_temp, cxx_flags, nvcc_flags)
            if gen_dir not in e.include_dirs:
                e.include_dirs.insert(0, gen_dir)
            objs = build_cpu_variants(self.build_temp)
            # After the extension's own objects: for inline functions emitted in several objects the linker
            # keeps the first copy, which must not be one compiled with AVX2/AVX512 flags.
            e.extra_objects = [o for o in (e.extra_objects or []) if o not in objs] + objs
        super().build_extensions()
        log(f"built flm_rt._C: CPU variants {','.join(CPU_VARIANTS)}; CUDA kernels "
            f"{'compiled for ' + CUDA_ARCHS if WITH_CUDA else 'not compiled'}")


setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
