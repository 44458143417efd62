"""A restricted reader for PyTorch/Lightning ``.ckpt`` files: checkpoints are untrusted input.

The file is a zip archive holding ``<name>/data.pkl`` (a pickle) and raw tensor storages ``<name>/data/<key>``.
The pickle is read by an Unpickler that never imports or calls anything the file names, except:

* tensor reconstruction (``torch._utils._rebuild_tensor_v2`` and friends): it yields a :class:`LazyTensor`, a
  checked description (storage member, dtype, offset, size, stride) whose bytes are read only when the loader
  asks for them (:meth:`TorchZip.tensor`), after the memory the model needs has been checked;
* plain containers (dict, list, tuple, set, OrderedDict, defaultdict-as-dict) and torch dtypes/sizes, through
  constructors that accept plain data only (``bytearray(2**40)`` is refused, not allocated).

Any other global is replaced by an inert placeholder class (:class:`Inert`): "calling" it only records its
arguments, so a pickled OmegaConf config or tokenizer becomes plain data that can be inspected. Globals that only
make sense as code execution (``os.system``, ``builtins.eval``, ``subprocess.*``, ...) are refused with
:class:`UnsafeCheckpointError`, judged after resolving pickle's Python 2 compatibility aliases
(``commands.Popen`` is ``subprocess.Popen``).

Safe by construction: the pure-Python unpickler runs with every opcode counted (object and memo limits), the
nesting depth and expanded size of every container tracked as it is built (deep or exponentially shared tuples
are refused before anything hashes or prints them; the interpreter's recursion limit is never relied on), BUILD
only on inert objects (never on the functions and classes handed out for globals), SETITEM/APPEND only on plain
containers. Limits: :class:`flm_rt.limits.Limits`.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import struct
import zipfile
from typing import Any, Optional

import torch

from .errors import CheckpointError, UnsafeCheckpointError
from .limits import DEFAULT_LIMITS, Limits, brief, gib, open_regular

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
    "numpy.testing", "commands", "popen2", "posixpath", "ntpath", "io", "_io", "copyreg", "copy_reg", "_thread",
    "threading", "gc", "weakref", "tempfile", "glob", "pathlib", "zipimport", "pkgutil", "_posixsubprocess",
}
_MAX_TENSOR_DIMS = 16
_MAX_INERT_CLASSES = 10_000  # a real checkpoint names a few dozen (OmegaConf, tokenizer)


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


class StorageRef:
    """One ``data/<key>`` member of the archive, checked against its declared size but not read."""

    __slots__ = ("name", "dtype", "numel")

    def __init__(self, name: str, dtype: torch.dtype, numel: int):
        self.name, self.dtype, self.numel = name, dtype, numel

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


class LazyTensor:
    """A tensor described by the checkpoint: geometry checked (in bounds, no element stored twice); read later."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: StorageRef, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, torch.Size(shape), stride

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __repr__(self):
        return f"<LazyTensor {tuple(self.shape)} {self.dtype} in {self.storage.name}>"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _is_refused(module: str) -> bool:
    root = module.split(".")[0]
    return module in _REFUSED_MODULES or root in _REFUSED_MODULES


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > _MAX_TENSOR_DIMS:
        raise CheckpointError(f"corrupt checkpoint: tensor {what} is {brief(value)}, not a short list of ints")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62 for v in value):
        raise CheckpointError(f"corrupt checkpoint: tensor {what} {brief(value)} holds a non-int or negative entry")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    if not isinstance(storage, StorageRef):
        raise CheckpointError("corrupt checkpoint: a tensor refers to something that is not a storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride) or isinstance(storage_offset, bool) or not isinstance(storage_offset, int) \
            or storage_offset < 0:
        raise CheckpointError(f"corrupt checkpoint: invalid tensor geometry size={size} stride={stride}")
    numel = 1
    for n in size:
        numel *= n
    if numel:
        # No element may be stored twice (stride-0 or overlapping views would let a small file describe a huge
        # model): with the dims of size > 1 sorted by stride, each stride must step past the previous dims' extent.
        span = 1
        for n, st in sorted(((n, st) for n, st in zip(size, stride) if n > 1), key=lambda p: p[1]):
            if st < span:
                raise CheckpointError(f"corrupt or hostile checkpoint: a tensor of size {size} with stride {stride} "
                                      "stores some elements more than once")
            span = st * n
        extent = storage_offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1
        if extent > storage.numel:
            raise CheckpointError(
                f"corrupt or truncated checkpoint: a tensor of size {size} needs {extent} elements but its storage "
                f"holds {storage.numel}")
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray)
_CONTAINERS = (list, tuple, dict, set, frozenset)


def _plain_ctor(kind: type, max_args: int, container_arg: bool, byte_like: bool = False):
    """``kind(*args)`` for plain data only: scalars, or (container_arg) one existing container to copy shallowly.
    Never an int size for bytes/bytearray, never a tensor or an inert object (whose iteration could be huge)."""
    def make(*args):
        if len(args) > max_args:
            raise CheckpointError(f"corrupt checkpoint: {kind.__name__}() with {len(args)} arguments")
        for a in args:
            ok = isinstance(a, _SCALARS) or (container_arg and isinstance(a, _CONTAINERS))
            if not ok or (byte_like and isinstance(a, int)):
                raise CheckpointError(f"corrupt or hostile checkpoint: {kind.__name__}({brief(a)}) refused")
        return kind(*args)
    make.__name__ = f"plain_{kind.__name__}"
    return make


_SAFE_BUILTINS = {
    "dict": _plain_ctor(dict, 1, True), "list": _plain_ctor(list, 1, True), "tuple": _plain_ctor(tuple, 1, True),
    "set": _plain_ctor(set, 1, True), "frozenset": _plain_ctor(frozenset, 1, True),
    "int": _plain_ctor(int, 2, False), "float": _plain_ctor(float, 1, False), "str": _plain_ctor(str, 3, False),
    "bool": _plain_ctor(bool, 1, False), "complex": _plain_ctor(complex, 2, False),
    "slice": _plain_ctor(slice, 3, False), "object": _plain_ctor(object, 0, False),
    "bytes": _plain_ctor(bytes, 3, True, byte_like=True), "bytearray": _plain_ctor(bytearray, 3, True, byte_like=True),
}
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): _plain_ctor(collections.OrderedDict, 1, True),
    ("collections", "defaultdict"): lambda *args: {},  # defaultdict(factory) -> dict: the factory is never called
    ("torch", "Size"): _SAFE_BUILTINS["tuple"],
    ("torch", "device"): lambda *args: args[0] if args and isinstance(args[0], str) else "cpu",
}
_CALLABLES = frozenset(map(id, [*_SAFE_BUILTINS.values(), *_ALLOWED.values()]))


def resolve_alias(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name pickle itself would import for a (possibly Python 2) name, e.g. commands.Popen."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


_OP = {name: getattr(pickle, name)[0] for name in (
    "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE", "LIST", "EMPTY_LIST", "DICT", "EMPTY_DICT", "EMPTY_SET",
    "FROZENSET", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ",
    "INST", "BUILD", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "BYTEARRAY8")}


class _Unpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler with each opcode counted and checked (see the module docstring)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, limits: Limits):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._limits = archive, prefix, limits
        self._size = len(data)
        self._storages: dict[str, StorageRef] = {}
        self._ops = 0
        # id -> (depth, expanded size, object): kept alive so that ids are never reused while reading
        self._shape: dict[int, tuple[int, int, Any]] = {}
        self._globals: set[int] = set()
        self._inert_classes: dict[str, type] = {}
        self.inert_globals: set[str] = set()

    def load(self):
        """pickle._Unpickler.load with every opcode counted (the loop is the base class's, plus the counter)."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)
        self.read, self.readinto, self.readline = self._unframer.read, self._unframer.readinto, self._unframer.readline
        self.metastack, self.stack, self.proto = [], [], 0
        self.append = self.stack.append
        read, dispatch, limit = self.read, self.dispatch, self._limits.max_pickle_objects
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                self._ops += 1
                if self._ops > limit:
                    self._count(0)
                dispatch[key[0]](self)
        except pickle._Stop as stop:
            return stop.value

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _measure(self, obj) -> tuple[int, int]:
        entry = self._shape.get(id(obj))
        return (entry[0], entry[1]) if entry is not None else (0, 1)

    def _record(self, obj, children, base: tuple[int, int] = (0, 1)) -> None:
        depth, size = base
        for c in children:
            d, s = self._measure(c)
            depth = max(depth, d + 1)
            size += s
        if depth > self._limits.max_depth:
            raise CheckpointError(f"hostile or corrupt checkpoint: data nested deeper than {self._limits.max_depth}")
        cap = self._limits.max_pickle_objects
        if size > cap and isinstance(obj, (tuple, frozenset)):  # hashing or comparing it would take that long
            raise CheckpointError("hostile or corrupt checkpoint: a tuple expands to more than "
                                  f"{cap} objects (shared references)")
        self._shape[id(obj)] = (depth, min(size, cap + 1), obj)

    @staticmethod
    def _children(obj):
        if isinstance(obj, dict):
            return [*obj.keys(), *obj.values()]
        if isinstance(obj, (tuple, list, set, frozenset)):
            return list(obj)
        return ()

    def _count(self, n: int = 1) -> None:
        self._ops += n
        if self._ops > self._limits.max_pickle_objects:
            raise CheckpointError(f"hostile or corrupt checkpoint: its pickle creates more than "
                                  f"{self._limits.max_pickle_objects} objects")

    # -- opcode wrappers ------------------------------------------------------------------------------
    @staticmethod
    def _new_container(op):  # -> a dispatch entry
        base = pickle._Unpickler.dispatch[op]

        def run(self):
            base(self)
            obj = self.stack[-1]
            if len(obj):  # an empty one is depth 1, size 1 when looked up: no record (a flood of them stays cheap)
                self._count(len(obj))
                self._record(obj, self._children(obj), (1, 1))
        return run

    @staticmethod
    def _fill(op, kinds, mark: bool, n_pop: int = 0):  # -> a dispatch entry
        base = pickle._Unpickler.dispatch[op]

        def run(self):
            if mark:
                target, children = self.metastack[-1][-1], list(self.stack)
            else:
                target, children = self.stack[-1 - n_pop], self.stack[len(self.stack) - n_pop:]
            if not isinstance(target, kinds) or id(target) in self._globals:
                raise CheckpointError(f"corrupt or hostile checkpoint: items added to a {type(target).__name__}")
            base(self)
            self._record(target, children, self._measure(target))
        return run

    @staticmethod
    def _call(op, where: int, mark: bool = False):  # -> a dispatch entry
        """REDUCE / NEWOBJ / NEWOBJ_EX / OBJ: the callable must be one flm_rt hands out or an inert class."""
        base = pickle._Unpickler.dispatch[op]

        def run(self):
            if mark:
                items = self.stack
                func, args = (items[0] if items else None), items[1:]
            else:
                func, args = self.stack[where], self.stack[where + 1:]
            inert_class = isinstance(func, type) and issubclass(func, Inert)
            if not inert_class and (op in (_OP["NEWOBJ"], _OP["NEWOBJ_EX"]) or id(func) not in _CALLABLES):
                raise CheckpointError(f"corrupt or hostile checkpoint: it calls {brief(func)}, which is not a "
                                      "constructor flm_rt allows")
            base(self)
            obj = self.stack[-1]
            if isinstance(obj, _CONTAINERS):
                self._count(len(obj))
            self._record(obj, args, (1, 1))
        return run

    def _load_inst(self):
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        klass = self.find_class(module, name)
        args = self.pop_mark()
        if not (isinstance(klass, type) and issubclass(klass, Inert)) and id(klass) not in _CALLABLES:
            raise CheckpointError(f"corrupt or hostile checkpoint: it calls {brief(klass)}, which is not a "
                                  "constructor flm_rt allows")
        self._instantiate(klass, args)
        self._record(self.stack[-1], args, (1, 1))

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Inert):
            inst.__setstate__(state)
            self._record(inst, [state], self._measure(inst))
        elif isinstance(inst, dict) and id(inst) not in self._globals:
            pass  # an OrderedDict's attributes (a state dict's _metadata): not needed, dropped
        else:
            raise CheckpointError(f"corrupt or hostile checkpoint: it sets the state of {brief(inst)}")

    @staticmethod
    def _memo_checked(op):  # -> a dispatch entry
        base = pickle._Unpickler.dispatch[op]

        def run(self):
            base(self)
            if len(self.memo) > self._limits.max_pickle_memo:
                raise CheckpointError(f"hostile or corrupt checkpoint: pickle memo above {self._limits.max_pickle_memo}")
        return run

    def _load_bytearray8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self._size:
            raise CheckpointError(f"corrupt checkpoint: a {n}-byte array in a {self._size}-byte pickle")
        self.append(bytearray(self.read(n)))

    # -- globals and storages -------------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        real_module, real_name = resolve_alias(module, name)
        for mod, nm in {(module, name), (real_module, real_name)}:
            if (mod, nm) in _ALLOWED:
                return self._global(_ALLOWED[(mod, nm)])
            if mod in ("builtins", "__builtin__") and nm in _SAFE_BUILTINS:
                return self._global(_SAFE_BUILTINS[nm])
            if mod == "torch" and nm in _STORAGE_DTYPES:
                return self._global(_StorageType(_STORAGE_DTYPES[nm]))
            if mod == "torch" and isinstance(getattr(torch, nm, None), torch.dtype):
                return getattr(torch, nm)
        if _is_refused(module) or _is_refused(real_module):
            shown = f"{module}.{name}" + (f" (that is, {real_module}.{real_name})"
                                         if (real_module, real_name) != (module, name) else "")
            raise UnsafeCheckpointError(
                f"checkpoint refers to '{shown[:200]}', which can execute code; flm_rt refuses to load it. "
                "Only load checkpoints from sources you trust, or convert them with a trusted tool first.")
        full = f"{real_module}.{real_name}"[:200]
        cls = self._inert_classes.get(full)
        if cls is None:
            if len(self._inert_classes) >= _MAX_INERT_CLASSES:
                raise CheckpointError(f"hostile or corrupt checkpoint: it names more than {_MAX_INERT_CLASSES} "
                                      "different classes")
            cls = self._inert_classes[full] = self._global(
                type(real_name[:100] or "_", (Inert,), {"_global_name": full, "__module__": "flm_rt.safe_pickle"}))
            self.inert_globals.add(full)
        return cls

    def _global(self, obj):
        self._globals.add(id(obj))
        self._shape[id(obj)] = (0, 1, obj)
        return obj

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and isinstance(pid[0], str) and pid[0] == "storage"):
            raise CheckpointError(f"corrupt checkpoint: unknown persistent id {brief(pid)}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"corrupt checkpoint: unknown storage type {brief(storage_type)}")
        if not isinstance(key, (str, int)) or isinstance(key, bool) or len(str(key)) > 64:
            raise CheckpointError(f"corrupt checkpoint: invalid storage key {brief(key)}")
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"corrupt checkpoint: invalid storage size {brief(numel)}")
        key = str(key)
        ref = self._storages.get(key)
        if ref is None:
            name = f"{self._prefix}data/{key}"
            try:
                info = self._archive.getinfo(name)
            except KeyError:
                raise CheckpointError(f"corrupt or truncated checkpoint: storage '{name}' is missing") from None
            ref = StorageRef(name, storage_type.dtype, numel)
            if info.file_size != ref.nbytes:
                raise CheckpointError(f"corrupt or truncated checkpoint: storage '{name}' has {info.file_size} "
                                      f"bytes, expected {ref.nbytes}")
            _check_ratio(info, self._limits)
            self._storages[key] = ref
        elif ref.dtype != storage_type.dtype or ref.numel != numel:
            raise CheckpointError(f"corrupt checkpoint: storage '{ref.name}' is declared twice, differently")
        return ref


for _name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE", "LIST", "EMPTY_LIST", "DICT", "EMPTY_DICT",
              "EMPTY_SET", "FROZENSET"):
    _Unpickler.dispatch[_OP[_name]] = _Unpickler._new_container(_OP[_name])
_Unpickler.dispatch[_OP["APPEND"]] = _Unpickler._fill(_OP["APPEND"], (list, Inert), False, 1)
_Unpickler.dispatch[_OP["APPENDS"]] = _Unpickler._fill(_OP["APPENDS"], (list, Inert), True)
_Unpickler.dispatch[_OP["SETITEM"]] = _Unpickler._fill(_OP["SETITEM"], (dict, Inert), False, 2)
_Unpickler.dispatch[_OP["SETITEMS"]] = _Unpickler._fill(_OP["SETITEMS"], (dict, Inert), True)
_Unpickler.dispatch[_OP["ADDITEMS"]] = _Unpickler._fill(_OP["ADDITEMS"], (set,), True)
_Unpickler.dispatch[_OP["REDUCE"]] = _Unpickler._call(_OP["REDUCE"], -2)
_Unpickler.dispatch[_OP["NEWOBJ"]] = _Unpickler._call(_OP["NEWOBJ"], -2)
_Unpickler.dispatch[_OP["NEWOBJ_EX"]] = _Unpickler._call(_OP["NEWOBJ_EX"], -3)
_Unpickler.dispatch[_OP["OBJ"]] = _Unpickler._call(_OP["OBJ"], 0, mark=True)
_Unpickler.dispatch[_OP["INST"]] = _Unpickler._load_inst
_Unpickler.dispatch[_OP["BUILD"]] = _Unpickler._load_build
_Unpickler.dispatch[_OP["BYTEARRAY8"]] = _Unpickler._load_bytearray8
for _name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
    _Unpickler.dispatch[_OP[_name]] = _Unpickler._memo_checked(_OP[_name])


def _check_ratio(info: zipfile.ZipInfo, limits: Limits) -> None:
    if info.compress_type != zipfile.ZIP_STORED and \
            info.file_size > limits.max_compression_ratio * max(info.compress_size, 1) + 4096:
        raise CheckpointError(f"hostile checkpoint: member '{info.filename}' inflates {info.compress_size} bytes to "
                              f"{info.file_size} (a zip bomb); torch.save stores members uncompressed")


class TorchZip:
    """An open ``.ckpt`` archive: :attr:`obj` is the unpickled object (tensors as :class:`LazyTensor`),
    :attr:`inert_globals` the classes read as inert data; :meth:`tensor` reads one tensor's bytes."""

    def __init__(self, path: str, limits: Limits = DEFAULT_LIMITS):
        self.path, self.limits = path, limits
        self._read: dict[str, torch.Tensor] = {}
        self.bytes_read = 0
        self.archive: Optional[zipfile.ZipFile] = None
        self._file = open_regular(path, "checkpoint")
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        path = self.path
        try:
            entries = zipfile._EndRecData(self._file)  # the entry count, before zipfile builds one object per entry
            if entries and entries[zipfile._ECD_ENTRIES_TOTAL] > self.limits.max_zip_entries:
                raise CheckpointError(f"{path}: zip archive with {entries[zipfile._ECD_ENTRIES_TOTAL]} members "
                                      f"(limit {self.limits.max_zip_entries}); not a torch checkpoint")
            self._file.seek(0)
            self.archive = zipfile.ZipFile(self._file)
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, IndexError, OverflowError):
            raise CheckpointError(
                f"{path}: not a PyTorch zip checkpoint (corrupt, truncated, or the legacy pre-1.6 format, "
                "which flm_rt does not read)") from None
        pkls = [n for n in self.archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: zip archive without exactly one '<name>/data.pkl'; not a torch checkpoint")
        info = self.archive.getinfo(pkls[0])
        if info.file_size > self.limits.max_pickle_bytes:
            raise CheckpointError(f"{path}: its pickle is {gib(info.file_size)}, above flm_rt's limit of "
                                  f"{gib(self.limits.max_pickle_bytes)}")
        try:
            _check_ratio(info, self.limits)
            data = self.archive.read(pkls[0])
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
            raise CheckpointError(f"{path}: corrupt checkpoint, cannot read its pickle: {e}") from None
        up = _Unpickler(data, self.archive, pkls[0][: -len("data.pkl")], self.limits)
        try:
            self.obj = up.load()
        except CheckpointError as e:
            raise type(e)(f"{path}: {e}") from None
        except Exception as e:  # malformed pickle streams raise many kinds of errors; MemoryError, RecursionError too
            raise CheckpointError(f"{path}: corrupt checkpoint pickle ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from None
        finally:
            up._shape.clear()
        self.inert_globals = up.inert_globals

    def tensor(self, lazy: LazyTensor) -> torch.Tensor:
        """Read ``lazy``'s storage (once per storage) and return the tensor, a view of it."""
        ref = lazy.storage
        buf = self._read.get(ref.name)
        if buf is None:
            buf = self._read_storage(ref)
            self._read[ref.name] = buf
        return torch.as_strided(buf, tuple(lazy.shape), lazy.stride, lazy.offset)

    def _read_storage(self, ref: StorageRef) -> torch.Tensor:
        size = ref.nbytes
        raw = bytearray(size)
        view = memoryview(raw)
        try:
            with self.archive.open(ref.name) as f:
                pos = 0
                while pos < size:
                    chunk = f.read(min(16 << 20, size - pos))
                    if not chunk:
                        break
                    view[pos:pos + len(chunk)] = chunk
                    pos += len(chunk)
                extra = f.read(1)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: corrupt or truncated checkpoint: cannot read '{ref.name}': "
                                  f"{e}") from None
        if pos != size or extra:
            raise CheckpointError(f"{self.path}: corrupt or truncated checkpoint: storage '{ref.name}' does not hold "
                                  f"the {size} bytes it declares")
        self.bytes_read += size
        if not size:
            return torch.empty(0, dtype=ref.dtype)
        return torch.frombuffer(raw, dtype=ref.dtype)

    def close(self) -> None:
        if getattr(self, "archive", None) is not None:
            self.archive.close()
        self._file.close()

    def __enter__(self) -> "TorchZip":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_torch_zip(path: str, limits: Limits = DEFAULT_LIMITS) -> tuple[Any, set[str]]:
    """Read a torch.save zip archive without executing anything; every tensor is read in full. Returns
    (object, inert global names). The loader uses :class:`TorchZip` directly, to read only what it needs."""
    with TorchZip(path, limits) as z:
        return _materialize(z, z.obj, {}), z.inert_globals


def _materialize(z: TorchZip, obj, done: dict, depth: int = 0):
    if isinstance(obj, LazyTensor):
        return z.tensor(obj)
    if not isinstance(obj, (dict, list)):
        return obj
    if id(obj) in done:
        return done[id(obj)]
    if depth > z.limits.max_depth:
        raise CheckpointError(f"{z.path}: data nested deeper than {z.limits.max_depth}")
    if isinstance(obj, dict):
        out = done[id(obj)] = type(obj)()
        out.update((k, _materialize(z, v, done, depth + 1)) for k, v in obj.items())
        return out
    out = done[id(obj)] = []
    out.extend(_materialize(z, v, done, depth + 1) for v in obj)
    return out


def inert_to_plain(obj: Any, source: str = "checkpoint", limits: Limits = DEFAULT_LIMITS) -> Any:
    """Turn an inert OmegaConf DictConfig/ListConfig (and its nodes) into plain dicts/lists/values.

    Each node is converted once (shared nodes stay shared, so a chain of shared lists costs its length, not
    2^length); a reference cycle, nesting deeper than ``limits.max_depth`` or more than
    ``limits.max_config_nodes`` nodes is refused with :class:`CheckpointError`."""
    done: dict[int, Any] = {}
    active: set[int] = set()
    budget = [limits.max_config_nodes]

    def unwrap(o):
        if isinstance(o, Inert):
            st = o.state
            if isinstance(st, dict) and "_content" in st:
                return st["_content"]
            if isinstance(st, dict) and "_val" in st:
                return st["_val"]
        return None

    def conv(o, depth: int):
        if not isinstance(o, (Inert, dict, list, tuple)):
            return o
        key = id(o)
        if key in done:
            return done[key]
        if key in active:
            raise CheckpointError(f"{source}: its config refers to itself (a reference cycle); not a valid config")
        if depth > limits.max_depth:
            raise CheckpointError(f"{source}: its config is nested deeper than {limits.max_depth} levels")
        budget[0] -= 1
        if budget[0] < 0:
            raise CheckpointError(f"{source}: its config has more than {limits.max_config_nodes} nodes")
        active.add(key)
        try:
            if isinstance(o, Inert):
                inner = unwrap(o)
                out = o if inner is None else conv(inner, depth + 1)
            elif isinstance(o, dict):
                out = {k: conv(v, depth + 1) for k, v in o.items()}
            else:
                out = [conv(v, depth + 1) for v in o]
        finally:
            active.discard(key)
        done[key] = out
        return out

    return conv(obj, 0)
