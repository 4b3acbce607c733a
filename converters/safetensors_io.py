"""The safetensors codec: a validating reader and a streaming, deterministic writer, both numpy-only.

Our own code rather than the ``safetensors`` package because (a) the package has no streaming writer
(by design), so a 2.6 GB conversion would hold every tensor in memory, and (b) the reader must reject
hostile headers with our own error types before anything is allocated. Tests check both directions
against the ``safetensors`` package.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.digests import LazySha256, late_headers, pending_placeholders
from convnextv2.converters.streaming import TensorStreamer, write_array_bytes
from convnextv2.converters.strict_json import parse_json_text
from convnextv2.reference.errors import BadInputError, CheckFailedError

# A header larger than this is not a model header; refuse before reading it (no allocation by declared size).
MAX_HEADER_BYTES = 100 * 1024 * 1024
HEADER_ALIGNMENT = 8
# numpy allows 64 dimensions; no model tensor has more than a handful.
MAX_TENSOR_DIMS = 32


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
    # Source digests still being computed (see digests.deferred_digests) are hashed on another thread while
    # the tensors stream; their placeholders have the digest's length, so the header is rewritten in place.
    pending = pending_placeholders(header)
    for digest in pending:
        digest.start()
    with open(path, "wb", buffering=0) as out, TensorStreamer(out) as streamer:
        streamer.write(struct.pack("<Q", len(header)) + header)
        for _name, array in items:
            write_array_bytes(streamer, array)  # looked up here: fault-injection tests replace it
            if progress is not None:
                progress.update(int(array.size) * array.dtype.itemsize)
    if not pending:
        return
    rewrite = functools.partial(_write_digests, path, header, pending)
    late = late_headers()
    if late is None:
        rewrite()
    else:  # converters.save reads the file back meanwhile and finishes the rewrite after it
        late.add(pending, rewrite)


def _write_digests(path: str | os.PathLike[str], header: bytes, pending: list[LazySha256]) -> None:
    """Replace the digests' placeholders in the header written at ``path`` with their values (the same length,
    so nothing else moves) and read the header back."""
    final = header
    for digest in pending:
        value = digest.result().encode()
        if len(value) != len(digest.placeholder):
            raise AssertionError("a digest placeholder must have the digest's length")
        final = final.replace(digest.placeholder.encode(), value)
    fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        os.pwrite(fd, final, 8)
        if os.pread(fd, len(final), 8) != final:
            raise CheckFailedError(f"{path}: the header read back after writing the source digest into it differs "
                                   "from what was written")
    finally:
        os.close(fd)
