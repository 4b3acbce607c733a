"""The bit-for-bit read-back: a written output read again by its own reader, every canonical tensor compared
with what was meant to be written (and the config and preprocessing).

Cheap by design: the file was just written and its pages are still in the page cache (the writers hand them
to the disk as they go but leave them cached, converters/streaming.py), so nothing is read from the disk. The
tensors are compared on two threads, in chunks of a few megabytes (no copy of a whole tensor, no full-size
temporary), and each compared chunk of a memory-mapped tensor is given back at once, so neither anonymous nor
mapped memory grows with the file.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.format_contract import Format
from convnextv2.reference.errors import BadInputError, CheckFailedError

# Bytes compared at a time: large enough that the per-chunk cost vanishes, small enough to stay in cache.
CHUNK_BYTES = 4 << 20


def read_back(expected: Checkpoint, path: Path, format: Format, named: Path | None = None,
              second_thread_after: Callable[[], None] | None = None) -> tuple[dict[str, Any], Checkpoint]:
    """Read ``path`` with ``format``'s reader and compare it with ``expected`` bit for bit: the figures and the
    checkpoint read, or CheckFailedError naming the first differences. A dtype the format widens exactly
    (bfloat16 into ONNX's float32) compares equal when narrowing it back gives the very same bits. An unnamed
    output (``named``: the path it will be published as) is read under its coming name by a reader whose
    result depends on the name (``format.read_as``). ``second_thread_after``: returns when the second core is
    free (the source digest done); the second comparing thread waits for it, the first starts at once."""
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
    compared, widened, total = _compare_tensors(expected, got, names, problems, second_thread_after)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise CheckFailedError(f"{path}: reading the output back does not give what was written: {shown}")
    return {"status": "exact", "tensors": compared, "bytes": total, "widened": widened,
            "seconds": round(time.perf_counter() - started, 3)}, got


def _compare_tensors(expected: Checkpoint, got: Checkpoint, names: list[str], problems: list[str],
                     second_thread_after: Callable[[], None] | None) -> tuple[int, int, int]:
    """Every tensor of ``names`` that ``got`` holds against ``expected``; what differs is added to ``problems``.
    Returns (tensors compared, of which widened exactly, bytes read back)."""
    compared = widened = total = 0
    to_compare: list[tuple[str, np.ndarray, np.ndarray]] = []
    for name in names:
        if name not in got.tensors:
            continue
        want, have = np.asarray(expected.tensors[name]), np.asarray(got.tensors[name])
        total += have.nbytes
        compared += 1
        if want.shape != have.shape:
            problems.append(f"{name}: shape {list(want.shape)} written, {list(have.shape)} read back")
        elif want.dtype != have.dtype:
            if _exactly_widened(want, have):
                widened += 1
            else:
                problems.append(f"{name}: {want.dtype} written, {have.dtype} read back with other values")
        else:
            to_compare.append((name, want, have))
    verdicts = _compare_on_threads(to_compare, second_thread_after)
    for (name, want, have), same in zip(to_compare, verdicts, strict=True):
        if not same:
            problems.append(f"{name}: {_count_differing(want, have)} element(s) differ from what was written")
    return compared, widened, total


def _compare_on_threads(to_compare: list[tuple[str, np.ndarray, np.ndarray]],
                        second_thread_after: Callable[[], None] | None) -> list[bool]:
    """``same_bits`` of each pair, tensor by tensor from one shared list: this thread starts at once, a second
    one (numpy lets go of the GIL while it compares) once ``second_thread_after`` returns, so it takes the core
    the source digest leaves. The second thread is not waited for unless it took a tensor."""
    verdicts: list[bool | None] = [None] * len(to_compare)
    errors: list[BaseException] = []
    progress = {"taken": 0, "done": 0}
    changed = threading.Condition()

    def work() -> None:
        while True:
            with changed:
                index = progress["taken"]
                if index == len(to_compare):
                    return
                progress["taken"] = index + 1
            try:
                _, want, have = to_compare[index]
                verdicts[index] = same_bits(want, have, release=True)
            except BaseException as exc:  # handed to the calling thread
                errors.append(exc)
            finally:
                with changed:
                    progress["done"] += 1
                    changed.notify_all()

    def second() -> None:
        if second_thread_after is not None:
            second_thread_after()
        work()

    if _COMPARE_THREADS > 1 and len(to_compare) > 1:
        threading.Thread(target=second, name="read-back", daemon=True).start()
    work()
    with changed:
        changed.wait_for(lambda: progress["done"] == progress["taken"])
    if errors:
        raise errors[0]
    return [bool(v) for v in verdicts]


def _flat_bytes(a: np.ndarray) -> np.ndarray:
    """``a``'s bytes as a flat uint8 array: a view when ``a`` is contiguous (memory-mapped tensors are)."""
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8)


def same_bits(a: np.ndarray, b: np.ndarray, release: bool = False) -> bool:
    """Whether two arrays of one dtype and shape hold the very same bytes (NaN payloads and -0.0 included).
    With ``release``, each compared chunk of either that is a read-only file mapping is given back at once
    (``MADV_DONTNEED``: this process's view of the pages goes, the file and the page cache keep them), so mapped
    memory does not grow with the file; a page given back is read again if anything touches it later."""
    x, y = _flat_bytes(a), _flat_bytes(b)
    if x.nbytes != y.nbytes:
        return False
    if x.nbytes < CHUNK_BYTES:
        return x.tobytes() == y.tobytes()
    # Chunk by chunk: no temporary larger than a chunk's, and the first difference stops it.
    mapped = [flat for flat in (x, y) if release and _read_only_mapping(flat)]
    for start in range(0, x.nbytes, CHUNK_BYTES):
        stop = min(start + CHUNK_BYTES, x.nbytes)
        if not _equal_bytes(x, y, start, stop):
            return False
        for flat in mapped:
            _give_back(flat[start:stop])
    return True


def _equal_bytes(x: np.ndarray, y: np.ndarray, start: int, stop: int) -> bool:
    """Whether ``x[start:stop]`` and ``y[start:stop]`` (flat uint8) hold the same bytes: libc's ``memcmp``
    (vectorised, no temporary, the GIL let go by ctypes), else numpy in eight-byte lanes and the bytes after."""
    if _MEMCMP is not None:
        base_x, base_y = int(x.__array_interface__["data"][0]), int(y.__array_interface__["data"][0])
        return int(_MEMCMP(base_x + start, base_y + start, stop - start)) == 0
    lanes = start + (stop - start) // 8 * 8
    return (np.array_equal(x[start:lanes].view(np.uint64), y[start:lanes].view(np.uint64))
            and x[lanes:stop].tobytes() == y[lanes:stop].tobytes())


def _read_only_mapping(flat: np.ndarray) -> bool:
    """Whether ``flat`` is a view of a read-only ``mmap`` (what our readers return): only there may its pages be
    given back (on writable memory MADV_DONTNEED would discard data)."""
    base: Any = flat
    # Views of views (as_strided wraps its source in an object of its own that keeps it as ``base``) down to
    # the buffer they were made from.
    while isinstance(base, np.ndarray) or (base is not None and hasattr(base, "__array_interface__")
                                           and hasattr(base, "base")):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if not isinstance(base, mmap.mmap) or _MADVISE is None:
        return False
    try:
        return memoryview(base).readonly
    except ValueError:  # closed
        return False


def _give_back(chunk: np.ndarray) -> None:
    """MADV_DONTNEED on the whole pages inside ``chunk`` (ctypes lets go of the GIL during the call)."""
    import ctypes

    page = mmap.PAGESIZE
    address = int(chunk.__array_interface__["data"][0])
    low = (address + page - 1) // page * page
    high = (address + chunk.nbytes) // page * page
    if high > low and _MADVISE is not None:
        _MADVISE(ctypes.c_void_p(low), ctypes.c_size_t(high - low), ctypes.c_int(_MADV_DONTNEED))


def _libc_madvise() -> Any:
    """libc's madvise through ctypes, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None


def _libc_memcmp() -> Any:
    """libc's memcmp through ctypes, or None where there is no C library to load."""
    try:
        import ctypes

        memcmp = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):
        return None
    memcmp.restype = ctypes.c_int
    memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return memcmp


_MADVISE = _libc_madvise()
_MEMCMP = _libc_memcmp()
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
_COMPARE_THREADS = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


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
