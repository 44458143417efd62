"""The one on-disk format flm_rt writes (hub layout: model.safetensors + config.json with the authors' training
config and flm_rt's metadata under "flm_rt"), what it reads from a config, and the older flm_rt.json directories."""
import json
import shutil

import pytest
import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file, save_file

import flm_rt
from flm_rt.errors import CheckpointError
from flm_rt.model import Denoiser, ModelConfig
from flm_rt.tokenizer import tokenizer_kind

from conftest import small_config
from fake_hub import put_in_cache


class MixinDenoiser(Denoiser, PyTorchModelHubMixin):
    """A loader in the authors' style: ``from_pretrained`` hands the stored ``config`` and ``vocab_size`` to
    ``__init__`` and loads model.safetensors into the module (keys without ``backbone.``)."""

    def __init__(self, config: dict, vocab_size: int):
        m = config["model"]
        super().__init__(ModelConfig(vocab_size=vocab_size, length=m["length"], hidden_size=m["hidden_size"],
                                     n_blocks=m["n_blocks"], n_heads=m["n_heads"], cond_dim=m["cond_dim"],
                                     two_time=bool(config["algo"]["double_temb"])))


def _ids(model, vectors, kind):
    if kind == "fmlm":
        return torch.equal(flm_rt.generate(model, steps=8, stochasticity=1.0, noise=vectors["noises"]).token_ids,
                           vectors["fmlm.fp32.g1.0.steps8.ids"])
    return torch.equal(flm_rt.generate(model, steps=16, noise=vectors["noises"]).token_ids,
                       vectors["flm.fp32.steps16.ids"])


@pytest.mark.parametrize("kind", ["fmlm", "flm"])
def test_convert_output_loads_in_flm_rt_and_with_a_hub_mixin_loader(golden_dir, vectors, tmp_path, kind):
    dst = flm_rt.convert(golden_dir / f"{kind}.ckpt", tmp_path / kind)
    cfg = json.loads((tmp_path / kind / "config.json").read_text())
    assert cfg["flm_rt"]["source"].endswith(f"{kind}.ckpt") and cfg["config"]["algo"]["name"] == kind
    assert _ids(flm_rt.load(dst, device="cpu"), vectors, kind)

    net = MixinDenoiser.from_pretrained(dst, strict=True)  # extra "flm_rt" key is not an __init__ argument
    assert net.config.two_time == (kind == "fmlm")
    model = flm_rt.Model(net.config, net.eval().requires_grad_(False).set_compute_dtype(torch.float32),
                         device=torch.device("cpu"), dtype=torch.float32)
    assert _ids(model, vectors, kind)


def test_convert_by_hub_name_keeps_the_authors_config(golden_dir, vectors, tmp_path):
    src = golden_dir / "fmlm-hub"
    pm = flm_rt.hub.find_published("fmlm-lm1b")
    put_in_cache(tmp_path / "hub", pm.repo_id, pm.revision,
                 {n: (src / n).read_bytes() for n in ("config.json", "model.safetensors")})
    out = flm_rt.convert("fmlm-lm1b", tmp_path / "out", cache_dir=tmp_path / "hub", local_files_only=True,
                         dtype="bf16")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())["config"]
    assert cfg["config"] == original  # nothing flm_rt knows differs from what the authors stored
    assert cfg["flm_rt"]["source"] == f"{pm.repo_id}@{pm.revision[:7]}" and cfg["flm_rt"]["dtype"] == "bfloat16"
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["blocks.0.attn_qkv.weight"].dtype == torch.bfloat16
    assert flm_rt.load(out).config.two_time


def test_older_flm_rt_directories_still_load_and_resave(golden_dir, vectors, tmp_path):
    ref = flm_rt.load(golden_dir / "fmlm-hub", device="cpu")
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(golden_dir / "fmlm-hub" / "model.safetensors", old / "model.safetensors")
    (old / "flm_rt.json").write_text(json.dumps({"format": "flm_rt", "format_version": 1, "weights": "ema",
                                                 "config": ref.config.to_dict()}))
    m = flm_rt.load(old, device="cpu")
    assert m.format == "flm_rt" and _ids(m, vectors, "fmlm")
    again = flm_rt.load(m.save(tmp_path / "new"), device="cpu")
    assert again.format == "hub" and again.config.n_heads == 4 and _ids(again, vectors, "fmlm")


def test_random_model_save_round_trip(tmp_path):
    model = flm_rt.random_model(small_config(), seed=0)
    cfg = json.loads((model.save(tmp_path / "m") and tmp_path / "m" / "config.json").read_text())
    assert cfg["vocab_size"] == 50258 and cfg["config"]["model"]["n_heads"] == 2
    assert cfg["config"]["algo"]["double_temb"] is True and cfg["config"]["data"]["tokenizer_name_or_path"] == "gpt2"
    back = flm_rt.load(tmp_path / "m")
    assert back.weights == "random" and back.tokenizer.kind == "gpt2"
    for k, v in model.denoiser.state_dict().items():
        assert torch.equal(v, back.denoiser.state_dict()[k]), k
    cfg["flm_rt"]["format_version"] = 99
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="newer flm_rt"):
        flm_rt.load(tmp_path / "m")


@pytest.mark.parametrize("name,vocab,kind,note", [
    ("gpt2", 50258, "gpt2", None),
    ("openai-community/gpt2", 50257, "gpt2", None),
    ("bert-base-uncased", 30522, "bert-base-uncased", None),
    (None, 30522, "bert-base-uncased", None),          # nothing named: the vocabulary size decides
    (None, 1000, None, None),
    ("bert-base-uncased", 50258, None, "50258 tokens"),  # named, but it does not fit: no text, and why
    ("meta-llama/Llama-3", 50258, None, "does not ship"),
])
def test_tokenizer_is_the_one_the_config_names(name, vocab, kind, note):
    got, why = tokenizer_kind(name, vocab)
    assert got == kind
    assert (why is None) if note is None else (note in why)


def test_config_tokenizer_and_algorithm_names_on_load(tmp_path, golden_dir):
    flm_rt.random_model(small_config(vocab_size=30522, tokenizer=None), seed=0).save(tmp_path / "lm1b")
    assert flm_rt.load(tmp_path / "lm1b").tokenizer.kind == "bert-base-uncased"
    cfg_path = tmp_path / "lm1b" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["config"]["data"]["tokenizer_name_or_path"] = "gpt2"   # the config wins over the vocabulary size
    cfg_path.write_text(json.dumps(cfg))
    m = flm_rt.load(tmp_path / "lm1b")
    assert m.tokenizer is None and "names tokenizer 'gpt2' but the model has 30522" in m.tokenizer_status
    hub = tmp_path / "hub"
    shutil.copytree(golden_dir / "flm-hub", hub)
    for algo, noted in (("dos", False), ("flm", False), ("mystery_algo", True)):
        cfg = json.loads((hub / "config.json").read_text())
        cfg["config"]["algo"]["name"] = algo
        (hub / "config.json").write_text(json.dumps(cfg))
        notes = flm_rt.load(hub).notes
        assert any("algorithm 'mystery_algo'" in n for n in notes) == noted, notes


def test_nonfinite_in_a_saved_file_is_still_refused(tmp_path):
    flm_rt.random_model(small_config(), seed=0).save(tmp_path / "m")
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    sd["blocks.0.norm1.weight"][0] = float("nan")
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(flm_rt.NonFiniteWeightsError):
        flm_rt.load(tmp_path / "m")
