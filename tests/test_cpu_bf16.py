"""bf16 on CPU: detection of native bf16 (avx512_bf16 / AMX), the warning where it is emulated (ISA capped with
ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY in a fresh process), and the prepacked bf16 products."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flm_rt
from flm_rt import cpu_features, prepack
from flm_rt.model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(vocab_size=211, length=12, hidden_size=32, n_blocks=1, n_heads=2, cond_dim=16)

PROBE = """
import warnings, torch, flm_rt
from flm_rt import cpu_features
from flm_rt.model import ModelConfig
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    m = flm_rt.random_model(ModelConfig(vocab_size=50, length=4, hidden_size=16, n_blocks=1, n_heads=2,
                                        cond_dim=8), dtype="bfloat16")
    ids = flm_rt.generate(m, steps=1, seed=0, decode=False).token_ids
print(cpu_features.native_bf16(), sum(issubclass(x.category, cpu_features.EmulatedDtypeWarning) for x in w),
      tuple(ids.shape))
print([str(x.message) for x in w if issubclass(x.category, cpu_features.EmulatedDtypeWarning)][:1])
"""


def probe(env_extra: dict) -> list:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()


def test_capped_isa_is_not_native_and_warns():
    """An AVX2-capped process (the AVX2-only machine's situation): bf16 is emulated, loading a bf16 model warns
    once with the reason, and generation still works."""
    first, msg = probe({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"})
    assert first.split()[:2] == ["False", "1"] and first.endswith("(1, 4)")
    assert "emulated" in msg and ("ONEDNN_MAX_CPU_ISA=AVX2" in msg or "lacks" in msg)


RATES_PROBE = """
import json, torch
from flm_rt.benchmarks.suite import matmul_rates
print(json.dumps(matmul_rates(torch.device("cpu"), torch.bfloat16, n=1024, repeats=1)))
"""


def test_bf16_rates_where_emulated():
    """The benchmark's bf16 rate on an AVX2-capped process: oneDNN refuses to prepack bf16 weights there (a clear
    entry, not a crash: the AVX2-only Zen 3 run died on it), and the emulated product is timed on a small square
    (about 1 GFLOP/s there: a 2048-square one would take minutes) and flagged."""
    import json

    env = dict(os.environ, PYTHONPATH=str(ROOT), ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", RATES_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["n"] == 512 and r["emulated"]  # the reason bf16 is not native
    assert r["torch.mm"] > 0 and r["best"] >= r["torch.mm"]
    if "onednn_prepacked" not in r:
        assert "bf16" in r["onednn_prepacked_unavailable"]
        assert r["best_library"] == "torch.mm"


def test_detection_follows_the_flags(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    flags = cpu_features.cpu_flags()
    have = any(f in flags for f in cpu_features.NATIVE_BF16_FLAGS)
    assert cpu_features.native_bf16() == (have and "AVX512" in torch.backends.cpu.get_cpu_capability())
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert not cpu_features.native_bf16()
    summary = cpu_features.isa_summary()
    assert summary["onednn_max_cpu_isa"] == "AVX512_CORE" and "bf16" in summary


@pytest.mark.parametrize("flags,cap,want", [
    ({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, None, True),
    ({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, "AVX512_CORE_BF16", False),  # capped below AMX
    ({"avx512f", "avx512_bf16"}, None, False),  # AVX512-BF16 without AMX (Zen 4/5)
    ({"avx2", "fma"}, None, False),
])
def test_amx_detection_and_the_transposed_product_default(monkeypatch, flags, cap, want):
    """amx_bf16() follows the flags and the oneDNN cap; the bf16 transposed product defaults to it, and
    FLM_RT_TRANSPOSED_GEMM overrides either way."""
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512" if "avx512f" in flags else "AVX2")
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.delenv("FLM_RT_TRANSPOSED_GEMM", raising=False)
    try:
        assert cpu_features.amx_bf16() == want
        prepack.clear_cache()
        assert prepack.transposed_gemm_enabled() == want
        for forced, value in (("1", True), ("0", False)):
            monkeypatch.setenv("FLM_RT_TRANSPOSED_GEMM", forced)
            prepack.clear_cache()
            assert prepack.transposed_gemm_enabled() == value
    finally:
        monkeypatch.undo()
        prepack.clear_cache()


@pytest.mark.skipif(not cpu_features.native_bf16() or not prepack.is_enabled(),
                    reason="this CPU has no native bf16 (or oneDNN is missing)")
def test_bf16_products_are_prepacked_and_agree(monkeypatch):
    """On a native-bf16 CPU the bf16 model's Linear layers run on prepacked bf16 weights: same values as
    autocast's F.linear up to bf16 rounding, and the same tokens as the unpacked path."""
    model = flm_rt.random_model(TINY, seed=3, dtype="bfloat16", output_scale=8.0)
    lin = model.denoiser.blocks[0].mlp[0]
    x = torch.randn(2, 12, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert prepack._applies_bf16(x, lin.weight, lin.bias)
        got = prepack.linear(x, lin.weight, lin.bias)
        want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert got.dtype == torch.bfloat16 and id(lin.weight) in prepack._CACHE
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)
    noise = torch.randn(1, 2, 12, 211)
    packed = flm_rt.generate(model, noise=noise, steps=1, decode=False).token_ids
    prepack.set_enabled(False)
    try:
        plain = flm_rt.generate(model, noise=noise, steps=1, decode=False).token_ids
    finally:
        prepack._ENABLED = None
    assert (packed == plain).float().mean() >= 0.9
