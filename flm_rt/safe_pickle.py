"""A restricted reader for PyTorch/Lightning ``.ckpt`` files: checkpoints are untrusted input.

The file is a zip archive holding ``<name>/data.pkl`` (a pickle) and raw tensor storages ``<name>/data/<key>``.
The pickle is read by an Unpickler that never imports or calls anything the file names, except:

* tensor reconstruction (``torch._utils._rebuild_tensor_v2`` and friends), re-implemented here over the raw
  storage bytes with bounds checks;
* plain containers (dict, list, tuple, set, OrderedDict, defaultdict-as-dict) and torch dtypes/sizes.

Any other global is replaced by an inert placeholder class (:class:`Inert`): "calling" it only records its
arguments, so a pickled OmegaConf config or tokenizer becomes plain data that can be inspected. Globals that only
make sense as code execution (``os.system``, ``builtins.eval``, ``subprocess.*``, ...) are refused with
:class:`UnsafeCheckpointError` so that a tampered file never loads silently.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import torch

from .errors import CheckpointError, UnsafeCheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}

# Modules whose globals can only mean "run code": refuse the file outright.
_REFUSED_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "importlib", "runpy", "pickle",
    "_pickle", "marshal", "shutil", "socket", "ctypes", "code", "codeop", "pty", "types", "functools",
    "operator", "inspect", "webbrowser", "multiprocessing", "signal", "pdb", "timeit", "asyncio", "torch",
    "numpy.testing",
}
_SAFE_BUILTINS = {"dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset,
                  "int": int, "float": float, "str": str, "bytes": bytes, "bool": bool, "complex": complex,
                  "slice": slice, "bytearray": bytearray, "object": object}


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class Inert:
    """Stands for an object of a class the checkpoint names but flm_rt does not import. Holds data only."""

    _global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.list = args, kwargs, None, {}, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.list.append(value)

    def extend(self, values):
        self.list.extend(values)

    def __repr__(self):
        return f"<inert {self._global_name}>"


def _is_refused(module: str) -> bool:
    root = module.split(".")[0]
    return module in _REFUSED_MODULES or root in _REFUSED_MODULES


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    if not isinstance(storage, torch.Tensor):
        raise CheckpointError("corrupt checkpoint: a tensor refers to something that is not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or storage_offset < 0:
        raise CheckpointError(f"corrupt checkpoint: invalid tensor geometry size={size} stride={stride}")
    if all(s > 0 for s in size):
        extent = storage_offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1
        if extent > storage.numel():
            raise CheckpointError(
                f"corrupt or truncated checkpoint: a tensor of size {size} needs {extent} elements but its storage "
                f"holds {storage.numel()}")
    return torch.as_strided(storage, size, stride, storage_offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


def _plain_dict(*args):  # defaultdict(factory) -> dict: the factory is never called
    return {}


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("collections", "defaultdict"): _plain_dict,
    ("torch", "Size"): tuple,
    ("torch", "device"): lambda *args: str(args[0]) if args else "cpu",
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, torch.Tensor] = {}
        self.inert_globals: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if _is_refused(module):
            raise UnsafeCheckpointError(
                f"checkpoint refers to '{module}.{name}', which can execute code; flm_rt refuses to load it. "
                "Only load checkpoints from sources you trust, or convert them with a trusted tool first.")
        self.inert_globals.add(f"{module}.{name}")
        return type(name, (Inert,), {"_global_name": f"{module}.{name}", "__module__": "flm_rt.safe_pickle"})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"corrupt checkpoint: unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid[:5]
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else None
        if dtype is None:
            raise CheckpointError(f"corrupt checkpoint: unknown storage type {storage_type!r:.80}")
        key = str(key)
        if key not in self._storages:
            name = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(name)
            except KeyError:
                raise CheckpointError(f"corrupt or truncated checkpoint: storage '{name}' is missing") from None
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise CheckpointError(f"corrupt or truncated checkpoint: cannot read '{name}': {e}") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) < int(numel) * itemsize or len(raw) % itemsize:
                raise CheckpointError(
                    f"corrupt or truncated checkpoint: storage '{name}' has {len(raw)} bytes, "
                    f"expected {int(numel) * itemsize}")
            buf = bytearray(raw)
            self._storages[key] = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return self._storages[key]


def read_torch_zip(path: str) -> tuple[Any, set[str]]:
    """Read a torch.save zip archive without executing anything in it. Returns (object, inert global names)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise CheckpointError(
            f"{path}: not a PyTorch zip checkpoint (corrupt, truncated, or the legacy pre-1.6 format, "
            "which flm_rt does not read)") from None
    with archive:
        pkls = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: zip archive without exactly one '<name>/data.pkl'; not a torch checkpoint")
        prefix = pkls[0][: -len("data.pkl")]
        try:
            data = archive.read(pkls[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: corrupt checkpoint, cannot read its pickle: {e}") from None
        up = _Unpickler(data, archive, prefix)
        try:
            obj = up.load()
        except (UnsafeCheckpointError, CheckpointError):
            raise
        except Exception as e:  # malformed pickle streams raise many kinds of errors
            raise CheckpointError(f"{path}: corrupt checkpoint pickle ({type(e).__name__}: {e})") from None
        return obj, up.inert_globals


def inert_to_plain(obj: Any, _depth: int = 0) -> Any:
    """Turn an inert OmegaConf DictConfig/ListConfig (and its nodes) into plain dicts/lists/values."""
    if _depth > 64:
        return None
    if isinstance(obj, Inert):
        st = obj.state
        if isinstance(st, dict) and "_content" in st:
            return inert_to_plain(st["_content"], _depth + 1)
        if isinstance(st, dict) and "_val" in st:
            return inert_to_plain(st["_val"], _depth + 1)
        return obj
    if isinstance(obj, dict):
        return {k: inert_to_plain(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [inert_to_plain(v, _depth + 1) for v in obj]
    return obj
