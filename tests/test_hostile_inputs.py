"""Hostile files and bad input (issue 16): each class of attack found against the loader and the CLI, as a test.

Files that used to crash the interpreter, hang or allocate gigabytes are loaded in a worker process with a time
and memory limit per case (tests/hostile.py), so that a regression fails its test instead of the test run.
"""
import json
import os
import shutil
import stat
import struct
import subprocess
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import flm_rt
from flm_rt import cli
from flm_rt.errors import CheckpointError, ConfigError, DeviceError, GenerationError, UnsafeCheckpointError
from hostile import FakeTensor, Storage, dumps, lightning_obj, tiny_state_dict, to_legacy_layout, write_ckpt

from conftest import small_config

MiB = 1 << 20


def _u(s: str) -> bytes:  # BINUNICODE
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _top(state_dict_items: bytes = b"", extra: bytes = b"") -> bytes:
    """{'state_dict': {<items>}, <extra>} as a protocol-2 pickle."""
    return b"\x80\x02}" + _u("state_dict") + b"}" + state_dict_items + b"s" + extra + b"."


@pytest.fixture(scope="module")
def tiny_sd():
    return tiny_state_dict()


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_sd, tmp_path_factory):
    obj, storages = lightning_obj(tiny_sd)
    return write_ckpt(tmp_path_factory.mktemp("tiny") / "tiny.ckpt", dumps(obj), storages)


def _assert_refused(result, budget, match=None):
    assert result.outcome == "flm", (result.outcome, result.type, result.msg, result.tb)
    assert result.peak_bytes <= budget, f"{result.peak_bytes / MiB:.0f} MiB used to refuse the file"
    if match:
        import re
        assert re.search(match, result.msg), result.msg


# ------------------------------------------------------------------------------------------ 1. crash
@pytest.mark.parametrize("depth", [10**5, 10**6])
def test_deeply_nested_key_is_refused_not_a_crash(loader_worker, tmp_path, depth):
    """A tuple nested 10^6 deep as a state-dict key used to overflow the C stack while hashing it (SIGSEGV)."""
    pkl = _top(b")" + b"\x85" * depth + b"K\x01s")
    path = write_ckpt(tmp_path / "deep.ckpt", pkl, {})
    r = loader_worker.run(path, timeout=30)
    _assert_refused(r, 128 * MiB, "nested deeper than 100")


# ------------------------------------------------------------------------------------------ 2. hangs
def test_self_referencing_config_is_refused_quickly(loader_worker, tmp_path, tiny_sd):
    cfg = {"model": {"n_heads": 2, "length": 8}}
    cfg["a"] = cfg
    cfg["b"] = cfg
    obj, storages = lightning_obj(tiny_sd, cfg=cfg)
    path = write_ckpt(tmp_path / "cycle.ckpt", dumps(obj), storages)
    assert path.stat().st_size < 200_000
    r = loader_worker.run(path, timeout=20)
    _assert_refused(r, 128 * MiB, "refers to itself")


def test_shared_list_chain_converts_in_linear_time(loader_worker, tmp_path, tiny_sd):
    """A chain of lists each holding the previous one twice has 2^60 paths; the config converter visits each
    list once, and the model loads."""
    chain = [0]
    for _ in range(60):
        chain = [chain, chain]
    obj, storages = lightning_obj(tiny_sd, cfg={"model": {"n_heads": 2, "length": 8}, "junk": chain})
    path = write_ckpt(tmp_path / "chain.ckpt", dumps(obj), storages)
    r = loader_worker.run(path, timeout=20)
    assert r.outcome == "loaded", (r.outcome, r.msg, r.tb)


def test_shared_tuple_chain_is_refused_before_hashing(loader_worker, tmp_path):
    """The same chain made of tuples, used as a key: hashing it would take 2^60 steps."""
    body = b")q\x00"  # EMPTY_TUPLE, BINPUT 0
    for i in range(60):
        body += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1])
    path = write_ckpt(tmp_path / "tuples.ckpt", _top(body + b"K\x01s"), {})
    r = loader_worker.run(path, timeout=20)
    _assert_refused(r, 128 * MiB, "expands to more than")


# ------------------------------------------------------------------------------------------ 3. memory bombs
def test_zip_bomb_storage_is_refused_before_inflating(loader_worker, tmp_path, tiny_sd):
    v, d = 2_000_000, 16
    sd = dict(tiny_sd)
    obj, storages = lightning_obj(sd)
    obj["state_dict"]["backbone.vocab_embed.embedding"] = FakeTensor(Storage("bomb", v * d), 0, (v, d), (d, 1))
    storages["bomb"] = bytes(v * d * 4)  # 128 MB of zeros, deflated to ~125 KB
    path = write_ckpt(tmp_path / "bomb.ckpt", dumps(obj), storages, compress=True)
    assert path.stat().st_size < 2 * MiB
    r = loader_worker.run(path, timeout=30)
    _assert_refused(r, 64 * MiB, "zip bomb")


def test_stride_zero_weights_are_refused(loader_worker, tmp_path, tiny_sd):
    """Weights that are stride-0 views of one float would describe a V=2,000,000 model (4.3 GB) in 5 KB."""
    obj, storages = lightning_obj(tiny_sd, ema=False)
    one = Storage("one", 1)
    storages["one"] = struct.pack("<f", 0.5)
    obj["state_dict"]["backbone.vocab_embed.embedding"] = FakeTensor(one, 0, (2_000_000, 16), (0, 0))
    obj["state_dict"]["backbone.output_layer.linear.weight"] = FakeTensor(one, 0, (2_000_000, 16), (0, 0))
    path = write_ckpt(tmp_path / "stride0.ckpt", dumps(obj), storages)
    r = loader_worker.run(path, timeout=20)
    _assert_refused(r, 64 * MiB, "more than once")


@pytest.mark.parametrize("size,stride,offset,numel,match", [
    ((4, 4), (4, 1), 0, 15, "needs 16 elements"),           # storage too small for the view
    ((4, 4), (1, 2), 0, 64, "more than once"),               # overlapping rows
    ((4, 4), (4, 1), -1, 16, "geometry"),                    # negative offset
    ((4, 4), (4, -1), 0, 16, "negative"),                    # negative stride
    ((4, 2**62), (1, 4), 0, 16, "negative|geometry|non-int"),  # absurd size
])
def test_size_and_stride_lies(tmp_path, tiny_sd, size, stride, offset, numel, match):
    obj, storages = lightning_obj(tiny_sd, ema=False)
    storages["lie"] = bytes(4 * numel)
    obj["state_dict"]["backbone.blocks.0.norm1.weight"] = FakeTensor(Storage("lie", numel), offset, size, stride)
    path = write_ckpt(tmp_path / "lie.ckpt", dumps(obj), storages)
    with pytest.raises(CheckpointError, match=match):
        flm_rt.load(path)


def test_declared_storage_size_must_match_the_member(tmp_path, tiny_sd):
    obj, storages = lightning_obj(tiny_sd, ema=False)
    storages["0"] = storages["0"] + bytes(4096)  # the member holds more than the pickle declares
    path = write_ckpt(tmp_path / "size.ckpt", dumps(obj), storages)
    with pytest.raises(CheckpointError, match="expected"):
        flm_rt.load(path)


@pytest.mark.parametrize("payload", [
    _global("builtins", "bytearray") + b"J\x00\x94\x35\x77\x85R",      # bytearray(2_000_000_000)
    _global("__builtin__", "bytes") + b"J\x00\x94\x35\x77\x85R",       # bytes(2e9) through the py2 alias
    _global("builtins", "bytes") + b")\x81",                           # NEWOBJ on a builtin
    b"\x96" + struct.pack("<Q", 2_000_000_000) + b"xx",                # BYTEARRAY8 claiming 2 GB
])
def test_allocation_requests_in_the_pickle_are_refused(loader_worker, tmp_path, payload):
    pkl = b"\x80\x05}" + _u("state_dict") + b"}" + _u("x") + payload + b"ss."
    path = write_ckpt(tmp_path / "alloc.ckpt", pkl, {})
    assert path.stat().st_size < 1000
    r = loader_worker.run(path, timeout=20)
    _assert_refused(r, 64 * MiB)


def _flm_rt_dir(tmp_path, golden_dir, name="m"):
    """A folder in flm_rt's older flm_rt.json layout (still read): its JSON holds a whole ModelConfig to attack."""
    dst = tmp_path / name
    flm_rt.convert(golden_dir / "fmlm.ckpt", dst)
    return to_legacy_layout(dst)


def _edit_meta(path, fn):
    meta = json.loads((path / "flm_rt.json").read_text())
    fn(meta)
    (path / "flm_rt.json").write_text(json.dumps(meta))


def test_config_claiming_huge_models_is_refused_before_building_them(loader_worker, tmp_path, golden_dir):
    blocks = _flm_rt_dir(tmp_path, golden_dir, "blocks")
    _edit_meta(blocks, lambda m: m["config"].update(n_blocks=10**6))
    r = loader_worker.run(blocks, timeout=20)
    _assert_refused(r, 64 * MiB, "1000000 transformer blocks")
    vocab = _flm_rt_dir(tmp_path, golden_dir, "vocab")
    _edit_meta(vocab, lambda m: m["config"].update(vocab_size=10**9))
    r = loader_worker.run(vocab, timeout=20)
    _assert_refused(r, 64 * MiB, "needs .* GiB")


def test_model_memory_limit(golden_dir, monkeypatch):
    monkeypatch.setenv("FLM_RT_MAX_MODEL_BYTES", "100000")
    with pytest.raises(CheckpointError, match=r"needs 1\.1 MiB .* limit of 0\.1 MiB .* FLM_RT_MAX_MODEL_BYTES"):
        flm_rt.load(golden_dir / "fmlm.ckpt")
    from flm_rt.limits import Limits

    with pytest.raises(CheckpointError, match="above the limit"):
        flm_rt.load(golden_dir / "fmlm-hub", limits=Limits(max_model_bytes=1000))
    monkeypatch.delenv("FLM_RT_MAX_MODEL_BYTES")
    assert flm_rt.load(golden_dir / "fmlm.ckpt").config.vocab_size == 1000


def test_param_count_formula_matches_the_network():
    from flm_rt.limits import model_bytes
    from flm_rt.loading import param_count

    for kw in ({}, {"two_time": False}, {"vocab_size": 30522, "n_blocks": 3, "hidden_size": 64, "n_heads": 4}):
        cfg = small_config(**kw)
        assert model_bytes(cfg) == 4 * param_count(cfg)


def test_special_files_are_refused(loader_worker, tmp_path, golden_dir):
    fifo = tmp_path / "x.ckpt"
    os.mkfifo(fifo)
    r = loader_worker.run(fifo, timeout=10)
    _assert_refused(r, 64 * MiB, "FIFO")
    link = tmp_path / "zero.ckpt"
    link.symlink_to("/dev/zero")
    r = loader_worker.run(link, timeout=10)
    _assert_refused(r, 64 * MiB, "device")
    hub = tmp_path / "hub"
    shutil.copytree(golden_dir / "fmlm-hub", hub)
    os.remove(hub / "model.safetensors")
    (hub / "model.safetensors").symlink_to("/dev/zero")
    r = loader_worker.run(hub, timeout=10)
    _assert_refused(r, 64 * MiB, "device")
    os.remove(hub / "config.json")
    os.mkfifo(hub / "config.json")
    r = loader_worker.run(hub, timeout=10)
    _assert_refused(r, 64 * MiB, "FIFO")


# ------------------------------------------------------------------------------------------ 4. state mutation
def test_build_on_an_allowed_global_is_refused_and_changes_nothing(tmp_path):
    from flm_rt import safe_pickle

    cases = [
        _global("torch._utils", "_rebuild_tensor_v2") + b"}" + _u("pwned") + b"K\x01sb",       # __dict__ update
        _global("torch._utils", "_rebuild_tensor_v2") + b"N}" + _u("pwned") + b"K\x01s\x86b",  # slot state
        _global("collections", "OrderedDict") + _u("pwned") + b"K\x01s",                     # SETITEM on a global
        _global("builtins", "list") + b"K\x01a",                                             # APPEND on a global
    ]
    for i, payload in enumerate(cases):
        path = write_ckpt(tmp_path / f"build{i}.ckpt", _top(extra=_u("x") + payload + b"s"), {})
        with pytest.raises(CheckpointError, match="hostile"):
            flm_rt.load(path)
    for fn in (*safe_pickle._ALLOWED.values(), *safe_pickle._SAFE_BUILTINS.values()):
        assert not hasattr(fn, "pwned")


# ------------------------------------------------------------------------------------------ 5. refusal bypass
class PopenPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.getoutput, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_python2_aliases_are_resolved_before_judging(tmp_path, protocol):
    """protocol < 3 writes subprocess.getoutput as commands.getoutput; it is refused, not loaded as inert data."""
    marker = tmp_path / "pwned"
    bad = tmp_path / "alias.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": PopenPayload(str(marker))}}, bad,
               pickle_protocol=protocol)
    if protocol < 3:
        with zipfile.ZipFile(bad) as z:
            assert b"commands" in z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    with pytest.raises(UnsafeCheckpointError, match="subprocess.getoutput"):
        flm_rt.load(bad)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ 6. config values
@pytest.mark.parametrize("model_cfg,match", [
    ({"n_heads": 4.9, "length": 32}, "n_heads must be an integer"),
    ({"n_heads": [4], "length": 32}, "n_heads must be an integer"),
    ({"n_heads": True, "length": 32}, "n_heads must be an integer"),
    ({"n_heads": 4, "length": 32.7}, "length must be an integer"),
    ({"n_heads": 4, "length": float("inf")}, "length must be an integer"),
    ({"n_heads": 4, "length": 10**400}, "length must be an integer in"),
    ({"n_heads": 4, "length": 32, "hidden_size": "64"}, "hidden_size must be an integer"),
])
def test_ckpt_config_values_are_validated_not_coerced(golden_dir, tmp_path, model_cfg, match):
    src = flm_rt.load(golden_dir / "fmlm.ckpt", device="cpu")
    obj, storages = lightning_obj(src.denoiser.state_dict(), cfg={"model": model_cfg})
    path = write_ckpt(tmp_path / "cfg.ckpt", dumps(obj), storages)
    with pytest.raises(ConfigError, match=match):
        flm_rt.load(path)


@pytest.mark.parametrize("gamma,ok", [(0.8, True), (None, True), (5.0, False), ("0.5", False), (float("nan"), False)])
def test_sampling_gamma_is_validated(golden_dir, tmp_path, gamma, ok):
    hub = tmp_path / "hub"
    shutil.copytree(golden_dir / "fmlm-hub", hub)
    cfg = json.loads((hub / "config.json").read_text())
    cfg["config"]["sampling"]["gamma"] = gamma
    (hub / "config.json").write_text(json.dumps(cfg))
    if ok:
        assert flm_rt.load(hub).config.default_stochasticity == (gamma or 0.0)
    else:
        with pytest.raises(ConfigError, match="sampling.gamma must be a number in"):
            flm_rt.load(hub)


@pytest.mark.parametrize("edit,error,match", [
    (lambda m: m["config"].update(two_time="no"), ConfigError, "two_time must be true or false"),
    (lambda m: m["config"].update(n_heads=4.9), ConfigError, "n_heads must be a positive int"),
    (lambda m: m["config"].update(length=1e400), ConfigError, "length must be a positive int"),
    (lambda m: m["config"].update(default_stochasticity="1"), ConfigError, "default_stochasticity"),
    (lambda m: m.update(format_version="x"), CheckpointError, "format_version must be a positive integer"),
    (lambda m: m.update(format_version=99), CheckpointError, "newer flm_rt"),
    (lambda m: m.update(weights=["ema"]), CheckpointError, "weights must be a short string"),
])
def test_flm_rt_json_values_are_validated(golden_dir, tmp_path, edit, error, match):
    path = _flm_rt_dir(tmp_path, golden_dir)
    _edit_meta(path, edit)
    with pytest.raises(error, match=match):
        flm_rt.load(path)


def test_json_bombs(golden_dir, tmp_path):
    path = _flm_rt_dir(tmp_path, golden_dir)
    (path / "flm_rt.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        flm_rt.load(path)
    (path / "flm_rt.json").write_text('{"format": "flm_rt", "config": {"n_heads": ' + "9" * 5000 + "}}")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        flm_rt.load(path)


def test_float8_and_integer_weights_are_refused(golden_dir, tmp_path):
    hub = tmp_path / "hub"
    shutil.copytree(golden_dir / "fmlm-hub", hub)
    sd = load_file(str(hub / "model.safetensors"))
    sd["blocks.0.norm1.weight"] = sd["blocks.0.norm1.weight"].to(torch.float8_e4m3fn)
    save_file(sd, str(hub / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unsupported dtype .*blocks\.0\.norm1\.weight \(F8_E4M3\)"):
        flm_rt.load(hub)
    sd["blocks.0.norm1.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(sd, str(hub / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unsupported dtype .*norm1\.weight \(I32\)"):
        flm_rt.load(hub)


def test_unknown_object_as_ema_shadow_params(tmp_path, tiny_sd):
    obj, storages = lightning_obj(tiny_sd)
    inert = _global("somelib", "Thing") + b")R"
    # top["ema"] = {"shadow_params": Thing()}, appended before STOP (it replaces the real "ema")
    pkl = dumps(obj)[:-1] + _u("ema") + b"}" + _u("shadow_params") + inert + b"ss."
    path = write_ckpt(tmp_path / "ema.ckpt", pkl, storages)
    with pytest.raises(CheckpointError, match="shadow_params is <Thing>, not a list"):
        flm_rt.load(path)


def test_non_string_state_dict_key(tmp_path):
    path = write_ckpt(tmp_path / "key.ckpt", _top(b"K\x01K\x02s"), {})
    with pytest.raises(CheckpointError, match="key is 1, not a string"):
        flm_rt.load(path)


# ------------------------------------------------------------------------------------------ 7. one error path
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "gpt2-random"
    flm_rt.random_model(small_config(), seed=0, output_scale=6.0).save(path)
    return path


def _cli(capsys, *args):
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _assert_clean(rc, err, match):
    import re
    assert rc == 2, err
    assert err.startswith("flm-rt: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(match, err), err


def test_cli_bad_environment(capsys, monkeypatch, golden_dir):
    from flm_rt import prepack

    monkeypatch.setenv("FLM_RT_KERNELS", "bogus")
    _assert_clean(*_cli(capsys, "generate", golden_dir / "fmlm.ckpt", "-n", "1")[::2], "FLM_RT_KERNELS")
    monkeypatch.delenv("FLM_RT_KERNELS")
    monkeypatch.setenv("FLM_RT_PREPACK", "maybe")
    monkeypatch.setattr(prepack, "_ENABLED", None)
    _assert_clean(*_cli(capsys, "generate", golden_dir / "fmlm.ckpt", "-n", "1")[::2], "FLM_RT_PREPACK")
    monkeypatch.setattr(prepack, "_ENABLED", None)
    monkeypatch.delenv("FLM_RT_PREPACK")
    monkeypatch.setenv("FLM_RT_MAX_MODEL_BYTES", "lots")
    _assert_clean(*_cli(capsys, "info", golden_dir / "fmlm.ckpt")[::2], "FLM_RT_MAX_MODEL_BYTES")


def test_cli_ext_kernels_requested_but_unavailable(capsys, monkeypatch, golden_dir):
    from flm_rt import _ext

    monkeypatch.setattr(_ext, "EXT_LOADED", False)
    monkeypatch.setattr(_ext, "EXT_ERROR", "disabled by FLM_RT_DISABLE_EXT=1")
    _assert_clean(*_cli(capsys, "generate", golden_dir / "fmlm.ckpt", "--kernels", "ext", "-n", "1")[::2],
                  "backend 'ext' requested .* FLM_RT_DISABLE_EXT")


@pytest.mark.parametrize("args,match", [
    (["-n", "100000"], "working memory"),
    (["--steps", str(2**62)], "steps must be an int"),
    (["--seed", str(2**64)], "seed must be an int in"),
    (["--seed", "-1"], "seed must be an int in"),
    (["--seq-len", "0"], "seq_len"),
])
def test_cli_bad_requests(capsys, gpt2_dir, args, match):
    _assert_clean(*_cli(capsys, "generate", gpt2_dir, *args)[::2], match)


def test_request_memory_is_checked_before_allocating(gpt2_model_small, monkeypatch):
    monkeypatch.setenv("FLM_RT_MAX_REQUEST_BYTES", str(20 * MiB))
    with pytest.raises(GenerationError, match="needs about .* FLM_RT_MAX_REQUEST_BYTES"):
        flm_rt.generate(gpt2_model_small, num_samples=8)  # 8 x 16 x 50258 x 4 x 4 bytes = 100 MiB
    noise = torch.randn(1, 8, 16, 50258)
    with pytest.raises(GenerationError, match="working memory"):
        flm_rt.generate(gpt2_model_small, noise=noise)
    assert flm_rt.generate(gpt2_model_small, num_samples=1, decode=False).token_ids.shape == (1, 16)


@pytest.fixture(scope="module")
def gpt2_model_small():
    return flm_rt.random_model(small_config(), seed=0, output_scale=6.0)


def test_meta_noise_is_refused(gpt2_model_small):
    with pytest.raises(GenerationError, match="meta"):
        flm_rt.generate(gpt2_model_small, noise=torch.empty(1, 1, 16, 50258, device="meta"))


def test_ext_backend_errors_are_flm_errors(gpt2_model_small, monkeypatch):
    from flm_rt import _ext

    monkeypatch.setattr(_ext, "EXT_LOADED", False)
    with pytest.raises(DeviceError, match="'ext' requested"):
        flm_rt.generate(gpt2_model_small, kernels="ext", decode=False)
    with pytest.raises(ConfigError, match="backend must be one of"):
        flm_rt.generate(gpt2_model_small, kernels="fast", decode=False)


def test_convert_write_failures_are_clean(capsys, golden_dir, tmp_path):
    src = golden_dir / "fmlm.ckpt"
    _assert_clean(*_cli(capsys, "convert", src, "/proc/flm_rt_out")[::2], "cannot write")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    _assert_clean(*_cli(capsys, "convert", src, dangling)[::2], "already exists")
    assert not (tmp_path / "nowhere").exists()
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        _assert_clean(*_cli(capsys, "convert", src, ro / "out")[::2], "cannot write")


def test_cli_internal_errors_are_one_line(capsys, monkeypatch, golden_dir):
    from flm_rt import api

    def broken(*a, **k):
        raise KeyError("a bug")
    monkeypatch.setattr(api, "load", broken)
    rc, _, err = _cli(capsys, "info", golden_dir / "fmlm.ckpt")
    assert rc == 1 and err.count("\n") == 1 and "internal error: KeyError" in err and "report" in err, err
    monkeypatch.setenv("FLM_RT_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["info", str(golden_dir / "fmlm.ckpt")])


def test_cli_hostile_file_is_one_line(capsys, tmp_path):
    path = write_ckpt(tmp_path / "deep.ckpt", _top(b")" + b"\x85" * 1000 + b"K\x01s"), {})
    _assert_clean(*_cli(capsys, "info", path)[::2], r"deep\.ckpt: hostile or corrupt checkpoint")


# ------------------------------------------------------------------------------------------ 10. seeds
def test_seeds_do_not_wrap_at_2_63(gpt2_model_small):
    from flm_rt.api import sample_seed

    low32 = 2**32 - 1  # PyTorch's CPU generator seeds its mt19937 with the low 32 bits only
    for k in range(3):
        seeds = [sample_seed(s, k) for s in (0, 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)]
        assert all(0 <= s < 2**64 for s in seeds)
        assert len({s & low32 for s in seeds}) == len(seeds)
    a = flm_rt.generate(gpt2_model_small, seed=0, num_samples=2, decode=False).token_ids
    b = flm_rt.generate(gpt2_model_small, seed=2**63 - 1, num_samples=2, decode=False).token_ids
    c = flm_rt.generate(gpt2_model_small, seed=2**64 - 1, num_samples=2, decode=False).token_ids
    assert not torch.equal(a, b) and not torch.equal(b, c)
    with pytest.raises(GenerationError, match=r"seed must be an int in \[0, 2\^64\)"):
        flm_rt.generate(gpt2_model_small, seed=2**64)


# ------------------------------------------------------------------------------------------ 8. outputs and races
@pytest.mark.parametrize("mask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_convert_permissions_follow_the_umask(golden_dir, tmp_path, mask, dir_mode, file_mode):
    old = os.umask(mask)
    try:
        dst = flm_rt.convert(golden_dir / "fmlm.ckpt", tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(dst).st_mode) == dir_mode
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(os.path.join(dst, name)).st_mode) == file_mode


def test_temporaries_of_killed_converts_are_swept(golden_dir, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".flm_rt-convert-{dead.pid}-abcd"
    live = tmp_path / f".flm_rt-convert-{os.getpid()}-efgh"  # a convert still running in this process
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    flm_rt.convert(golden_dir / "fmlm.ckpt", tmp_path / "out")
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out"])


def test_concurrent_converts_loser_gets_a_clean_error(golden_dir, tmp_path, monkeypatch):
    from flm_rt import outputs

    dst = tmp_path / "out"
    real = outputs.apply_umask

    def other_writer_finishes_first(tmp):
        real(tmp)
        dst.mkdir()
        (dst / "flm_rt.json").write_text("{}")
    monkeypatch.setattr(outputs, "apply_umask", other_writer_finishes_first)
    with pytest.raises(CheckpointError, match="another process wrote it first"):
        flm_rt.convert(golden_dir / "fmlm.ckpt", dst)
    assert (dst / "flm_rt.json").read_text() == "{}"  # the winner's output is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_demo_first_use_race(tmp_path, monkeypatch):
    """Two first uses of `flm-rt demo` at once: the one that finds the model written meanwhile uses it."""
    path = tmp_path / "demo"
    monkeypatch.setenv("FLM_RT_DEMO_MODEL", str(path))
    path.mkdir()
    (path / "flm_rt.json").write_text("{}")  # the other process's finished model
    real_isdir = os.path.isdir
    monkeypatch.setattr(cli.os.path, "isdir", lambda p: False if str(p) == str(path) else real_isdir(p))
    # ... which was not there when this one looked
    assert cli.demo_model_path() == str(path)


def test_one_overwrite_rule_for_convert_and_export(golden_dir, tmp_path):
    from flm_rt.exporting import ExportError

    dst = flm_rt.convert(golden_dir / "fmlm.ckpt", tmp_path / "out")
    with pytest.raises(CheckpointError, match="already exists.*overwrite"):
        flm_rt.convert(golden_dir / "fmlm.ckpt", dst)
    flm_rt.convert(golden_dir / "fmlm.ckpt", dst, dtype="bf16", overwrite=True)
    assert load_file(os.path.join(dst, "model.safetensors"))["blocks.0.attn_qkv.weight"].dtype == torch.bfloat16
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not written by flm_rt"):
        flm_rt.convert(golden_dir / "fmlm.ckpt", precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"

    model = flm_rt.load(dst)
    out = tmp_path / "m.pt"
    out.write_bytes(b"previous")
    with pytest.raises(ExportError, match="already exists.*overwrite"):
        flm_rt.export(model, out, format="torchscript")
    assert out.read_bytes() == b"previous"
    flm_rt.export(model, out, format="torchscript", overwrite=True)
    assert out.read_bytes() != b"previous" and (tmp_path / "m.pt.json").is_file()


def test_floods_stay_within_memory(loader_worker, tmp_path):
    """Cheap opcodes repeated: empty lists, marks, distinct class names; each is bounded in count and memory."""
    floods = {"lists": b"]" * 300_000, "marks": b"(" * 300_000,
              "classes": b"".join(b"cm\n" + str(i).encode() + b"\n0" for i in range(20_000))}
    for name, body in floods.items():
        path = write_ckpt(tmp_path / f"{name}.ckpt", b"\x80\x02" + body + b"}.", {})
        r = loader_worker.run(path, timeout=60)
        assert r.outcome in ("flm", "loaded") and r.peak_bytes < 256 * MiB, (name, r.outcome, r.msg, r.peak_bytes)
    r = loader_worker.run(tmp_path / "classes.ckpt", timeout=60)
    assert "more than 10000 different classes" in r.msg


def test_env_switch_reads_on_off_and_refuses_anything_else(monkeypatch):
    from flm_rt.limits import env_switch

    monkeypatch.delenv("FLM_RT_TEST_SWITCH", raising=False)
    assert env_switch("FLM_RT_TEST_SWITCH") is True and env_switch("FLM_RT_TEST_SWITCH", default=False) is False
    for value, want in (("0", False), (" OFF ", False), ("false", False), ("1", True), ("On", True), ("", True)):
        monkeypatch.setenv("FLM_RT_TEST_SWITCH", value)
        assert env_switch("FLM_RT_TEST_SWITCH") is want, value
    monkeypatch.setenv("FLM_RT_TEST_SWITCH", "2")
    with pytest.raises(flm_rt.ConfigError, match="FLM_RT_TEST_SWITCH must be 0 or 1, got '2'"):
        env_switch("FLM_RT_TEST_SWITCH")
