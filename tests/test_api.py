"""generate(): argument checking, seeding semantics, decoding, devices and dtypes."""
import pytest
import torch

import flm_rt
from flm_rt.errors import ConfigError, DeviceError, GenerationError

from conftest import small_config


@pytest.fixture(scope="module")
def gpt2_model():
    return flm_rt.random_model(small_config(), seed=1, device="cpu", output_scale=4.0)


@pytest.fixture(scope="module")
def flm_small():
    return flm_rt.random_model(small_config(two_time=False, vocab_size=300, tokenizer=None), seed=2, device="cpu")


def test_generation_fields(gpt2_model):
    g = flm_rt.generate(gpt2_model, num_samples=2, steps=2, seed=3)
    assert g.token_ids.shape == (2, 16) and g.token_ids.dtype == torch.int64 and g.token_ids.device.type == "cpu"
    assert int(g.token_ids.min()) >= 0 and int(g.token_ids.max()) < 50258
    assert isinstance(g.text, list) and len(g.text) == 2 and all(isinstance(t, str) for t in g.text)
    assert g.elapsed_s > 0 and g.tokens_per_s > 0 and g.ms_per_token > 0 and g.seed == 3


def test_seed_reproducible_and_per_sample(gpt2_model):
    a = flm_rt.generate(gpt2_model, num_samples=3, steps=2, stochasticity=0.5, seed=11, decode=False)
    b = flm_rt.generate(gpt2_model, num_samples=3, steps=2, stochasticity=0.5, seed=11, decode=False)
    c = flm_rt.generate(gpt2_model, num_samples=2, steps=2, stochasticity=0.5, seed=11, decode=False)
    d = flm_rt.generate(gpt2_model, num_samples=2, steps=2, stochasticity=0.5, seed=12, decode=False)
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.equal(a.token_ids[:2], c.token_ids)  # sample k depends on (seed, k) only
    assert not torch.equal(c.token_ids, d.token_ids)
    assert not torch.equal(a.token_ids[0], a.token_ids[1])


def test_generator_and_unseeded(gpt2_model):
    g1 = flm_rt.generate(gpt2_model, generator=torch.Generator().manual_seed(0), decode=False)
    g2 = flm_rt.generate(gpt2_model, generator=torch.Generator().manual_seed(0), decode=False)
    assert torch.equal(g1.token_ids, g2.token_ids)
    u = flm_rt.generate(gpt2_model, decode=False)
    assert isinstance(u.seed, int)  # recorded so the run can be repeated
    assert torch.equal(flm_rt.generate(gpt2_model, seed=u.seed, decode=False).token_ids, u.token_ids)


def test_noise_matches_seeded_draws(gpt2_model):
    """Explicit noise is the same thing as the internal draws: feeding sample 0's draws reproduces it."""
    from flm_rt.api import sample_seed

    gen = torch.Generator().manual_seed(sample_seed(5, 0))
    noise = torch.randn(1, 1, 16, 50258, generator=gen)
    a = flm_rt.generate(gpt2_model, noise=noise, steps=1, decode=False)
    b = flm_rt.generate(gpt2_model, seed=5, steps=1, decode=False)
    assert torch.equal(a.token_ids, b.token_ids)


def test_seq_len(gpt2_model):
    assert flm_rt.generate(gpt2_model, seq_len=5, seed=0, decode=False).token_ids.shape == (1, 5)
    with pytest.raises(GenerationError, match="seq_len"):
        flm_rt.generate(gpt2_model, seq_len=17)
    with pytest.raises(GenerationError, match="seq_len"):
        flm_rt.generate(gpt2_model, seq_len=0)


@pytest.mark.parametrize("kw,match", [
    (dict(steps=0), "steps"), (dict(steps=-2), "steps"), (dict(steps=1.5), "steps"), (dict(steps=True), "steps"),
    (dict(stochasticity=-0.1), "stochasticity"), (dict(stochasticity=1.5), "stochasticity"),
    (dict(stochasticity=float("nan")), "stochasticity"), (dict(num_samples=0), "num_samples"),
    (dict(num_samples=2.0), "num_samples"), (dict(seed=-1), "seed"), (dict(seed="x"), "seed"),
    (dict(seed=1, generator=torch.Generator()), "at most one"),
])
def test_bad_arguments(gpt2_model, kw, match):
    with pytest.raises(GenerationError, match=match):
        flm_rt.generate(gpt2_model, **kw)


def test_bad_noise(gpt2_model):
    ok = torch.randn(1, 2, 16, 50258)
    with pytest.raises(GenerationError, match=r"\[S, B, L, V\]"):
        flm_rt.generate(gpt2_model, noise=ok[0])
    with pytest.raises(GenerationError, match="floating point"):
        flm_rt.generate(gpt2_model, noise=ok.long())
    with pytest.raises(GenerationError, match="V=50257"):
        flm_rt.generate(gpt2_model, noise=ok[..., :50257])
    with pytest.raises(GenerationError, match="trained length"):
        flm_rt.generate(gpt2_model, noise=torch.randn(1, 1, 17, 50258))
    with pytest.raises(GenerationError, match="need 2"):
        flm_rt.generate(gpt2_model, noise=ok, steps=2, stochasticity=0.5)
    bad = ok.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(GenerationError, match="NaN"):
        flm_rt.generate(gpt2_model, noise=bad)
    with pytest.raises(GenerationError, match="num_samples=3"):
        flm_rt.generate(gpt2_model, noise=ok, num_samples=3)
    assert flm_rt.generate(gpt2_model, noise=ok.double(), decode=False).token_ids.shape == (2, 16)


def test_flm_rejects_stochasticity(flm_small):
    with pytest.raises(GenerationError, match="FMLM"):
        flm_rt.generate(flm_small, stochasticity=0.5)
    g = flm_rt.generate(flm_small, steps=3, seed=0)
    assert g.text is None and "300 tokens" in g.text_unavailable_reason


def test_device_and_dtype_errors(golden_dir):
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            flm_rt.load(golden_dir / "fmlm.ckpt", device="cuda")
    with pytest.raises(DeviceError, match="unsupported device|invalid device"):
        flm_rt.load(golden_dir / "fmlm.ckpt", device="tpu")
    with pytest.raises(ConfigError, match="dtype"):
        flm_rt.load(golden_dir / "fmlm.ckpt", dtype="int8")


def test_path_in_place_of_model(golden_dir, vectors):
    g = flm_rt.generate(str(golden_dir / "fmlm.ckpt"), noise=vectors["noises"], stochasticity=0.0)
    assert torch.equal(g.token_ids, vectors["fmlm.fp32.g0.0.steps1.ids"])


def test_default_stochasticity_from_checkpoint(golden_dir, tmp_path, vectors):
    import json
    import shutil

    hub = tmp_path / "hub"
    shutil.copytree(golden_dir / "fmlm-hub", hub)
    cfg = json.loads((hub / "config.json").read_text())
    cfg["config"]["sampling"]["gamma"] = 0.8
    (hub / "config.json").write_text(json.dumps(cfg))
    m = flm_rt.load(hub, device="cpu")
    assert m.config.default_stochasticity == 0.8
    g = flm_rt.generate(m, steps=4, noise=vectors["noises"])
    assert g.stochasticity == 0.8 and torch.equal(g.token_ids, vectors["fmlm.fp32.g0.8.steps4.ids"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")
def test_cuda_matches_cpu_golden(golden_dir, vectors):
    m = flm_rt.load(golden_dir / "fmlm.ckpt", device="cuda")
    g = flm_rt.generate(m, steps=4, stochasticity=1.0, noise=vectors["noises"])
    assert torch.equal(g.token_ids, vectors["fmlm.fp32.g1.0.steps4.ids"])


def test_embedded_noise_has_the_right_covariance(golden_dir):
    """u @ C^T with C C^T = E^T E is distributed as eps @ E for eps ~ N(0, I_V)."""
    m = flm_rt.load(golden_dir / "fmlm.ckpt", device="cpu")
    e = m.denoiser.vocab_embed.embedding.double()
    gram = e.T @ e
    c = m.embedded_noise_factor().double()
    assert torch.allclose(c @ c.T, gram, rtol=1e-5, atol=1e-5 * gram.abs().max().item())
    u = torch.randn(200_000, c.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    emp = (u @ c.T).T @ (u @ c.T) / u.shape[0]
    assert ((emp - gram).norm() / gram.norm()).item() < 0.02


def test_embedding_space_seeded(gpt2_model):
    a = flm_rt.generate(gpt2_model, num_samples=2, steps=2, stochasticity=0.7, seed=4, noise_space="embedding")
    b = flm_rt.generate(gpt2_model, num_samples=1, steps=2, stochasticity=0.7, seed=4, noise_space="embedding")
    assert torch.equal(a.token_ids[:1], b.token_ids) and a.text is not None
    with pytest.raises(GenerationError, match="noise_space"):
        flm_rt.generate(gpt2_model, noise_space="logits")


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_callers_noise_is_not_modified(golden_dir, vectors, kernels):
    m = flm_rt.load(golden_dir / "fmlm.ckpt", device="cpu")
    noise = vectors["noises"].clone()
    flm_rt.generate(m, steps=4, stochasticity=0.8, noise=noise, kernels=kernels)
    assert torch.equal(noise, vectors["noises"])


def test_per_sample_generators_reproduce_seeded_samples(gpt2_model):
    """A list of generators, one per sample: sample k of seed s lands in any row of any batch unchanged."""
    from flm_rt.api import sample_seed

    def gens(pairs):
        return [torch.Generator().manual_seed(sample_seed(s, k)) for s, k in pairs]
    kw = dict(steps=2, stochasticity=0.5, decode=False)
    mixed = flm_rt.generate(gpt2_model, generator=gens([(7, 0), (9, 0), (7, 1), (9, 1), (9, 2)]), **kw).token_ids
    seven = flm_rt.generate(gpt2_model, num_samples=2, seed=7, **kw).token_ids
    nine = flm_rt.generate(gpt2_model, num_samples=3, seed=9, **kw).token_ids
    assert torch.equal(mixed[[0, 2]], seven) and torch.equal(mixed[[1, 3, 4]], nine)
    with pytest.raises(GenerationError, match="disagrees"):
        flm_rt.generate(gpt2_model, generator=gens([(1, 0), (1, 1)]), num_samples=3)
    with pytest.raises(GenerationError, match="list of them"):
        flm_rt.generate(gpt2_model, generator=[torch.Generator(), "x"])


def test_callback_reports_each_step(gpt2_model):
    seen = []
    g = flm_rt.generate(gpt2_model, num_samples=2, steps=3, seed=1, decode=False,
                        callback=lambda i, t, ids: seen.append((i, ids.clone())))
    assert [i for i, _ in seen] == [0, 1, 2] and all(ids.shape == (2, 16) for _, ids in seen)
    assert torch.equal(seen[-1][1].cpu(), g.token_ids)
