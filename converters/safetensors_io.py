"""A validating safetensors reader and a streaming, deterministic writer, both numpy-only.

Our own code rather than the ``safetensors`` package because (a) the package has no streaming writer
(facts §7), so a 2.6 GB conversion would hold every tensor in memory, and (b) the reader must reject
hostile headers with our own error types before anything is allocated. Tests check both directions
against the ``safetensors`` package.
"""

from __future__ import annotations

import dataclasses
import io
import json
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.reference.errors import BadInputError

# A header larger than this is not a model header; refuse before reading it (no allocation by declared size).
MAX_HEADER_BYTES = 100 * 1024 * 1024
HEADER_ALIGNMENT = 8
# numpy allows 64 dimensions; no model tensor has more than a handful.
MAX_TENSOR_DIMS = 32


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys silently; two readers could then see two different files.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BadInputError(f"duplicate key {key!r} in the JSON header")
        result[key] = value
    return result


def parse_json_text(text: bytes | str, what: str) -> Any:
    """``json.loads`` that fails with BadInputError only: duplicate keys, deep nesting, huge numbers."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_unique_keys)
    except BadInputError as exc:
        raise BadInputError(f"{what}: {exc}") from None
    except RecursionError:
        raise BadInputError(f"{what} nests too deeply to be a header") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError and int-digit limits are ValueErrors
        raise BadInputError(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def _bfloat16() -> np.dtype[Any]:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


_NUMPY_BY_CODE: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}


def dtype_from_code(code: str, where: str) -> np.dtype[Any]:
    if code == "BF16":
        return _bfloat16()
    try:
        return np.dtype(_NUMPY_BY_CODE[code])
    except KeyError:
        raise BadInputError(f"{where}: unsupported dtype {code!r}") from None


def code_from_dtype(dtype: np.dtype[Any]) -> str:
    if dtype.name == "bfloat16":
        return "BF16"
    normal = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    for code, text in _NUMPY_BY_CODE.items():
        if np.dtype(text) == normal:
            return code
    raise BadInputError(f"dtype {dtype} cannot be stored in safetensors")


def is_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= MAX_HEADER_BYTES and head[8:9] == b"{"


def read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """Return (header dict, data start offset, file size), validating the header's own framing."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise BadInputError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", raw_len)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise BadInputError(
                f"{path}: safetensors header claims {length} bytes but the file has {size - 8} after the length"
            )
        raw = handle.read(length)
    header = parse_json_text(raw, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise BadInputError(f"{path}: safetensors header must be a JSON object")
    return header, 8 + length, size


def sniff_header(path: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(header, ``__metadata__``) of a well-formed safetensors file, or None: what every safetensors-based
    sniffer decides on, without touching tensor data and without raising."""
    if not path.is_file() or not is_safetensors(path):
        return None
    try:
        header, _, _ = read_header(path)
    except BadInputError:
        return None
    meta = header.get("__metadata__") or {}
    return (header, meta) if isinstance(meta, dict) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Map every tensor of a safetensors file without copying; return (tensors, metadata)."""
    path = Path(path)
    header, data_start, size = read_header(path)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise BadInputError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_len = size - data_start
    spans: list[tuple[int, int, str]] = []
    parsed: dict[str, tuple[np.dtype[Any], tuple[int, ...], int, int]] = {}
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise BadInputError(f"{where}: entry must have exactly dtype, shape and data_offsets")
        dtype = dtype_from_code(str(entry["dtype"]), where)
        shape = entry["shape"]
        offsets = entry["data_offsets"]
        if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
            raise BadInputError(f"{where}: shape must be a list of non-negative integers, got {shape!r:.200}")
        if len(shape) > MAX_TENSOR_DIMS or any(s >= 1 << 62 for s in shape):
            raise BadInputError(f"{where}: shape {shape!r:.200} has too many or too large dimensions")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise BadInputError(f"{where}: data_offsets must be two integers, got {offsets!r:.200}")
        begin, end = offsets
        count = 1
        for s in shape:
            count *= s
        if not 0 <= begin <= end <= data_len:
            raise BadInputError(f"{where}: data_offsets {offsets} fall outside the {data_len}-byte data section")
        if end - begin != count * dtype.itemsize:
            raise BadInputError(
                f"{where}: shape {shape} of {entry['dtype']} needs {count * dtype.itemsize} bytes, "
                f"offsets give {end - begin}"
            )
        spans.append((begin, end, name))
        parsed[name] = (dtype, tuple(shape), begin, end)
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            kind = "overlaps the previous tensor" if begin < cursor else "leaves a gap before it"
            raise BadInputError(f"{path}: tensor {name!r} at offset {begin} {kind} (expected {cursor})")
        cursor = end
    if cursor != data_len:
        raise BadInputError(f"{path}: {data_len - cursor} trailing bytes after the last tensor")
    tensors: dict[str, np.ndarray] = {}
    if data_len:
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        buffer = memoryview(mapped)
    for name, (dtype, shape, begin, end) in parsed.items():
        if end == begin:
            tensors[name] = np.zeros(shape, dtype=dtype)
            continue
        array = np.frombuffer(buffer[data_start + begin: data_start + end], dtype=dtype).reshape(shape)
        tensors[name] = array
    return tensors, dict(metadata)


def _header_bytes(entries: dict[str, Any]) -> bytes:
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    pad = (-len(raw)) % HEADER_ALIGNMENT
    return raw + b" " * pad


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    progress: Any = None,
) -> None:
    """Write tensors in the order given, one at a time from their (possibly mapped) source.

    Output is a function of names, dtypes, shapes, bytes and metadata only, so the same input gives a
    byte-identical file. ``path`` should be a temporary path (see ``atomic_file``). Tensors mapped from a
    file are copied file to file by the kernel, so the source bytes never count in this process's memory.
    """
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for name, array in items:
        if name in entries:
            raise BadInputError(f"duplicate tensor name {name!r}")
        nbytes = int(array.size) * array.dtype.itemsize
        entries[name] = {
            "dtype": code_from_dtype(array.dtype),
            "shape": [int(s) for s in array.shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header = _header_bytes(entries)
    from convnextv2.converters.checkpoint import pending_placeholders

    # Source digests still being computed (see checkpoint.deferred_digests) are hashed on another thread while
    # the tensors stream; their placeholders have the digest's length, so the header is rewritten in place.
    pending = pending_placeholders(header)
    for digest in pending:
        digest.start()
    with open(path, "wb", buffering=0) as out, TensorStreamer(out) as streamer:
        streamer.write(struct.pack("<Q", len(header)) + header)
        for _name, array in items:
            write_array_bytes(streamer, array)
            if progress is not None:
                progress.update(int(array.size) * array.dtype.itemsize)
        if pending:
            final = header
            for digest in pending:
                value = digest.result().encode()
                if len(value) != len(digest.placeholder):
                    raise AssertionError("a digest placeholder must have the digest's length")
                final = final.replace(digest.placeholder.encode(), value)
            os.pwrite(out.fileno(), final, 8)


def write_array_bytes(out: Any, array: np.ndarray) -> None:
    """Little-endian, C-order bytes of ``array`` into a TensorStreamer or any writable stream, in bounded chunks.

    The writers call this once per tensor (fault-injection tests hook it here)."""
    if isinstance(out, TensorStreamer):
        out.write_array(array)
        return
    with TensorStreamer(out, kernel_copy=False) as streamer:
        streamer.write_array(array)


# ------------------------------------------------------------------ streaming without holding the source

# Bytes moved per system call / per bounce-buffer fill: large enough that call overhead is nothing, small
# enough that memory stays flat.
STREAM_CHUNK = 16 * 1024 * 1024
# Written data is handed to the disk every WRITEBACK_WINDOW bytes and dropped from the page cache one window
# later: the final fsync then has little left to do, and a multi-GB output does not push the source (or
# anything else) out of the cache on a small machine.
WRITEBACK_WINDOW = 64 * 1024 * 1024
_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


@dataclasses.dataclass(frozen=True)
class _MappedRegion:
    start: int
    end: int
    perms: str
    file_offset: int
    inode: int
    path: str


def _mapped_file_regions() -> list[_MappedRegion]:
    """This process's file mappings (/proc/self/maps); empty where there is no procfs."""
    regions = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as maps:
            lines = maps.readlines()
    except OSError:
        return []
    for line in lines:
        parts = line.rstrip("\n").split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/") or parts[4] == "0":
            continue
        low, high = (int(x, 16) for x in parts[0].split("-"))
        regions.append(_MappedRegion(low, high, parts[1], int(parts[2], 16), int(parts[4]), parts[5]))
    regions.sort(key=lambda r: r.start)
    return regions


def _libc_function(name: str) -> Any:
    try:
        import ctypes

        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


class TensorStreamer:
    """Writes arrays to ``out`` without ever holding a whole source tensor in this process.

    - A C-contiguous array mapped read-only from a file (what our readers return) is copied from that file
      by the kernel (``copy_file_range``) when ``out`` is a plain file, or read in chunks into one reused
      buffer otherwise (a zip entry needs the bytes for its CRC). Its pages are never touched through the
      mapping, so they never count in this process's resident memory.
    - Any other C-contiguous array is written straight from its memory, chunk by chunk.
    - A strided view (a transpose of mapped data) is gathered slice by slice into the reused buffer; its
      source pages are then released from the mapping (``MADV_DONTNEED`` on a shared read-only file mapping
      drops them from this process only; the file and the page cache are untouched).
    """

    def __init__(self, out: Any, kernel_copy: bool = True):
        self.out = out
        self.regions: list[_MappedRegion] | None = None
        self.sources: dict[tuple[str, int], int] = {}
        self.buffer: np.ndarray | None = None
        self.fd: int | None = None
        if kernel_copy and hasattr(out, "fileno") and hasattr(os, "copy_file_range"):
            try:
                fd = out.fileno()
                import stat

                if stat.S_ISREG(os.fstat(fd).st_mode):
                    self.fd = fd
            except (OSError, ValueError, io.UnsupportedOperation):
                self.fd = None
        self.synced_to = 0
        self.kicked_to = 0
        self.sync_file_range = _libc_function("sync_file_range") if self.fd is not None else None

    def __enter__(self) -> TensorStreamer:
        return self

    def __exit__(self, *exc: Any) -> None:
        for fd in self.sources.values():
            os.close(fd)
        self.sources.clear()
        self.buffer = None

    # -------------------------------------------------------------- output side

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = self.out.write(view)
            if written is None:  # a buffered or zip stream takes everything at once
                break
            view = view[written:]
        self._writeback()

    def flush(self) -> None:
        if hasattr(self.out, "flush"):
            self.out.flush()

    def _position(self) -> int:
        assert self.fd is not None
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def _writeback(self) -> None:
        if self.fd is None or self.sync_file_range is None:
            return
        position = self._position()
        if position - self.kicked_to < WRITEBACK_WINDOW:
            return
        import ctypes

        fd = self.fd
        # Start writing the new window without waiting; wait for the one before it, then drop it from the cache.
        self.sync_file_range(fd, ctypes.c_int64(self.kicked_to), ctypes.c_int64(position - self.kicked_to),
                             ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))
        if self.kicked_to > self.synced_to:
            done = self.sync_file_range(
                fd, ctypes.c_int64(self.synced_to), ctypes.c_int64(self.kicked_to - self.synced_to),
                ctypes.c_uint(_SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER))
            if done == 0 and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, self.synced_to, self.kicked_to - self.synced_to, os.POSIX_FADV_DONTNEED)
            self.synced_to = self.kicked_to
        self.kicked_to = position

    # -------------------------------------------------------------- input side

    def _region_of(self, low: int, high: int) -> _MappedRegion | None:
        if self.regions is None:
            self.regions = _mapped_file_regions()
        for region in self.regions:
            if region.start <= low and high <= region.end:
                return region
        return None

    def _source_fd(self, region: _MappedRegion) -> int | None:
        key = (region.path, region.inode)
        if key not in self.sources:
            try:
                fd = os.open(region.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return None
            # The name may now point at another file (replaced after it was mapped): use it only if it is
            # the mapped inode.
            if os.fstat(fd).st_ino != region.inode:
                os.close(fd)
                return None
            self.sources[key] = fd
        return self.sources[key]

    def _bounce(self, nbytes: int) -> np.ndarray:
        if self.buffer is None or self.buffer.size < nbytes:
            self.buffer = np.empty(max(nbytes, STREAM_CHUNK), dtype=np.uint8)
        return self.buffer[:nbytes]

    def write_array(self, array: np.ndarray) -> None:
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        nbytes = int(array.size) * array.dtype.itemsize
        if nbytes == 0:
            return
        if array.flags.c_contiguous:
            address = int(array.__array_interface__["data"][0])
            region = self._region_of(address, address + nbytes)
            source = self._source_fd(region) if region is not None else None
            if region is not None and source is not None:
                self._copy_from_file(source, region.file_offset + address - region.start, nbytes)
            else:
                flat = array.reshape(-1).view(np.uint8)
                for begin in range(0, nbytes, STREAM_CHUNK):
                    self.write(flat[begin: begin + STREAM_CHUNK])
            return
        self._write_strided(array)

    def _copy_from_file(self, source: int, offset: int, nbytes: int) -> None:
        end = offset + nbytes
        while offset < end:
            count = min(STREAM_CHUNK, end - offset)
            if self.fd is not None:
                try:
                    copied = os.copy_file_range(source, self.fd, count, offset)
                except OSError:
                    self.fd_copy_failed()
                    continue
                if copied <= 0:
                    raise BadInputError(f"source file ended {end - offset} bytes early while copying a tensor")
                offset += copied
                self._writeback()
                continue
            chunk = self._bounce(count)
            got = os.preadv(source, [chunk], offset)  # type: ignore[list-item]  # numpy stubs: ndarray is a Buffer
            if got <= 0:
                raise BadInputError(f"source file ended {end - offset} bytes early while copying a tensor")
            self.write(chunk[:got])
            offset += got

    def fd_copy_failed(self) -> None:
        # copy_file_range refused (old kernel, cross-filesystem on some kernels): the bounce buffer still works.
        self.fd = None

    def _write_strided(self, array: np.ndarray) -> None:
        rows = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(-1, 1)
        row_bytes = max(1, rows.shape[1] * array.dtype.itemsize)
        per_block = max(1, STREAM_CHUNK // row_bytes)
        for begin in range(0, array.shape[0] if array.ndim else 1, per_block):
            block = array[begin: begin + per_block] if array.ndim else array
            target = self._bounce(int(block.size) * array.dtype.itemsize).view(array.dtype).reshape(block.shape)
            np.copyto(target, block)
            self.write(target.reshape(-1).view(np.uint8))
        self._release_mapped_pages(array)

    def _release_mapped_pages(self, array: np.ndarray) -> None:
        low, high = np.lib.array_utils.byte_bounds(array)
        region = self._region_of(low, high)
        # Only a shared, read-only file mapping may be dropped: its pages come back from the file. On private or
        # anonymous memory MADV_DONTNEED would discard data.
        if region is None or "w" in region.perms or region.perms[3:4] != "s":
            return
        madvise = _libc_function("madvise")
        if madvise is None:
            return
        import ctypes

        page = mmap.PAGESIZE
        start = (low + page - 1) // page * page  # only whole pages inside the tensor's span
        stop = high // page * page
        if stop > start:
            madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), ctypes.c_int(mmap.MADV_DONTNEED))
