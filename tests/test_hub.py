"""Models by Hugging Face Hub name: a real cache layout offline, and the real download path against a local
HTTP server that answers the Hub's file-resolve requests (huggingface_hub does every request; flm_rt none)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants

import flm_rt
from flm_rt import hub
from flm_rt.errors import CheckpointError, ConfigError, HubError

from fake_hub import FakeHub, put_in_cache

FMLM = hub.find_published("fmlm-owt")
FLM = hub.find_published("flm-owt")
OTHER = "someone/tiny-flow"
REV_A, REV_B = "a" * 40, "b" * 40


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    """huggingface_hub fetches an agent registry from the endpoint for its User-Agent unless telemetry is off;
    these tests make no request outside 127.0.0.1."""
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)


def _files(golden_dir, kind, **config_edits):
    """config.json + model.safetensors bytes of a golden model in the released layout, the config edited."""
    src = golden_dir / f"{kind}-hub"
    cfg = json.loads((src / "config.json").read_text())
    for section, values in config_edits.items():
        cfg["config"].setdefault(section, {}).update(values)
    return {"config.json": json.dumps(cfg).encode(), "model.safetensors": (src / "model.safetensors").read_bytes()}


@pytest.fixture(scope="module")
def released(golden_dir):
    # FLM-B-OWT's released config names its algorithm "dos"
    return {"fmlm": _files(golden_dir, "fmlm"), "flm": _files(golden_dir, "flm", algo={"name": "dos"})}


@pytest.fixture()
def cache(tmp_path, released):
    c = tmp_path / "hf" / "hub"
    put_in_cache(c, FMLM.repo_id, FMLM.revision, released["fmlm"])
    put_in_cache(c, FLM.repo_id, FLM.revision, released["flm"])
    put_in_cache(c, OTHER, REV_A, released["flm"])               # main -> A (FLM)
    put_in_cache(c, OTHER, REV_B, released["fmlm"], ref=None)    # B (FMLM), reachable by commit only
    return c


def _fmlm_ok(model, vectors):
    gen = flm_rt.generate(model, steps=4, stochasticity=0.8, noise=vectors["noises"])
    return torch.equal(gen.token_ids, vectors["fmlm.fp32.g0.8.steps4.ids"])


def _flm_ok(model, vectors):
    gen = flm_rt.generate(model, steps=4, noise=vectors["noises"])
    return torch.equal(gen.token_ids, vectors["flm.fp32.steps4.ids"])


def test_load_published_by_name_alias_and_revision_offline(cache, vectors):
    for name in ("david3684/FMLM-B-OWT", "fmlm-owt", "David3684/fmlm-b-owt"):
        m = flm_rt.load(name, cache_dir=cache, local_files_only=True, device="cpu")
        assert m.source == f"{FMLM.repo_id}@{FMLM.revision[:7]}" and m.format == "hub" and m.config.two_time
        assert Path(m.path).parent.name == FMLM.revision
        assert _fmlm_ok(m, vectors)
    flm = flm_rt.load("flm-owt", cache_dir=cache, local_files_only=True, device="cpu")
    assert not flm.config.two_time and flm.config.extra["algo"] == "dos" and flm.notes == [
        "the config names tokenizer 'gpt2' but the model has 1000 tokens (gpt2 has 50257 or 50258)"]
    assert _flm_ok(flm, vectors)
    # an unpublished repo: main through refs/, another revision by commit
    assert _flm_ok(flm_rt.load(OTHER, cache_dir=cache, local_files_only=True), vectors)
    assert _flm_ok(flm_rt.load(OTHER, revision="main", cache_dir=cache, local_files_only=True), vectors)
    assert _fmlm_ok(flm_rt.load(OTHER, revision=REV_B, cache_dir=cache, local_files_only=True), vectors)


def test_offline_and_not_cached_names_repo_revision_and_folder(cache, tmp_path):
    with pytest.raises(HubError) as e:
        flm_rt.load("fmlm-lm1b", cache_dir=cache, local_files_only=True)
    msg = str(e.value)
    assert "david3684/FMLM-B-LM1B" in msg and "356592ce2d9af4adbf9d7b55e8e00bbfb37eb4c8" in msg
    assert str(cache) in msg and "hf download" in msg and "not a local path" in msg
    with pytest.raises(HubError, match=f"{OTHER} \\(revision {'c' * 40}\\)"):
        flm_rt.load(OTHER, revision="c" * 40, cache_dir=cache, local_files_only=True)
    # a snapshot holding only config.json (a download that stopped between the files) is not a model
    put_in_cache(cache, "someone/half", REV_A, {"config.json": b"{}"})
    with pytest.raises(HubError, match="missing model.safetensors"):
        flm_rt.load("someone/half", cache_dir=cache, local_files_only=True)
    # local paths win; what is neither a path nor a repo id says so
    with pytest.raises(CheckpointError, match="no such file or directory.*not a Hugging Face Hub repo id"):
        flm_rt.load(tmp_path / "missing.ckpt")
    with pytest.raises(ConfigError, match="revision"):
        flm_rt.load(cache.parent, revision="main")
    assert not hub.is_hub_name("dir/model.ckpt") and not hub.is_hub_name("/abs/x") and hub.is_hub_name("a/b")


@pytest.fixture()
def endpoint(monkeypatch):
    """What HF_ENDPOINT does when set before huggingface_hub is imported (these constants are read at import)."""
    def use(url):
        monkeypatch.setattr(hf_constants, "ENDPOINT", url)
        monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            url + "/{repo_id}/resolve/{revision}/{filename}")
    return use


def test_download_through_hub_protocol(tmp_path, released, vectors, endpoint, monkeypatch):
    cache = tmp_path / "cache"
    with FakeHub() as server:
        endpoint(server.url)
        server.add(FMLM.repo_id, FMLM.revision, released["fmlm"], branch=None)
        server.add("someone/private", REV_A, released["flm"], token="hf_secret")
        m = flm_rt.load("fmlm-owt", cache_dir=cache)
        assert _fmlm_ok(m, vectors)
        # only the two files, each a HEAD then a GET, at the pinned commit
        got = sorted((meth, path) for meth, path, _ in server.requests)
        want = sorted((meth, f"/{FMLM.repo_id}/resolve/{FMLM.revision}/{f}")
                      for meth in ("HEAD", "GET") for f in ("config.json", "model.safetensors"))
        assert got == want
        assert hub.is_cached(FMLM.repo_id, FMLM.revision, cache)
        # cached at a commit: no request at all the second time
        server.requests.clear()
        assert _fmlm_ok(flm_rt.load("fmlm-owt", cache_dir=cache), vectors) and server.requests == []
        # a private repo: the token (HF_TOKEN or token=) goes with the requests
        with pytest.raises(HubError, match="no Hub repo someone/private was found .*HF_TOKEN"):
            flm_rt.load("someone/private", cache_dir=cache)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        assert _flm_ok(flm_rt.load("someone/private", cache_dir=cache), vectors)
        monkeypatch.delenv("HF_TOKEN")
        assert _flm_ok(flm_rt.load("someone/private", cache_dir=cache, token="hf_secret"), vectors)
        assert all(auth for _, path, auth in server.requests[-2:])  # the last HEAD went with the token
        with pytest.raises(HubError, match="has no revision 'nope'"):
            flm_rt.load("someone/private", revision="nope", cache_dir=cache, token="hf_secret")
        server.add("someone/not-a-model", REV_A, {"config.json": b"{}"})
        with pytest.raises(HubError, match="has no model.safetensors"):
            flm_rt.load("someone/not-a-model", cache_dir=cache)


def test_transfer_cut_half_way_leaves_nothing_loadable(tmp_path, released, vectors, endpoint):
    cache = tmp_path / "cache"
    with FakeHub() as server:
        endpoint(server.url)
        server.add(OTHER, REV_A, released["fmlm"])
        server.cut.add((OTHER, "model.safetensors"))
        with pytest.raises(HubError, match=f"downloading model.safetensors of Hub repo {OTHER}.*failed"):
            flm_rt.load(OTHER, cache_dir=cache)
        repo = cache / ("models--" + OTHER.replace("/", "--"))
        left = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file() or p.is_symlink())
        assert not [p for p in left if "model.safetensors" in p or p.endswith(".incomplete")], left
        size = len(released["fmlm"]["model.safetensors"])
        assert all((repo / p).stat().st_size != size // 2 for p in left if p.startswith("blobs/"))
        # later loads: offline says "not cached" (not a truncated-file error); online downloads it afresh
        with pytest.raises(HubError, match="not in the cache folder"):
            flm_rt.load(OTHER, cache_dir=cache, local_files_only=True)
        server.cut.clear()
        assert _fmlm_ok(flm_rt.load(OTHER, cache_dir=cache), vectors)


def test_cli_with_hf_environment(tmp_path, released):
    """HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE as a user sets them: `flm-rt generate NAME` downloads, then runs
    offline from the cache, with load, cold and warm times reported apart."""
    home = tmp_path / "hf"

    def run(*args, **env):
        e = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        e.update({"HF_HOME": str(home), "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                  **env})
        return subprocess.run([sys.executable, "-m", "flm_rt.cli", *args], capture_output=True, text=True,
                              env=e, timeout=300)

    with FakeHub() as server:
        server.add(FMLM.repo_id, FMLM.revision, released["fmlm"], branch=None)
        out = run("generate", "david3684/FMLM-B-OWT", "-n", "2", "--seed", "3", "--json", HF_ENDPOINT=server.url)
        assert out.returncode == 0, out.stderr
        assert {(m, p) for m, p, _ in server.requests} == {
            (m, f"/{FMLM.repo_id}/resolve/{FMLM.revision}/{f}") for m in ("HEAD", "GET")
            for f in ("config.json", "model.safetensors")}  # through HF_ENDPOINT, nothing else
    assert hub.is_cached(FMLM.repo_id, FMLM.revision, home / "hub")
    online = json.loads(out.stdout)
    out = run("generate", "david3684/FMLM-B-OWT", "-n", "2", "--seed", "3", "--json", "--repeat", "2",
              HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stderr
    offline = json.loads(out.stdout)
    assert offline["token_ids"] == online["token_ids"] and offline["model"] == f"{FMLM.repo_id}@{FMLM.revision[:7]}"
    assert offline["load_s"] > 0 and offline["first_call_s"] > 0 and len(offline["warm_calls_s"]) == 2


def test_cli_models_offline_error_and_version(cache, capsys):
    from flm_rt import cli

    assert cli.main(["models", "--cache-dir", str(cache), "--json"]) == 0
    listed = {m["repo_id"]: m["cached"] for m in json.loads(capsys.readouterr().out)["models"]}
    assert listed == {"david3684/FLM-B-OWT": True, "david3684/FMLM-B-OWT": True, "david3684/FLM-B-LM1B": False,
                      "david3684/FMLM-B-LM1B": False}
    assert cli.main(["generate", "fmlm-lm1b", "--offline", "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flm-rt: error: ") and err.count("\n") == 1 and str(cache) in err
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"flm-rt {flm_rt.__version__}"
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert flm_rt.__version__ == pyproject["project"]["version"]


def test_every_model_command_takes_a_name(cache, tmp_path, monkeypatch, capsys):
    """info, convert and export (generate above) by alias, with the cache and offline mode as HF_HUB_CACHE and
    HF_HUB_OFFLINE=1 set them at import."""
    from flm_rt import cli

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert cli.main(["info", "fmlm-owt"]) == 0
    assert f"{FMLM.repo_id}@{FMLM.revision[:7]}  (hub, ema weights)" in capsys.readouterr().out
    assert cli.main(["convert", "flm-owt", str(tmp_path / "conv")]) == 0
    assert json.loads((tmp_path / "conv" / "config.json").read_text())["config"]["algo"]["name"] == "dos"
    assert cli.main(["export", "fmlm-owt", str(tmp_path / "d.pt"), "--format", "torchscript", "--what", "denoiser",
                     "--no-progress"]) == 0
    assert (tmp_path / "d.pt").is_file()
    assert cli.main(["info", "fmlm-lm1b"]) == 2  # not cached, offline: one line, exit 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
