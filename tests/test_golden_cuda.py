"""The golden cases on a CUDA device (skipped with a reason where there is none).

fp32: token for token, with the compiled CUDA ops and with the reference ops (the GEMMs are cuBLAS, fp32 without
TF32, as PyTorch's default). bf16 autocast: agreement with the reference's own bf16 ids of at least 95% of
positions (the CPU test's bound); the figure itself is recorded by `make gpu-check` (bench/gpu/measure.py golden).
"""
import pytest
import torch

import flm_rt
from flm_rt import _ext

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
]

FMLM_CASES = [(s, n) for s in (0.0, 0.8, 1.0) for n in (1, 2, 4, 8)]
FLM_CASES = [1, 4, 16, 64]
KERNELS = ["torch", pytest.param("ext", marks=pytest.mark.skipif(
    not (_ext.EXT_LOADED and _ext.has_kernel("flow_map_step", "cuda")), reason="flm_rt._C has no CUDA kernels"))]


@pytest.fixture(scope="module")
def cuda_models(golden_dir):
    assert not torch.backends.cuda.matmul.allow_tf32, "fp32 goldens need fp32 GEMMs (TF32 is on)"
    return {k: flm_rt.load(golden_dir / f"{k}.ckpt", device="cuda") for k in ("fmlm", "flm")}


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("s,steps", FMLM_CASES)
def test_fmlm_ids_on_cuda(cuda_models, vectors, s, steps, kernels):
    gen = flm_rt.generate(cuda_models["fmlm"], steps=steps, stochasticity=s, noise=vectors["noises"], kernels=kernels)
    assert gen.device.startswith("cuda")
    assert torch.equal(gen.token_ids, vectors[f"fmlm.fp32.g{s}.steps{steps}.ids"])


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("steps", FLM_CASES)
def test_flm_ids_on_cuda(cuda_models, vectors, steps, kernels):
    gen = flm_rt.generate(cuda_models["flm"], steps=steps, noise=vectors["noises"], kernels=kernels)
    assert torch.equal(gen.token_ids, vectors[f"flm.fp32.steps{steps}.ids"])


@pytest.mark.parametrize("steps", [1, 4])
def test_bf16_autocast_on_cuda(golden_dir, vectors, steps):
    model = flm_rt.load(golden_dir / "fmlm.ckpt", device="cuda", dtype=torch.bfloat16)
    gen = flm_rt.generate(model, steps=steps, stochasticity=0.0, noise=vectors["noises"])
    agree = (gen.token_ids == vectors[f"fmlm.bf16autocast.g0.0.steps{steps}.ids"]).float().mean().item()
    assert agree >= 0.95, agree
