"""Fuzzing the loaders with mutations of valid files (issue 16): byte flips, truncations, opcode splices, size and
stride lies, hostile safetensors headers and JSON values, raw random pickles.

Every case runs in the loader worker (tests/hostile.py) with a time limit (a hang fails it) and a memory limit (the
peak resident memory of the case, and RLIMIT_DATA behind it); the only acceptable outcomes are "loaded" and an
``FlmError``. Hypothesis is derandomized with a fixed number of examples, so the suite is reproducible and takes a
fixed time (about 30 s in all on two CPU cores).
"""
import json
import pickletools
import shutil
import struct
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flm_rt
from hostile import FakeTensor, Storage, dumps, lightning_obj, tiny_state_dict, to_legacy_layout, write_ckpt

CASE_TIMEOUT_S = 15.0
CASE_MEMORY = 256 << 20

FUZZ = settings(max_examples=40, derandomize=True, deadline=None, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

HOSTILE_SNIPPETS = [
    b")" + b"\x85" * 5000,                                   # a tuple nested 5000 deep
    b"(" * 20000,                                            # a flood of MARKs
    b"]" * 20000,                                            # a flood of lists
    b"\x96" + struct.pack("<Q", 1 << 40),                    # BYTEARRAY8 claiming 1 TB
    b"\x8e" + struct.pack("<Q", 1 << 40),                    # BINBYTES8 claiming 1 TB
    b"X" + struct.pack("<I", 0xFFFFFFFF),                    # BINUNICODE claiming 4 GB
    b"\x95" + struct.pack("<Q", 1 << 40),                    # FRAME claiming 1 TB
    b"\x8b" + struct.pack("<i", 1 << 30),                    # LONG4 claiming 1 GB
    b"r" + struct.pack("<I", 0xFFFFFFFF),                    # LONG_BINPUT at a huge index
    b"cos\nsystem\n",                                        # code execution
    b"ccommands\ngetoutput\n",                               # code execution through a py2 alias
    b"ctorch._utils\n_rebuild_tensor_v2\n}b",                # BUILD on an allowed global
    b"ccollections\nOrderedDict\nK\x01K\x02s",               # SETITEM on a global
    b"cbuiltins\nbytearray\nJ\x00\x00\x00\x40\x85R",        # bytearray(1 GiB)
    b"cbuiltins\nbytes\n)\x81",                              # NEWOBJ on a builtin
    b"\x82\x01", b"\x83\x01\x00",                            # EXT1 / EXT2
    b"Q", b"Pfoo\n", b"R", b"b", b"s", b"u", b"e", b"a", b"0", b"1", b"2", b".", b"\x81", b"\x92",
    b"h\x00", b"h\xff", b"\x80\x05", b"csomelib\nThing\n)R",
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory, golden_dir):
    """Valid small files to mutate: a hand-built Lightning .ckpt, the golden torch.save .ckpt (with pickled
    OmegaConf configs), and an flm_rt directory."""
    root = tmp_path_factory.mktemp("fuzz-bases")
    sd = tiny_state_dict()
    obj, storages = lightning_obj(sd)
    tiny = {"pkl": dumps(obj), "storages": {f"archive/data/{k}": v for k, v in storages.items()}}
    with zipfile.ZipFile(golden_dir / "fmlm.ckpt") as z:
        pkl_name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        golden = {"pkl": z.read(pkl_name), "pkl_name": pkl_name,
                  "storages": {n: z.read(n) for n in z.namelist() if n != pkl_name}}
    flm_dir = root / "flm_rt-dir"
    hub_dir = root / "hub-dir"
    flm_rt.random_model(flm_rt.ModelConfig(vocab_size=64, length=8, hidden_size=16, n_blocks=1, n_heads=2,
                                           cond_dim=8), device="cpu").save(hub_dir)
    shutil.copytree(hub_dir, flm_dir)
    to_legacy_layout(flm_dir)  # the older flm_rt.json layout, still read
    return {"tiny": tiny, "golden": golden, "flm_dir": flm_dir, "hub_dir": hub_dir, "sd": sd}


def _zip(path, pkl: bytes, storages: dict, pkl_name: str = "archive/data.pkl"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(pkl_name, pkl)
        for name, data in storages.items():
            z.writestr(name, data)
    return path


def _check(worker, path):
    r = worker.run(path, timeout=CASE_TIMEOUT_S)
    assert r.outcome in ("loaded", "flm"), f"{r.outcome}: {r.type}: {r.msg}\n{r.tb}"
    assert r.peak_bytes <= CASE_MEMORY, f"the case used {r.peak_bytes >> 20} MiB"
    return r


def _base(bases, which):
    b = bases[which]
    return b["pkl"], b["storages"], b.get("pkl_name", "archive/data.pkl")


@FUZZ
@given(which=st.sampled_from(["tiny", "golden"]),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6))
def test_pickle_byte_flips(loader_worker, bases, tmp_path, which, flips):
    pkl, storages, name = _base(bases, which)
    data = bytearray(pkl)
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    _check(loader_worker, _zip(tmp_path / "flip.ckpt", bytes(data), storages, name))


@FUZZ
@given(which=st.sampled_from(["tiny", "golden"]), cut=st.floats(0, 1, exclude_max=True),
       whole_file=st.booleans())
def test_truncations(loader_worker, bases, tmp_path, which, cut, whole_file):
    pkl, storages, name = _base(bases, which)
    path = tmp_path / "cut.ckpt"
    if whole_file:
        _zip(path, pkl, storages, name)
        data = path.read_bytes()
        path.write_bytes(data[: int(cut * len(data))])
    else:
        _zip(path, pkl[: int(cut * len(pkl))], storages, name)
    _check(loader_worker, path)


@FUZZ
@given(which=st.sampled_from(["tiny", "golden"]), where=st.floats(0, 1, exclude_max=True),
       mode=st.sampled_from(["replace", "insert", "delete", "duplicate", "swap"]),
       snippet=st.sampled_from(HOSTILE_SNIPPETS), other=st.floats(0, 1, exclude_max=True))
def test_opcode_splices(loader_worker, bases, tmp_path, which, where, mode, snippet, other):
    pkl, storages, name = _base(bases, which)
    starts = [pos for _, _, pos in pickletools.genops(pkl)] + [len(pkl)]
    i, j = int(where * (len(starts) - 1)), int(other * (len(starts) - 1))
    seg_i, seg_j = pkl[starts[i]:starts[i + 1]], pkl[starts[j]:starts[j + 1]]
    head, tail = pkl[:starts[i]], pkl[starts[i + 1]:]
    out = {"replace": head + snippet + tail, "insert": head + snippet + seg_i + tail, "delete": head + tail,
           "duplicate": head + seg_i + seg_i + tail, "swap": head + seg_j + tail}[mode]
    _check(loader_worker, _zip(tmp_path / "splice.ckpt", out, storages, name))


class _PlainGeometry(FakeTensor):
    def __reduce__(self):  # size as a plain tuple: any int, even outside torch.Size's range
        import collections

        import torch
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


_GEOM_INT = st.one_of(st.integers(-2, 70), st.sampled_from([0, 1, 2**31, 2**32 + 1, 2**62, 2**63, 2**64 + 5]))


@FUZZ
@given(key=st.sampled_from(["vocab_embed.embedding", "blocks.0.attn_qkv.weight", "blocks.0.norm1.weight",
                            "sigma_map.mlp.0.weight", "output_layer.linear.bias"]),
       size=st.lists(_GEOM_INT, max_size=4), stride=st.lists(_GEOM_INT, max_size=4), offset=_GEOM_INT,
       numel=_GEOM_INT, stored=st.integers(0, 4096), in_ema=st.booleans())
def test_size_and_stride_lies(loader_worker, bases, tmp_path, key, size, stride, offset, numel, stored, in_ema):
    obj, storages = lightning_obj(bases["sd"])
    lie = _PlainGeometry(Storage("lie", numel), offset, size, stride)
    if in_ema:
        names = [k for k in bases["sd"] if k != "rotary_emb.inv_freq"]
        obj["ema"]["shadow_params"][names.index(key)] = lie
    else:
        obj["state_dict"]["backbone." + key] = lie
    storages["lie"] = bytes(stored)
    _check(loader_worker, write_ckpt(tmp_path / "geometry.ckpt", dumps(obj), storages))


@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4),
       header_len=st.one_of(st.none(), st.integers(0, 2**64 - 1)), cut=st.one_of(st.none(), st.floats(0, 1)))
def test_safetensors_header_mutations(loader_worker, bases, tmp_path, flips, header_len, cut):
    d = tmp_path / "m"
    shutil.copytree(bases["flm_dir"], d, dirs_exist_ok=True)
    data = bytearray((d / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    for where, xor in flips:
        data[8 + int(where * n)] ^= xor  # inside the JSON header: names, dtypes, shapes, offsets
    if header_len is not None:
        data[:8] = struct.pack("<Q", header_len)
    if cut is not None:
        data = data[: int(cut * len(data))]
    (d / "model.safetensors").write_bytes(bytes(data))
    _check(loader_worker, d)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=8)


@FUZZ
@given(field=st.sampled_from(["vocab_size", "length", "hidden_size", "n_blocks", "n_heads", "cond_dim", "two_time",
                              "tokenizer", "default_stochasticity", "extra", "format_version", "weights", "config",
                              "format"]),
       value=_JSON)
def test_flm_rt_json_values(loader_worker, bases, tmp_path, field, value):
    d = tmp_path / "m"
    shutil.copytree(bases["flm_dir"], d, dirs_exist_ok=True)
    meta = json.loads((d / "flm_rt.json").read_text())
    (meta if field in ("format_version", "weights", "config", "format") else meta["config"])[field] = value
    (d / "flm_rt.json").write_text(json.dumps(meta))
    _check(loader_worker, d)


@FUZZ
@given(where=st.sampled_from(["config.model", "config.sampling", "config.data", "config.algo", "config", "flm_rt",
                              "top"]),
       field=st.sampled_from(["length", "n_heads", "hidden_size", "gamma", "tokenizer_name_or_path", "name",
                              "format_version", "weights", "vocab_size", "config"]),
       value=_JSON)
def test_hub_config_json_values(loader_worker, bases, tmp_path, where, field, value):
    """The layout flm_rt writes: config.json's training config, flm_rt's key and the top level, any value."""
    d = tmp_path / "h"
    shutil.copytree(bases["hub_dir"], d, dirs_exist_ok=True)
    cfg = json.loads((d / "config.json").read_text())
    node = cfg
    for part in [] if where == "top" else where.split("."):
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    _check(loader_worker, d)


@FUZZ
@given(pkl=st.binary(max_size=300))
def test_random_pickles(loader_worker, bases, tmp_path, pkl):
    _check(loader_worker, _zip(tmp_path / "random.ckpt", b"\x80\x02" + pkl, bases["tiny"]["storages"]))


def test_unmutated_bases_load(loader_worker, bases, tmp_path):
    """The mutations start from files that load: otherwise every case would fail early and test nothing."""
    for which in ("tiny", "golden"):
        pkl, storages, name = _base(bases, which)
        assert _check(loader_worker, _zip(tmp_path / f"{which}.ckpt", pkl, storages, name)).outcome == "loaded"
    assert _check(loader_worker, bases["flm_dir"]).outcome == "loaded"
    assert _check(loader_worker, bases["hub_dir"]).outcome == "loaded"
