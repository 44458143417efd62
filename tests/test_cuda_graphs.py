"""CUDA graphs for generate (flm_rt.cuda_graphs): the rules on every machine, capture/replay on a GPU.

On a GPU: a replay with a seed gives exactly the ids of an eager generate with that seed (vocab and embedding
space, one and several steps, fp32 and bf16); replays with other seeds give other ids; a shape is captured once.
"""
import pytest
import torch

import flm_rt
from flm_rt import cuda_graphs, noise
from flm_rt.errors import GenerationError

from conftest import small_config

CUDA = torch.cuda.is_available()
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="CUDA not available")]


def test_when_graphs_are_used():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    w = cuda_graphs.wanted
    assert w("auto", device=gpu, batch=1, seeded=True, callback=False)
    assert not w("auto", device=gpu, batch=cuda_graphs.AUTO_MAX_BATCH + 1, seeded=True, callback=False)
    assert w(True, device=gpu, batch=64, seeded=True, callback=False)
    assert not w("auto", device=cpu, batch=1, seeded=True, callback=False)
    assert not w("auto", device=gpu, batch=1, seeded=False, callback=False)
    assert not w(False, device=gpu, batch=1, seeded=True, callback=False)
    with pytest.raises(GenerationError, match="not a CUDA device"):
        w(True, device=cpu, batch=1, seeded=True, callback=False)
    with pytest.raises(GenerationError, match="explicit noise"):
        w(True, device=gpu, batch=1, seeded=False, callback=False)
    with pytest.raises(GenerationError, match="callback"):
        w(True, device=gpu, batch=1, seeded=True, callback=True)
    with pytest.raises(GenerationError, match="must be"):
        w("sometimes", device=gpu, batch=1, seeded=True, callback=False)


def test_env_switch(monkeypatch):
    gpu = torch.device("cuda")
    monkeypatch.setenv("FLM_RT_CUDA_GRAPHS", "off")
    assert not cuda_graphs.wanted(None, device=gpu, batch=1, seeded=True, callback=False)
    monkeypatch.setenv("FLM_RT_CUDA_GRAPHS", "maybe")
    with pytest.raises(GenerationError, match="FLM_RT_CUDA_GRAPHS"):
        cuda_graphs.wanted(None, device=gpu, batch=1, seeded=True, callback=False)


def test_capture_refuses_a_cpu_model():
    model = flm_rt.random_model(small_config(vocab_size=1000), device="cpu")
    key = cuda_graphs.GraphKey(1, 16, 1, 0.0, "vocab", None)
    with pytest.raises(GenerationError, match="CUDA model"):
        cuda_graphs.GraphedGeneration(model, key)


def test_seeded_draw_is_the_per_sample_rule():
    """Row k of a draw comes from its own generator only: the same rows whatever the batch around them."""
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    d3 = noise.seeded_draw(gens, (3, 4, 9), torch.device("cpu"))(0)
    d1 = noise.seeded_draw([torch.Generator().manual_seed(6)], (1, 4, 9), torch.device("cpu"))(0)
    assert torch.equal(d3[1], d1[0]) and not torch.equal(d3[0], d3[1])


@pytest.mark.parametrize("space", ["vocab", "embedding"])
@pytest.mark.parametrize("steps,s", [(1, 0.0), (4, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_replay_equals_eager(device, dtype, steps, s, space):
    model = flm_rt.random_model(small_config(vocab_size=4097, length=32, hidden_size=64, n_blocks=2, n_heads=4),
                                device=device, dtype=dtype, output_scale=8.0)
    key = cuda_graphs.GraphKey(3, 32, steps, s, space, None)
    graphed = cuda_graphs.graph_for(model, key)
    for seed in (0, 1, 2**40 + 3):
        eager = flm_rt.generate(model, num_samples=3, steps=steps, stochasticity=s, seed=seed, noise_space=space,
                                decode=False, cuda_graph=False)
        ids = graphed.replay(seed).cpu()
        assert torch.equal(ids, eager.token_ids), (seed, (ids != eager.token_ids).float().mean())
    assert cuda_graphs.graph_for(model, key) is graphed and graphed.replays == 3
    assert not torch.equal(graphed.replay(10).cpu(), graphed.replay(11).cpu())


def test_generate_refuses_forced_graphs_where_they_cannot_run():
    model = flm_rt.random_model(small_config(vocab_size=1000), device="cpu")
    with pytest.raises(GenerationError, match="cuda_graph=True cannot be used here"):
        flm_rt.generate(model, seed=0, cuda_graph=True, decode=False)
    # auto and off on CPU: the eager path, same ids
    a = flm_rt.generate(model, num_samples=2, seed=3, decode=False).token_ids
    b = flm_rt.generate(model, num_samples=2, seed=3, decode=False, cuda_graph=False).token_ids
    assert torch.equal(a, b)
