"""The build of the compiled kernels: build_info, the no-extension fallback, CUDA sources, the CMake project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flm_rt
from flm_rt import _ext, ops

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not _ext.EXT_LOADED, reason=f"flm_rt._C not loaded: {_ext.EXT_ERROR}")


def _tool(name: str) -> str | None:
    """A tool from the running Python's environment first (venv bin/), else PATH."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else shutil.which(name)


def test_build_info_fields():
    info = flm_rt.build_info()
    assert isinstance(info, dict)
    for key in ("ext_loaded", "ext_error", "ops", "cuda_compiled", "cuda_archs", "cuda_compiler", "cuda_available",
                "cpu_capabilities_compiled", "cpu_capability_selected", "cpu_kernel", "cpu_flags", "torch_version",
                "torch_cuda_version", "torch_version_built", "compiler"):
        assert key in info, key
    assert info["torch_version"] == torch.__version__
    assert info["torch_cuda_version"] == torch.version.cuda
    short = flm_rt.build_info(short=True)
    assert isinstance(short, str) and "\n" not in short and short.startswith("flm_rt ")
    assert flm_rt.build_info is _ext.build_info


@needs_ext
def test_build_info_when_loaded():
    info = flm_rt.build_info()
    assert info["ext_loaded"] and info["ext_error"] is None
    for op in ("flow_map_step", "flow_map_step_", "vocab_argmax"):
        assert "CPU" in info["ops"][op]
        assert ("CUDA" in info["ops"][op]) == info["cuda_compiled"]
    assert "DEFAULT" in info["cpu_capabilities_compiled"]
    assert info["cpu_capability_selected"] in info["cpu_capabilities_compiled"]
    assert info["cpu_kernel"].startswith(info["cpu_capability_selected"])
    assert info["compiler"]
    assert torch.__version__.startswith(info["torch_version_built"])
    short = flm_rt.build_info(short=True)
    assert "ext: loaded" in short and "cuda kernels:" in short
    if info["cuda_compiled"]:
        assert info["cuda_archs"] and "nvcc" in info["cuda_compiler"]


@needs_ext
def test_cuda_sources_compiled_when_nvcc_present():
    """The build compiles the .cu kernels whenever nvcc and a CUDA torch exist (unless FLM_RT_CUDA=0)."""
    if os.environ.get("FLM_RT_CUDA", "").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip("FLM_RT_CUDA=0 in this environment")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("no nvcc on PATH")
    if not torch.version.cuda:
        pytest.skip("torch is a CPU-only build")
    info = flm_rt.build_info()
    assert info["cuda_compiled"], f"nvcc is available but the CUDA kernels were not compiled: {info}"
    assert "CUDA" in info["ops"]["flow_map_step"] and "CUDA" in info["ops"]["vocab_argmax"]
    assert "CUDA" in info["ops"]["vocab_pass_argmax"] and "CUDA" in info["ops"]["vocab_pass_embed"]
    for arch in os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0").split(";"):
        assert arch in info["cuda_archs"]


_FALLBACK_SCRIPT = r"""
import torch, flm_rt
from flm_rt import ops
info = flm_rt.build_info()
assert info["ext_loaded"] is False and "FLM_RT_DISABLE_EXT" in info["ext_error"], info
assert ops.kernels_backend("cpu", torch.float32) == "torch"
z = torch.randn(3, 17); lg = torch.randn(3, 17)
out = ops.flow_map_step(z, lg, 0.5, 0.5, 0.0)
torch.testing.assert_close(out, ops.flow_map_step_reference(z, lg, 0.5, 0.5, 0.0))
i, v = ops.vocab_argmax(lg)
assert torch.equal(i, lg.argmax(-1))
try:
    ops.vocab_argmax(lg, backend="ext")
except RuntimeError as e:
    assert "not loaded" in str(e)
else:
    raise AssertionError("backend='ext' must fail without the extension")
import flm_rt._ext  # importing again must not repeat the notice
print("SHORT", flm_rt.build_info(short=True))
print("FALLBACK_OK")
"""


def test_disable_ext_falls_back_with_one_notice():
    env = dict(os.environ, FLM_RT_DISABLE_EXT="1")
    env.pop("FLM_RT_KERNELS", None)
    r = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FALLBACK_OK" in r.stdout
    notices = [ln for ln in r.stderr.splitlines() if ln.startswith("flm_rt: compiled kernels not loaded")]
    assert len(notices) == 1, r.stderr
    assert "FLM_RT_DISABLE_EXT=1" in notices[0] and "reference" in notices[0]
    assert "ext: not loaded" in r.stdout


@needs_ext
def test_loaded_ext_prints_no_notice():
    env = {k: v for k, v in os.environ.items() if k != "FLM_RT_DISABLE_EXT"}
    r = subprocess.run([sys.executable, "-c", "import flm_rt; print(flm_rt.build_info(short=True))"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    assert "compiled kernels not loaded" not in r.stderr
    assert "ext: loaded" in r.stdout


def test_cmake_library_and_cpp_demo(tmp_path):
    """CMake (Ninja) builds csrc/ into libflm_rt_ops.so against libtorch, and the C++ demo prints OK."""
    cmake, ninja = _tool("cmake"), _tool("ninja")
    if cmake is None or ninja is None:
        pytest.skip("cmake and ninja are needed (pip install cmake ninja)")
    if torch.version.cuda and not (shutil.which("nvcc") or os.environ.get("CUDA_HOME")
                                   or os.path.exists("/usr/local/cuda/bin/nvcc")):
        pytest.skip("a CUDA build of libtorch needs a CUDA toolkit for find_package(Torch); none found")
    prefix = torch.utils.cmake_prefix_path
    build = tmp_path / "cmake-build"
    cfg = subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
         f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release",
         "-DFLM_RT_CPU_VARIANTS=DEFAULT"],  # one CPU variant keeps the build short; the others are tested in Python
        capture_output=True, text=True, timeout=600)
    assert cfg.returncode == 0, cfg.stdout[-4000:] + cfg.stderr[-4000:]
    jobs = os.environ.get("MAX_JOBS", "2")
    bld = subprocess.run([cmake, "--build", str(build), "-j", jobs], capture_output=True, text=True, timeout=1200)
    assert bld.returncode == 0, bld.stdout[-6000:] + bld.stderr[-4000:]
    lib = build / "libflm_rt_ops.so"
    assert lib.exists()
    readelf = shutil.which("readelf")
    if readelf:
        needed = subprocess.run([readelf, "-d", str(lib)], capture_output=True, text=True).stdout
        assert "libpython" not in needed, "the C++ library must not depend on Python"
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    run = subprocess.run([str(build / "flm_rt_run_op")], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == "OK", run.stdout
    assert "cpu_capabilities_compiled: DEFAULT" in run.stdout
    assert "MISMATCH" not in run.stdout
