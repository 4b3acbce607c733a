"""Read and write PyTorch zip checkpoints without torch and without running pickled code.

Reading: a restricted unpickler that resolves only the globals a checkpoint needs (tensor rebuild,
storage types, OrderedDict, argparse.Namespace as plain data, bytes) to our own harmless stand-ins. Any other
global becomes an inert placeholder (:class:`Inert`): nothing of it is imported, constructed or called, and its
arguments and state are dropped, so a training checkpoint's logs (mmengine's ``HistoryBuffer``, numpy scalars)
read without running anything; a reader then refuses a placeholder wherever weights are expected. Globals
that can only mean running code (``os``, ``subprocess``, ``builtins``, ``torch``'s loaders...) are refused by
name wherever they appear. Storages are mapped from the file (torch stores them uncompressed),
so tensors are numpy views of the file and nothing is copied.

Writing: the pickle is emitted opcode by opcode (it only ever holds dicts, plain values and tensor
references), then every storage is streamed into its own aligned, uncompressed zip entry, as
``torch.save`` does. Deterministic: fixed timestamps, fixed storage keys, no serialization id.
"""

from __future__ import annotations

import bisect
import collections
import io
import math
import mmap
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.inert import inert_attribute, inert_class, is_code_module
from convnextv2.converters.streaming import TensorStreamer, write_array_bytes
from convnextv2.reference.errors import BadInputError, UnsafeCheckpointError

# data.pkl of a real checkpoint (with optimizer state) is a few MB; bound it before reading it.
MAX_PICKLE_BYTES = 256 * 1024 * 1024
# Plain data in a checkpoint (epoch, args, optimizer hyper-parameters) is a shallow tree of modest size.
MAX_NESTING = 100
MAX_PLAIN_NODES = 1_000_000
MAX_TENSOR_DIMS = 32
STORAGE_ALIGNMENT = 64
ZIP_MAGIC = b"PK\x03\x04"
# Legacy (pre-1.6) torch files start with a pickled magic number, protocol 2.
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _bfloat16() -> np.dtype[Any]:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


# torch storage class name -> numpy dtype string
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "bf16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


def _storage_name_for(dtype: np.dtype[Any]) -> str:
    if dtype.name == "bfloat16":
        return "BFloat16Storage"
    for name, code in STORAGE_DTYPES.items():
        if code != "bf16" and np.dtype(code) == dtype.newbyteorder("="):
            return name
    raise BadInputError(f"dtype {dtype} has no torch storage type")


class StorageType:
    """Stands in for ``torch.FloatStorage`` etc.: only says which dtype the bytes hold."""

    def __init__(self, name: str):
        self.name = name

    @property
    def dtype(self) -> np.dtype[Any]:
        # Resolved when a storage is read: ml_dtypes (bfloat16) costs about a second to import, which every
        # command would pay at start-up through the table of allowed globals.
        code = STORAGE_DTYPES[self.name]
        return _bfloat16() if code == "bf16" else np.dtype(code)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class Storage:
    def __init__(self, array: np.ndarray, key: str):
        self.array = array
        self.key = key


class PickledNamespace(dict):  # type: ignore[type-arg]
    """``argparse.Namespace`` read as plain data: a dict that also allows attribute access."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafeCheckpointError("argparse.Namespace state must be a dict")
        self.update(state)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _encode_latin1(text: Any, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1"); no other codec is ever needed.
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin-1")


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       hooks: Any = None, metadata: Any = None) -> np.ndarray:
    if not isinstance(storage, Storage):
        raise UnsafeCheckpointError("tensor rebuild got something other than a storage")
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) <= MAX_TENSOR_DIMS
            and all(isinstance(v, int) and v >= 0 for v in size + stride) and offset >= 0):
        raise BadInputError(
            f"tensor in storage {storage.key}: invalid offset/size/stride {offset}/{size!r:.100}/{stride!r:.100}"
        )
    data = storage.array
    if math.prod(size) == 0:
        return np.zeros(size, dtype=data.dtype)
    extent = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True)) + 1
    if extent > data.size:
        raise BadInputError(
            f"tensor of size {list(size)} in storage {storage.key} needs {extent} elements, storage has {data.size}"
        )
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=tuple(st * item for st in stride), writeable=False
    )
    return view


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, *rest: Any) -> Any:
    if not isinstance(data, np.ndarray):
        raise UnsafeCheckpointError("parameter rebuild got something other than a tensor")
    return data


def _ordered_dict(*args: Any) -> collections.OrderedDict[Any, Any]:
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple, dict))):
        raise UnsafeCheckpointError("OrderedDict called with unexpected arguments")
    return collections.OrderedDict(*args)


# (module, name) -> the harmless object used in its place. Everything else is refused.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("argparse", "Namespace"): PickledNamespace,
    ("_codecs", "encode"): _encode_latin1,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    # Protocol-2 pickles name a method as getattr(Class, "name"): answered only on a placeholder (inert.py).
    ("builtins", "getattr"): inert_attribute,
    ("__builtin__", "getattr"): inert_attribute,
}
for _name in STORAGE_DTYPES:
    _ALLOWED[("torch", _name)] = StorageType(_name)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str, load_storage: Callable[[StorageType, str, int], Storage]):
        super().__init__(io.BytesIO(data))
        self.where = where
        self.load_storage = load_storage
        self.storages: dict[str, Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if is_code_module(module):
            raise UnsafeCheckpointError(
                f"{self.where}: refusing pickled global {module}.{name}: it could run code. Only tensors and "
                "plain data are read; nothing was executed"
            )
        return inert_class(module, name)

    def persistent_load(self, pid: Any) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise BadInputError(f"{self.where}: unexpected persistent id {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            self.storages[key] = self.load_storage(storage_type, key, numel)
        storage = self.storages[key]
        if storage.array.dtype != storage_type.dtype:
            raise BadInputError(f"{self.where}: storage {key} is used with two dtypes")
        return storage


def is_torch_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != ZIP_MAGIC:
                return False
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in archive.namelist())
    except Exception:  # noqa: BLE001 - a sniffer answers no, whatever zipfile makes of a damaged archive
        return False


def is_legacy_torch(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC
    except OSError:
        return False


def _check_entry_names(names: list[str], where: str) -> None:
    # Nothing is ever extracted, but a name that would escape a directory marks a crafted archive: refuse it
    # rather than guess what its maker meant.
    for name in names:
        parts = name.rstrip("/").split("/")
        if (name.startswith("/") or "\\" in name or "\x00" in name or ":" in parts[0]
                or any(part in ("", ".", "..") for part in parts)):
            raise BadInputError(f"{where}: unsafe entry name {name!r} in the archive (absolute or '..' path)")


def _check_object_graph(root: Any, where: str) -> None:
    """Refuse pickled plain data that is cyclic, deeper than MAX_NESTING, or huge once expanded.

    The unpickler's memo lets a few bytes describe an object that refers to itself or that shares one
    list at every level (2**60 leaves once copied): whatever turns the data into JSON or prints it would
    loop forever or exhaust memory. Checkpoints hold trees of plain data; sizes are memoised, so this walk
    costs one visit per distinct container.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def visit(obj: Any, depth: int) -> int:
        if not isinstance(obj, (dict, list, tuple, set, frozenset)):
            return 1
        key = id(obj)
        if key in active:
            raise BadInputError(f"{where}: the pickled data refers to itself; a checkpoint holds plain data only")
        if key in sizes:
            return sizes[key]
        if depth > MAX_NESTING:
            raise BadInputError(f"{where}: data.pkl nests too deeply (over {MAX_NESTING} levels)")
        active.add(key)
        children: Iterable[Any] = (
            (item for pair in obj.items() for item in pair) if isinstance(obj, dict) else obj
        )
        total = 1
        for child in children:
            total += visit(child, depth + 1)
            if total > MAX_PLAIN_NODES:
                raise BadInputError(
                    f"{where}: the pickled data is too large once expanded (over {MAX_PLAIN_NODES:,} values)"
                )
        active.discard(key)
        sizes[key] = total
        return total

    visit(root, 0)


_MEMO_OPCODES = {"PUT", "GET", "BINPUT", "BINGET", "LONG_BINPUT", "LONG_BINGET"}


def _prescan_pickle(pickled: bytes, where: str) -> None:
    """Walk the opcodes before the C unpickler sees them, refusing what makes it allocate by declaration.

    The C unpickler grows its memo to the largest index a PUT names (LONG_BINPUT 774972275 asks for 6 GB)
    and allocates a BINBYTES8/BINUNICODE8 buffer of the declared length before reading it. A memo index can
    never legitimately exceed the number of opcodes, and ``genops`` checks every declared length against the
    bytes that remain, without allocating them.
    """
    import pickletools

    try:
        for opcode, argument, _position in pickletools.genops(pickled):
            if opcode.name in _MEMO_OPCODES and isinstance(argument, int) and not 0 <= argument <= len(pickled):
                raise BadInputError(f"{where}: data.pkl uses memo slot {argument}, beyond its own size")
    except BadInputError:
        raise
    except Exception as exc:  # genops raises ValueError and friends on truncated or malformed opcodes
        raise BadInputError(f"{where}: data.pkl is not a valid checkpoint pickle ({type(exc).__name__}: {exc})") from None


def read_torch_zip(path: str | os.PathLike[str]) -> Any:
    """Unpickle a torch zip checkpoint safely; tensors come back as read-only numpy views of the file."""
    path = Path(path)
    where = str(path)
    with open(path, "rb") as handle:
        head = handle.read(len(LEGACY_MAGIC))
    if head.startswith(LEGACY_MAGIC[:2]) and head == LEGACY_MAGIC:
        raise BadInputError(
            f"{where} is a legacy (pre-1.6) torch checkpoint, which this toolkit does not read. Re-save it in the "
            "zip format with torch>=1.6: python -c \"import torch; "
            "torch.save(torch.load('OLD.pt', weights_only=True), 'NEW.pt')\""
        )
    if not head.startswith(ZIP_MAGIC):
        raise BadInputError(f"{where} is not a torch zip checkpoint (starts with {head[:4]!r})")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise BadInputError(f"{where}: broken zip archive ({exc}); the file may be truncated") from None
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    buffer = memoryview(mapped)
    with archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        if len(names) != len(set(names)):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise BadInputError(f"{where}: zip archive has duplicate entries {dup[:5]}")
        _check_entry_names(names, where)
        # Each entry's bytes must end before the next entry (or the central directory) begins: a size that
        # claims more would read another entry's bytes as tensor data.
        central_start = min(int(getattr(archive, "start_dir", file_size)), file_size)
        boundaries = sorted({i.header_offset for i in infos} | {central_start})
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise BadInputError(f"{where}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        by_name = {i.filename: i for i in infos}

        def entry_bytes(info: zipfile.ZipInfo, declared: int) -> memoryview:
            """The raw bytes of an uncompressed entry, after checking they lie where the archive says."""
            if info.compress_type != zipfile.ZIP_STORED:
                raise BadInputError(
                    f"{where}: entry {info.filename} is compressed; torch checkpoints store every entry raw"
                )
            if info.file_size != declared or info.compress_size != declared:
                raise BadInputError(
                    f"{where}: entry {info.filename} should hold {declared} bytes, the archive says {info.file_size}"
                )
            local = bytes(buffer[info.header_offset: info.header_offset + 30])
            if len(local) < 30 or local[:4] != ZIP_MAGIC:
                raise BadInputError(f"{where}: zip local header of {info.filename} is damaged")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            if start + declared > file_size:
                raise BadInputError(
                    f"{where}: entry {info.filename} runs past the end of the file; the file is truncated"
                )
            limit = boundaries[bisect.bisect_right(boundaries, info.header_offset)] \
                if info.header_offset < boundaries[-1] else file_size
            if start + declared > limit:
                raise BadInputError(
                    f"{where}: entry {info.filename} claims {declared} bytes, which overlaps the next entry"
                )
            return buffer[start: start + declared]

        byteorder = "little"
        if f"{prefix}byteorder" in by_name:
            info = by_name[f"{prefix}byteorder"]
            if info.file_size > 16:
                raise BadInputError(f"{where}: byteorder record of {info.file_size} bytes; expected 'little' or 'big'")
            byteorder = bytes(entry_bytes(info, info.file_size)).decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise BadInputError(f"{where}: unknown byteorder record {byteorder!r}")
        pkl_info = by_name[pickles[0]]
        if pkl_info.file_size > MAX_PICKLE_BYTES:
            raise BadInputError(f"{where}: data.pkl declares {pkl_info.file_size} bytes, over the {MAX_PICKLE_BYTES} limit")
        pickled = bytes(entry_bytes(pkl_info, pkl_info.file_size))

    def load_storage(storage_type: StorageType, key: str, numel: int) -> Storage:
        entry = f"{prefix}data/{key}"
        info = by_name.get(entry)
        if info is None:
            raise BadInputError(f"{where}: storage entry {entry} is missing from the archive")
        dtype = storage_type.dtype if byteorder == "little" else storage_type.dtype.newbyteorder(">")
        if numel < 0:
            raise BadInputError(f"{where}: storage {entry} has a negative size {numel}")
        array = np.frombuffer(entry_bytes(info, numel * dtype.itemsize), dtype=dtype)
        if byteorder == "big":
            array = array.astype(dtype.newbyteorder("<"))
        return Storage(array, key)

    _prescan_pickle(pickled, where)
    unpickler = _RestrictedUnpickler(pickled, where, load_storage)
    try:
        loaded = unpickler.load()
    except BadInputError as exc:
        if where in str(exc):
            raise
        # The rebuild helpers do not know the file's name.
        kind = UnsafeCheckpointError if isinstance(exc, UnsafeCheckpointError) else BadInputError
        raise kind(f"{where}: {exc}") from None
    except RecursionError:
        raise BadInputError(f"{where}: data.pkl nests too deeply") from None
    except Exception as exc:  # the C unpickler raises many types on malformed input
        raise BadInputError(f"{where}: data.pkl is not a valid checkpoint pickle ({type(exc).__name__}: {exc})") from None
    _check_object_graph(loaded, where)
    return loaded


# ---------------------------------------------------------------- writing


class _PickleWriter:
    """Emits protocol-2 opcodes for dicts, lists, tuples, plain values, namespaces and tensors."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.storages: list[np.ndarray] = []

    def _global(self, module: str, name: str) -> None:
        self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def _int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out.write(b"K" + struct.pack("<B", value))
        elif 0 <= value < 65536:
            self.out.write(b"M" + struct.pack("<H", value))
        elif -(2**31) <= value < 2**31:
            self.out.write(b"J" + struct.pack("<i", value))
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out.write(b"\x8a" + struct.pack("<B", len(raw)) + raw)

    def _str(self, value: str) -> None:
        raw = value.encode("utf-8", "surrogatepass")
        self.out.write(b"X" + struct.pack("<I", len(raw)) + raw)

    def _tuple(self, values: Iterable[Any]) -> None:
        self.out.write(b"(")
        for v in values:
            self.save(v)
        self.out.write(b"t")

    def _tensor(self, array: np.ndarray) -> None:
        key = str(len(self.storages))
        self.storages.append(array)
        shape = tuple(int(s) for s in array.shape)
        strides, running = [], 1
        for dim in reversed(shape):
            strides.append(running)
            running *= max(dim, 1)
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out.write(b"(")
        self.out.write(b"(")
        self._str("storage")
        self._global("torch", _storage_name_for(array.dtype))
        self._str(key)
        self._str("cpu")
        self._int(int(array.size))
        self.out.write(b"tQ")
        self._int(0)
        self._tuple(shape)
        self._tuple(tuple(reversed(strides)))
        self.out.write(b"\x89")
        self._global("collections", "OrderedDict")
        self.out.write(b")R")
        self.out.write(b"tR")

    def _dict_items(self, mapping: Mapping[Any, Any]) -> None:
        if mapping:
            self.out.write(b"(")
            for k, v in mapping.items():
                self.save(k)
                self.save(v)
            self.out.write(b"u")

    def save(self, obj: Any) -> None:
        if isinstance(obj, np.ndarray):
            self._tensor(obj)
        elif obj is None:
            self.out.write(b"N")
        elif obj is True:
            self.out.write(b"\x88")
        elif obj is False:
            self.out.write(b"\x89")
        elif isinstance(obj, int):
            self._int(obj)
        elif isinstance(obj, float):
            self.out.write(b"G" + struct.pack(">d", obj))
        elif isinstance(obj, str):
            self._str(obj)
        elif isinstance(obj, bytes):
            self._global("_codecs", "encode")
            self._str(obj.decode("latin-1"))
            self._str("latin1")
            self.out.write(b"\x86R")
        elif isinstance(obj, PickledNamespace):
            self._global("argparse", "Namespace")
            self.out.write(b")\x81}")
            self._dict_items(dict(obj))
            self.out.write(b"b")
        elif isinstance(obj, collections.OrderedDict):
            self._global("collections", "OrderedDict")
            self.out.write(b")R")
            self._dict_items(obj)
        elif isinstance(obj, dict):
            self.out.write(b"}")
            self._dict_items(obj)
        elif isinstance(obj, list):
            self.out.write(b"]")
            if obj:
                self.out.write(b"(")
                for v in obj:
                    self.save(v)
                self.out.write(b"e")
        elif isinstance(obj, tuple):
            self._tuple(obj)
        else:
            raise BadInputError(f"cannot write a {type(obj).__name__} into a torch checkpoint")

    def finish(self) -> bytes:
        return b"\x80\x02" + self.out.getvalue() + b"."


def _aligned_info(archive: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o600 << 16
    info.create_system = 3
    info.file_size = size
    # Pad the local header's extra field so the data starts on a STORAGE_ALIGNMENT boundary, as torch does,
    # so that torch.load(mmap=True) and our reader map aligned storages.
    offset = archive.fp.tell() if archive.fp is not None else 0
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    base = offset + 30 + len(name.encode()) + (20 if zip64 else 0)
    pad = (-(base + 4)) % STORAGE_ALIGNMENT
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
    return info


def write_torch_zip(path: str | os.PathLike[str], obj: Any, archive_name: str = "archive", progress: Any = None) -> None:
    """Write ``obj`` (dicts/plain values with numpy arrays as tensors) as a torch zip checkpoint.

    Arrays are streamed one at a time from wherever they live (e.g. mapped from the source file).
    ``path`` should be a temporary path (see ``atomic_file``).
    """
    writer = _PickleWriter()
    writer.save(obj)
    pickled = writer.finish()
    records: list[tuple[str, bytes | np.ndarray]] = [
        ("data.pkl", pickled),
        (".format_version", b"1"),
        (".storage_alignment", str(STORAGE_ALIGNMENT).encode()),
        ("byteorder", b"little"),
    ]
    records += [(f"data/{i}", array) for i, array in enumerate(writer.storages)]
    records.append(("version", b"3\n"))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        # One streamer for every entry: it reads mapped source tensors through a single reused buffer (zip
        # needs the bytes for each entry's CRC), so memory stays flat whatever the checkpoint's size.
        streamer = TensorStreamer(None, kernel_copy=False)
        with streamer:
            for name, payload in records:
                size = len(payload) if isinstance(payload, bytes) else int(payload.size) * payload.dtype.itemsize
                info = _aligned_info(archive, f"{archive_name}/{name}", size)
                with archive.open(info, "w", force_zip64=size * 1.05 > zipfile.ZIP64_LIMIT) as entry:
                    if isinstance(payload, bytes):
                        entry.write(payload)
                    else:
                        streamer.out = entry
                        write_array_bytes(streamer, payload)
                        if progress is not None:
                            progress.update(size)
