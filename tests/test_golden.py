"""Token-for-token agreement with the authors' reference code (../shared/golden), through the public API."""
import pytest
import torch

import flm_rt
from flm_rt.model import softcap_logits

FMLM_CASES = [(s, n) for s in (0.0, 0.8, 1.0) for n in (1, 2, 4, 8)]
FLM_CASES = [1, 4, 16, 64]


@pytest.fixture(scope="module")
def models(golden_dir, tmp_path_factory):
    out = {}
    for kind in ("fmlm", "flm"):
        conv = tmp_path_factory.mktemp("conv") / kind
        flm_rt.convert(golden_dir / f"{kind}.ckpt", conv)
        out[kind] = {
            "ckpt": flm_rt.load(golden_dir / f"{kind}.ckpt", device="cpu"),
            "hub": flm_rt.load(golden_dir / f"{kind}-hub", device="cpu"),
            "converted": flm_rt.load(conv, device="cpu"),
        }
    return out


# compiled and reference ops on the .ckpt; the compiled path (the default) on the other two sources
SOURCE_KERNELS = [("ckpt", "torch"), ("ckpt", "auto"), ("hub", "auto"), ("converted", "auto")]


@pytest.mark.parametrize("source,kernels", SOURCE_KERNELS)
@pytest.mark.parametrize("s,steps", FMLM_CASES)
def test_fmlm_ids(models, vectors, golden_meta, source, kernels, s, steps):
    model = models["fmlm"][source]
    gen = flm_rt.generate(model, steps=steps, stochasticity=s, noise=vectors["noises"], kernels=kernels)
    want = vectors[f"fmlm.fp32.g{s}.steps{steps}.ids"]
    assert gen.token_ids.dtype == torch.int64 and gen.token_ids.shape == want.shape
    assert torch.equal(gen.token_ids, want)
    # exactly as many draws as the reference used: one fewer must be refused
    used = golden_meta["cases"][f"fmlm.fp32.g{s}.steps{steps}"]["gaussian_draws_used"]
    with pytest.raises(flm_rt.GenerationError, match="draws"):
        flm_rt.generate(model, steps=steps, stochasticity=s, noise=vectors["noises"][: used - 1])


@pytest.mark.parametrize("s,steps", FMLM_CASES)
def test_fmlm_ids_with_plain_gemms(models, vectors, s, steps):
    """The same ids with flm_rt.prepack off (F.linear everywhere), the path every non-CPU device takes."""
    from flm_rt import prepack

    prepack.set_enabled(False)
    try:
        gen = flm_rt.generate(models["fmlm"]["ckpt"], steps=steps, stochasticity=s, noise=vectors["noises"])
    finally:
        prepack._ENABLED = None
    assert torch.equal(gen.token_ids, vectors[f"fmlm.fp32.g{s}.steps{steps}.ids"])


@pytest.mark.parametrize("source,kernels", SOURCE_KERNELS)
@pytest.mark.parametrize("steps", FLM_CASES)
def test_flm_ids(models, vectors, source, kernels, steps):
    gen = flm_rt.generate(models["flm"][source], steps=steps, noise=vectors["noises"], kernels=kernels)
    assert torch.equal(gen.token_ids, vectors[f"flm.fp32.steps{steps}.ids"])


@pytest.mark.parametrize("key", ["fmlm.forward.t0.0_1.0", "fmlm.forward.t0.3_0.7", "flm.forward.t0.5"])
def test_forward_logits(models, vectors, key):
    kind = key.split(".")[0]
    times = [float(v) for v in key.split(".forward.t")[1].split("_")]
    x, want = vectors[f"{key}.input"], vectors[f"{key}.raw_logits"]
    b = x.shape[0]
    t = torch.full((b,), times[0])
    tp = torch.full((b,), times[1]) if len(times) > 1 else None
    for model in models[kind].values():
        with torch.inference_mode():
            got = model.denoiser(x, t, tp)
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-4, rel
        assert torch.isfinite(softcap_logits(got)).all()


@pytest.mark.parametrize("steps", [1, 4])
def test_bf16_autocast_cases(golden_dir, vectors, steps):
    model = flm_rt.load(golden_dir / "fmlm.ckpt", device="cpu", dtype=torch.bfloat16)
    gen = flm_rt.generate(model, steps=steps, stochasticity=0.0, noise=vectors["noises"])
    agree = (gen.token_ids == vectors[f"fmlm.bf16autocast.g0.0.steps{steps}.ids"]).float().mean().item()
    assert agree >= 0.95, agree


def test_ema_weights_are_used(golden_dir, vectors):
    """The reference samples with EMA weights; the training weights give different ids on this model."""
    raw = flm_rt.load(golden_dir / "fmlm.ckpt", device="cpu", use_ema=False)
    gen = flm_rt.generate(raw, steps=1, stochasticity=0.0, noise=vectors["noises"])
    assert not torch.equal(gen.token_ids, vectors["fmlm.fp32.g0.0.steps1.ids"])


@pytest.mark.parametrize("kind,s,steps", [("fmlm", 0.0, 1), ("fmlm", 0.8, 8), ("fmlm", 1.0, 4), ("flm", 0.0, 16)])
def test_embedding_space_sampler_is_the_same_process(models, vectors, kind, s, steps):
    """With the same V-space draws, running the process in embedding space gives the golden ids."""
    key = f"fmlm.fp32.g{s}.steps{steps}.ids" if kind == "fmlm" else f"flm.fp32.steps{steps}.ids"
    gen = flm_rt.generate(models[kind]["ckpt"], steps=steps, stochasticity=s, noise=vectors["noises"],
                          noise_space="embedding")
    assert torch.equal(gen.token_ids, vectors[key])
