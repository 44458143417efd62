"""Warm models (warmup, the generate(path) model cache) and progress (per-step callback, tqdm bar, --show-steps)."""
import os

import pytest
import torch

import flm_rt
from flm_rt import api, cli, loading, ops, prepack
from flm_rt.errors import GenerationError

from conftest import small_config


@pytest.fixture()
def counted_reads(monkeypatch):
    api.clear_model_cache()
    calls = []
    real = loading.read_checkpoint

    def counting(path, **kw):
        calls.append(path)
        return real(path, **kw)
    monkeypatch.setattr(loading, "read_checkpoint", counting)
    yield calls
    api.clear_model_cache()


def test_generate_by_path_keeps_the_model_warm(tmp_path, counted_reads, monkeypatch):
    path = flm_rt.random_model(small_config(), seed=0).save(tmp_path / "m")
    a = flm_rt.generate(path, seed=1, decode=False)
    b = flm_rt.generate(path, seed=1, decode=False)
    assert len(counted_reads) == 1 and torch.equal(a.token_ids, b.token_ids)
    first = api.cached_load(path)
    assert api.cached_load(path) is first
    # a new modification time means new contents: loaded again
    weights = os.path.join(path, "model.safetensors")
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert api.cached_load(path) is not first and len(counted_reads) == 2
    # dtype is part of the key; the cache holds MODEL_CACHE_SIZE (2) models, least recently used out first
    half = api.cached_load(path, dtype="bf16")
    assert half.dtype == torch.bfloat16 and len(counted_reads) == 3
    other = flm_rt.random_model(small_config(two_time=False), seed=1).save(tmp_path / "o")
    flm_rt.generate(other, decode=False)
    assert len(api._MODEL_CACHE) == 2 and len(counted_reads) == 4
    api.cached_load(path)  # the fp32 entry was evicted
    assert len(counted_reads) == 5
    with pytest.raises(GenerationError, match="device= and dtype= apply when model is a path"):
        flm_rt.generate(half, dtype="float32")
    monkeypatch.setattr(api, "MODEL_CACHE_SIZE", 0)
    api.clear_model_cache()
    flm_rt.generate(path, decode=False)
    flm_rt.generate(path, decode=False)
    assert len(counted_reads) == 7 and not api._MODEL_CACHE


def test_warmup_prepares_the_model():
    model = flm_rt.random_model(small_config(), seed=0, device="cpu")
    prepack.clear_cache()
    cold = model.warmup(num_samples=2, steps=1)
    assert cold > 0
    if prepack.is_enabled() and prepack.cpu_fp32_inference(model.denoiser.vocab_embed.embedding):
        assert prepack._CACHE, "warm-up did not prepack the weights"
    assert model._tokenizer is not None  # the tokenizer is built too: the first decode is not slow either


@pytest.mark.parametrize("space", ["vocab", "embedding"])
def test_callback_after_every_step(fmlm_model, vectors, space):
    seen = []
    gen = flm_rt.generate(fmlm_model, steps=4, stochasticity=0.8, noise=vectors["noises"], noise_space=space,
                          callback=lambda i, t, ids: seen.append((i, t, ids.clone())))
    assert torch.equal(gen.token_ids, vectors["fmlm.fp32.g0.8.steps4.ids"])  # watching changes nothing
    assert [(i, t) for i, t, _ in seen] == [(0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0)]
    assert all(ids.shape == (3, 32) and ids.dtype == torch.int64 and ids.device.type == "cpu" for _, _, ids in seen)
    assert torch.equal(seen[-1][2], gen.token_ids)
    if space == "vocab":  # the state's argmax: mostly noise after the first of four stochastic steps
        assert (seen[0][2] != gen.token_ids).float().mean() > 0.1


def test_no_callback_costs_nothing(fmlm_model, vectors, monkeypatch):
    calls = []
    for name in ("vocab_argmax", "vocab_pass_argmax"):  # the plain argmax or the fused pass at the last step
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, **kw: calls.append(1) or _real(*a, **kw))
    flm_rt.generate(fmlm_model, steps=8, stochasticity=1.0, noise=vectors["noises"])
    assert len(calls) == 1  # the output argmax only
    with pytest.raises(GenerationError, match="callback must be callable"):
        flm_rt.generate(fmlm_model, steps=2, seed=0, callback="print")


def test_progress_bar(flm_model, capsys):
    flm_rt.generate(flm_model, steps=16, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "sampling 1 x 32" in err and "0/16" in err  # tqdm redraws at most every 0.1 s: later counts vary


def test_cli_show_steps_progress_and_timing(golden_dir, capsys):
    assert cli.main(["generate", str(golden_dir / "flm.ckpt"), "-n", "1", "--steps", "3", "--show-steps",
                     "--progress", "--no-warmup"]) == 0
    out, err = capsys.readouterr()
    assert [line.split(" (")[0] for line in err.splitlines() if line.startswith("--- step")] == [
        "--- step 1", "--- step 2", "--- step 3"]
    assert "3/3" in err  # the bar
    final = out.split("=== sample 0 ===")[1].split("[")[0].split()
    last_shown = err.split("--- step 3 (t = 1.0000) ---")[1].splitlines()[1].removeprefix("[0] ").split()
    assert final == last_shown and len(final) == 32
    assert "no warm-up: the timed call was the cold first call" in out and "[load " in out
    assert cli.main(["generate", str(golden_dir / "flm.ckpt"), "-n", "1", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "first call" in out and "(cold, 1-step warm-up, not counted)" in out and "warm calls" in out
    assert cli.main(["generate", str(golden_dir / "flm.ckpt"), "--repeat", "0"]) == 2


def test_export_stages_progress(fmlm_model, tmp_path, capsys):
    out = flm_rt.export(fmlm_model, tmp_path / "d.pt", format="torchscript", what="denoiser", progress=True)
    err = capsys.readouterr().err
    assert os.path.isfile(out) and "export: torchscript denoiser graph" in err and "export: write" in err
    flm_rt.export(fmlm_model, tmp_path / "e.pt", format="torchscript", what="denoiser")
    assert "export:" not in capsys.readouterr().err
