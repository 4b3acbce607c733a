"""The bit-for-bit read-back: a written output read again by its own reader, every canonical tensor compared
with what was meant to be written (and the config and preprocessing).

Cheap by design: the file was just written, so its pages are in the page cache, and the tensors are compared
in chunks of a few megabytes (no copy of a whole tensor, no full-size temporary), so peak memory stays a
small fraction of the file whatever its size.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.format_contract import Format
from convnextv2.reference.errors import BadInputError, CheckFailedError

# Bytes compared at a time: large enough that the per-chunk cost vanishes, small enough to stay in cache.
CHUNK_BYTES = 4 << 20


def read_back(expected: Checkpoint, path: Path, format: Format, named: Path | None = None) -> tuple[dict[str, Any], Checkpoint]:
    """Read ``path`` with ``format``'s reader and compare it with ``expected`` bit for bit: the figures and the
    checkpoint read, or CheckFailedError naming the first differences. A dtype the format widens exactly
    (bfloat16 into ONNX's float32) compares equal when narrowing it back gives the very same bits. An unnamed
    output (``named``: the path it will be published as) is read under its coming name by a reader whose
    result depends on the name (``format.read_as``)."""
    started = time.perf_counter()
    try:
        # What the reader would say of this file (a non-default eps, an assumed preprocessing) was said of the
        # source already, or is announced as a change.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = format.read_as(path, named.name) if named is not None and format.read_as else format.read(path)
    except BadInputError as exc:
        raise CheckFailedError(f"{path}: the {format.name} reader cannot read back what was just written: {exc}") from None
    problems: list[str] = []
    if got.config != expected.config:
        problems.append(f"config: wrote {expected.config.to_json_dict()}, read back {got.config.to_json_dict()}")
    if got.preprocessing != expected.preprocessing:
        problems.append(f"preprocessing: wrote {expected.preprocessing.to_json_dict()}, read back "
                        f"{got.preprocessing.to_json_dict()}")
    names = [name for name, _ in expected.ordered_tensors()]
    missing = [n for n in names if n not in got.tensors]
    unexpected = sorted(set(got.tensors) - set(names))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) not written: {', '.join(unexpected[:5])}")
    compared = widened = total = 0
    for name in names:
        if name not in got.tensors:
            continue
        want, have = np.asarray(expected.tensors[name]), np.asarray(got.tensors[name])
        total += have.nbytes
        compared += 1
        if want.shape != have.shape:
            problems.append(f"{name}: shape {list(want.shape)} written, {list(have.shape)} read back")
            continue
        if want.dtype != have.dtype:
            if not _exactly_widened(want, have):
                problems.append(f"{name}: {want.dtype} written, {have.dtype} read back with other values")
                continue
            widened += 1
            continue
        if not same_bits(want, have):
            problems.append(f"{name}: {_count_differing(want, have)} element(s) differ from what was written")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise CheckFailedError(f"{path}: reading the output back does not give what was written: {shown}")
    return {"status": "exact", "tensors": compared, "bytes": total, "widened": widened,
            "seconds": round(time.perf_counter() - started, 3)}, got


def _flat_bytes(a: np.ndarray) -> np.ndarray:
    """``a``'s bytes as a flat uint8 array: a view when ``a`` is contiguous (memory-mapped tensors are)."""
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays of one dtype and shape hold the very same bytes (NaN payloads and -0.0 included)."""
    x, y = _flat_bytes(a), _flat_bytes(b)
    if x.nbytes != y.nbytes:
        return False
    if x.nbytes < CHUNK_BYTES:
        return x.tobytes() == y.tobytes()
    # Chunk by chunk, eight bytes a lane: the temporaries are a chunk's, and the first difference stops it.
    step = CHUNK_BYTES
    body = x.nbytes - x.nbytes % 8
    for start in range(0, body, step):
        stop = min(start + step, body)
        if not np.array_equal(x[start:stop].view(np.uint64), y[start:stop].view(np.uint64)):
            return False
    return x[body:].tobytes() == y[body:].tobytes()


def _count_differing(a: np.ndarray, b: np.ndarray) -> int:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(a.dtype.itemsize, np.uint8)
    return int(np.count_nonzero(a.view(width) != b.view(width)))


def _exactly_widened(want: np.ndarray, have: np.ndarray) -> bool:
    if want.dtype.kind != "f" and str(want.dtype) != "bfloat16":
        return False
    if np.dtype(have.dtype).itemsize <= np.dtype(want.dtype).itemsize:
        return False
    return same_bits(np.asarray(have).astype(want.dtype), want)


__all__ = ["CHUNK_BYTES", "read_back", "same_bits"]
