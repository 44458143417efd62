"""Checkpoints are untrusted input: every bad file gets a specific error; nothing in a file is executed."""
import codecs
import json
import os
import pickle
import shutil
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import flm_rt
from flm_rt.errors import CheckpointError, ConfigError, NonFiniteWeightsError, UnsafeCheckpointError


def _hub_copy(golden_dir, tmp_path, name="fmlm-hub"):
    dst = tmp_path / name
    shutil.copytree(golden_dir / name, dst)
    return dst


def _edit_weights(hub, fn):
    sd = load_file(str(hub / "model.safetensors"))
    fn(sd)
    save_file(sd, str(hub / "model.safetensors"))


class Payload:
    """Pickles as a call to os.system: would create a marker file if it ever ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class SideEffect:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # codecs.open(path, "w") creates the file if called; codecs is not on the refusal list
        return (codecs.open, (self.marker, "w"))


def test_formats_agree(golden_dir):
    a = flm_rt.load(golden_dir / "fmlm.ckpt", device="cpu")
    b = flm_rt.load(golden_dir / "fmlm-hub", device="cpu")
    c = flm_rt.load(golden_dir / "fmlm-hub" / "model.safetensors", device="cpu")
    assert a.format == "lightning-ckpt" and b.format == c.format == "hub"
    assert a.config.two_time and a.weights == "ema"
    for k, v in a.denoiser.state_dict().items():
        assert torch.equal(v, b.denoiser.state_dict()[k]), k
        assert torch.equal(v, c.denoiser.state_dict()[k]), k


def test_ckpt_loads_without_transformers_or_omegaconf(golden_dir):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('transformers', 'omegaconf'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import flm_rt\n"
        f"m = flm_rt.load({str(golden_dir / 'fmlm.ckpt')!r}, device='cpu')\n"
        "assert 'transformers' not in sys.modules and 'omegaconf' not in sys.modules\n"
        "print('loaded', m.config.vocab_size)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "loaded 1000" in out.stdout


def test_reduce_payload_is_refused_and_never_runs(golden_dir, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": Payload(str(marker))}}, bad)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os|nt)\.system"):
        flm_rt.load(bad)
    assert not marker.exists()


def test_unknown_callable_is_inert_and_reported(golden_dir, tmp_path):
    """A payload from a module that is not on the refusal list is read as inert data: not run, and warned about."""
    marker = tmp_path / "written"
    src = flm_rt.load(golden_dir / "fmlm-hub", device="cpu")
    sd = {f"backbone.{k}": v for k, v in src.denoiser.state_dict().items()}
    cfg = {"model": {"n_heads": 4, "length": 32}}
    bad = tmp_path / "inert.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": {"config": cfg, "extra": SideEffect(str(marker))}}, bad)
    with pytest.warns(UserWarning, match=r"codecs\.open"):
        m = flm_rt.load(bad, device="cpu")
    assert not marker.exists()
    assert any("codecs.open" in n for n in m.notes)
    assert m.weights == "state_dict"  # no EMA in this file: training weights, with a note
    assert any("no EMA" in n for n in m.notes)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        flm_rt.load(tmp_path / "nope.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no model"):
        flm_rt.load(tmp_path / "empty")


def test_hub_dir_without_weights(golden_dir, tmp_path):
    hub = _hub_copy(golden_dir, tmp_path)
    os.remove(hub / "model.safetensors")
    with pytest.raises(CheckpointError, match="weights file missing"):
        flm_rt.load(hub)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.95])
def test_truncated_ckpt(golden_dir, tmp_path, cut):
    data = (golden_dir / "fmlm.ckpt").read_bytes()
    bad = tmp_path / "trunc.ckpt"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError):
        flm_rt.load(bad)


def test_garbage_and_plain_pickle(tmp_path):
    g = tmp_path / "garbage.ckpt"
    g.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint"):
        flm_rt.load(g)
    p = tmp_path / "plain.ckpt"
    p.write_bytes(pickle.dumps({"state_dict": {}}))
    with pytest.raises(CheckpointError):
        flm_rt.load(p)


def test_corrupt_storage_inside_zip(golden_dir, tmp_path):
    bad = tmp_path / "short-storage.ckpt"
    with zipfile.ZipFile(golden_dir / "fmlm.ckpt") as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/data/0"):
                data = data[: len(data) // 2]
            zout.writestr(item, data)
    with pytest.raises(CheckpointError, match="storage"):
        flm_rt.load(bad)


def test_truncated_safetensors(golden_dir, tmp_path):
    hub = _hub_copy(golden_dir, tmp_path)
    data = (hub / "model.safetensors").read_bytes()
    (hub / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="safetensors"):
        flm_rt.load(hub)


def test_missing_extra_and_misshapen_keys(golden_dir, tmp_path):
    hub = _hub_copy(golden_dir, tmp_path, "fmlm-hub")
    _edit_weights(hub, lambda sd: sd.pop("blocks.1.attn_out.weight"))
    with pytest.raises(CheckpointError, match="missing weights: blocks.1.attn_out.weight"):
        flm_rt.load(hub)

    hub = _hub_copy(golden_dir, tmp_path / "b", "fmlm-hub")
    _edit_weights(hub, lambda sd: sd.__setitem__("blocks.0.surprise", torch.ones(3)))
    with pytest.raises(CheckpointError, match=r"unexpected weights .*: blocks.0.surprise"):
        flm_rt.load(hub)

    hub = _hub_copy(golden_dir, tmp_path / "c", "fmlm-hub")
    _edit_weights(hub, lambda sd: sd.__setitem__("blocks.0.mlp.0.weight", torch.ones(255, 64)))
    with pytest.raises(CheckpointError, match="inconsistent"):
        flm_rt.load(hub)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_refused(golden_dir, tmp_path, value):
    hub = _hub_copy(golden_dir, tmp_path)

    def poison(sd):
        sd["blocks.0.norm1.weight"][3] = value
    _edit_weights(hub, poison)
    with pytest.raises(NonFiniteWeightsError, match="blocks.0.norm1.weight"):
        flm_rt.load(hub)


def test_config_disagreements(golden_dir, tmp_path):
    hub = _hub_copy(golden_dir, tmp_path)
    cfg = json.loads((hub / "config.json").read_text())
    del cfg["config"]["model"]["n_heads"]
    (hub / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="n_heads"):
        flm_rt.load(hub)
    assert flm_rt.load(hub, n_heads=4).config.n_heads == 4
    with pytest.raises(ConfigError, match="divisible"):
        flm_rt.load(hub, n_heads=3)

    cfg["config"]["model"]["hidden_size"] = 128
    cfg["config"]["model"]["n_heads"] = 4
    (hub / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_size=128"):
        flm_rt.load(hub)

    (hub / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        flm_rt.load(hub)


def test_convert_roundtrip_and_atomicity(golden_dir, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    flm_rt.convert(golden_dir / "fmlm.ckpt", dst)
    cfg = json.loads((dst / "config.json").read_text())
    meta = cfg["flm_rt"]
    assert meta["format_version"] == 2 and meta["weights"] == "ema" and meta["config"]["n_heads"] == 4
    assert cfg["vocab_size"] == 1000 and cfg["config"]["model"]["n_heads"] == 4  # the authors' config, kept
    assert set(os.listdir(dst)) == {"config.json", "model.safetensors"}  # no optimizer state, nothing else
    umask = os.umask(0o022)
    os.umask(umask)
    assert (dst.stat().st_mode & 0o777) == 0o777 & ~umask
    for name in ("config.json", "model.safetensors"):
        assert ((dst / name).stat().st_mode & 0o777) == 0o666 & ~umask, name
    with pytest.raises(CheckpointError, match="already exists"):
        flm_rt.convert(golden_dir / "fmlm.ckpt", dst)
    with pytest.raises(CheckpointError, match="parent directory"):
        flm_rt.convert(golden_dir / "fmlm.ckpt", tmp_path / "missing" / "out")

    half = tmp_path / "half"
    flm_rt.convert(golden_dir / "fmlm.ckpt", half, dtype="bf16")
    assert load_file(str(half / "model.safetensors"))["blocks.0.attn_qkv.weight"].dtype == torch.bfloat16

    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", boom)
    target = tmp_path / "never"
    with pytest.raises(CheckpointError, match="disk full"):
        flm_rt.convert(golden_dir / "fmlm.ckpt", target)
    assert not target.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".flm_rt-convert-")]


def test_flm_training_only_weights_dropped(golden_dir):
    m = flm_rt.load(golden_dir / "flm-hub", device="cpu")
    assert not m.config.two_time
    assert not any(k.startswith("learnable_loss_weighting") for k in m.denoiser.state_dict())


def test_compiled_prefix_teacher_keys_and_ema_order(golden_dir, tmp_path, vectors):
    """torch.compile's `._orig_mod.` is stripped, `teacher*` keys dropped, EMA tensors taken in parameter order."""
    ref = flm_rt.load(golden_dir / "fmlm.ckpt", device="cpu")
    raw = flm_rt.load(golden_dir / "fmlm.ckpt", device="cpu", use_ema=False)
    sd = {}
    for k, v in raw.denoiser.state_dict().items():
        sd[f"backbone._orig_mod.{k}"] = v.clone()
        sd[f"teacher.{k}"] = torch.zeros_like(v)
    shadow = [v.clone() for k, v in ref.denoiser.state_dict().items() if k != "rotary_emb.inv_freq"]
    cfg = {"model": {"n_heads": 4, "length": 32}, "algo": {"name": "dos_denoiser"}}
    path = tmp_path / "compiled.ckpt"
    torch.save({"state_dict": sd, "ema": {"decay": 0.9999, "num_updates": 1, "shadow_params": shadow},
                "hyper_parameters": {"config": cfg}}, path)
    m = flm_rt.load(path, device="cpu")
    assert m.weights == "ema"
    g = flm_rt.generate(m, steps=2, stochasticity=0.8, noise=vectors["noises"])
    assert torch.equal(g.token_ids, vectors["fmlm.fp32.g0.8.steps2.ids"])

    torch.save({"state_dict": sd, "ema": {"shadow_params": shadow[:-1]}, "hyper_parameters": {"config": cfg}},
               path)
    with pytest.raises(CheckpointError, match="EMA holds"):
        flm_rt.load(path)
