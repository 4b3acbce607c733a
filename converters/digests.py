"""sha256 digests of source files, computed when first asked for or while a writer streams the tensors.

The digest of a multi-GB source costs a full read of it. A reader records a :class:`LazySha256` in the
checkpoint's :class:`~convnextv2.converters.checkpoint.Source`; it is computed when first asked for, or by
``write_safetensors`` on a second thread while it streams the tensors (the two reads then share one pass
through the page cache and run on two cores). For that, metadata asked for inside :func:`deferred_digests`
carries a placeholder of the digest's length, which the writer replaces in its header last.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from convnextv2.reference.errors import BadInputError

HASH_CHUNK = 8 * 1024 * 1024


def sha256_of(path: str | os.PathLike[str], chunk: int = HASH_CHUNK) -> str:
    """sha256 of a file, or of a directory's files concatenated in sorted path order."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def _hash_mapped(fd: int, size: int, digest: Any) -> bool:
    """Feed the ``size`` bytes of ``fd`` to ``digest`` through a read-only mapping, chunk by chunk, each chunk's
    pages given back once hashed: hashlib reads the page cache in place, where ``read`` would first copy every
    byte out of it (a quarter of the digest's CPU time). False, having hashed nothing, where the file cannot be
    mapped (empty, not a regular file, no mmap)."""
    if size == 0:
        return False
    try:
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return False
    view = memoryview(mapped)
    try:
        for start in range(0, size, HASH_CHUNK):
            count = min(HASH_CHUNK, size - start)
            if start + HASH_CHUNK < size:  # read the next chunk ahead while this one is hashed (a cold file)
                mapped.madvise(mmap.MADV_WILLNEED, start + HASH_CHUNK, min(HASH_CHUNK, size - start - HASH_CHUNK))
            digest.update(view[start: start + count])  # hashlib lets go of the GIL
            # This process's view of the pages goes; the page cache keeps them: the mapped size stays one chunk.
            mapped.madvise(mmap.MADV_DONTNEED, start, count)
    finally:
        view.release()
        mapped.close()
    return True


class LazySha256:
    """sha256 of a file, computed on first use or in the background while a writer streams the tensors.

    The file's identity (device, inode, size, mtime) is recorded when the checkpoint is read; a file replaced
    or modified before the digest is computed is refused rather than hashed.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        stat = self.path.stat()
        self.identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        self.placeholder = f"sha256-pending-{id(self):x}".ljust(64, "0")[:64]
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._value: str | None = None
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        return f"LazySha256({str(self.path)!r}, {'done' if self.done else 'pending'})"

    @property
    def done(self) -> bool:
        return self._value is not None

    def _compute(self) -> None:
        try:
            digest = hashlib.sha256()
            with open(self.path, "rb", buffering=0) as handle:
                stat = os.fstat(handle.fileno())
                if (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns) != self.identity:
                    raise BadInputError(f"{self.path} changed while it was being converted")
                if not _hash_mapped(handle.fileno(), stat.st_size, digest):
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    buffer = bytearray(HASH_CHUNK)
                    view = memoryview(buffer)
                    while count := handle.readinto(buffer):
                        digest.update(view[:count])
            self._value = digest.hexdigest()
        except BaseException as exc:  # handed to whoever asks for the value
            self._error = exc

    def start(self) -> None:
        """Begin hashing on a background thread (hashlib and file reads release the GIL)."""
        with self._lock:
            if self._thread is None and self._value is None:
                self._thread = threading.Thread(target=self._compute, name=f"sha256 {self.path.name}", daemon=True)
                self._thread.start()

    def wait(self) -> None:
        """Return once a started digest has finished or failed, without asking for its value."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()

    def result(self) -> str:
        with self._lock:
            thread = self._thread
            if thread is None and self._value is None and self._error is None:
                self._compute()
        if thread is not None:
            thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


# Weak: a checkpoint that is dropped takes its pending digest with it.
_PLACEHOLDERS: weakref.WeakValueDictionary[str, LazySha256] = weakref.WeakValueDictionary()
_PLACEHOLDERS_LOCK = threading.Lock()


class _Deferral(threading.local):
    active = False


_DEFERRAL = _Deferral()


@contextlib.contextmanager
def deferred_digests() -> Iterator[None]:
    """Inside, a source digest not computed yet reads as a 64-character placeholder (the length of the real
    one) instead of blocking; ``write_safetensors`` starts those digests, streams the tensors meanwhile and
    writes the real values into its header last. Use it only around metadata handed to that writer."""
    previous = _DEFERRAL.active
    _DEFERRAL.active = True
    try:
        yield
    finally:
        _DEFERRAL.active = previous


def deferring() -> bool:
    """Whether this thread is inside :func:`deferred_digests`."""
    return _DEFERRAL.active


class LateHeaders:
    """Header rewrites that ``write_safetensors`` left to do inside :func:`headers_written_late`: each writes the
    source digests into a header written with their placeholders, once they are computed."""

    def __init__(self) -> None:
        self._rewrites: list[tuple[list[LazySha256], Callable[[], None]]] = []

    def add(self, digests: list[LazySha256], rewrite: Callable[[], None]) -> None:
        self._rewrites.append((digests, rewrite))

    def wait(self) -> None:
        """Return once every digest the rewrites need has finished or failed (the core it used is free)."""
        for digests, _ in list(self._rewrites):
            for digest in digests:
                digest.wait()

    def finish(self) -> None:
        """Do the rewrites left, in the order they were added; a digest that failed raises its error here."""
        while self._rewrites:
            _, rewrite = self._rewrites.pop(0)
            rewrite()


class _Late(threading.local):
    headers: LateHeaders | None = None


_LATE = _Late()


@contextlib.contextmanager
def headers_written_late() -> Iterator[LateHeaders]:
    """Inside, ``write_safetensors`` returns without waiting for the source digests it hashes while it streams:
    the header keeps their placeholders and the rewrite goes to the yielded object, which converters.save
    finishes after the read-back (so the read-back runs while the digest is still being computed). What is left
    is finished on a normal exit; on an error it is dropped with the output."""
    late = LateHeaders()
    previous = _LATE.headers
    _LATE.headers = late
    try:
        yield late
        late.finish()
    finally:
        _LATE.headers = previous


def late_headers() -> LateHeaders | None:
    """The :class:`LateHeaders` of the innermost :func:`headers_written_late` of this thread, if any."""
    return _LATE.headers


def register_placeholder(digest: LazySha256) -> None:
    with _PLACEHOLDERS_LOCK:
        _PLACEHOLDERS[digest.placeholder] = digest


def pending_placeholders(text: bytes) -> list[LazySha256]:
    """The lazy digests whose placeholders appear in ``text`` (a header about to be written)."""
    with _PLACEHOLDERS_LOCK:
        candidates = list(_PLACEHOLDERS.values())
    return [d for d in candidates if d.placeholder.encode() in text]


def lazy_sha256(path: str | os.PathLike[str]) -> LazySha256:
    digest = LazySha256(path)
    register_placeholder(digest)
    return digest


def source_digest(path: Path) -> str | LazySha256:
    """What a reader records for its source: a file's digest lazily (a full read), a directory's at once."""
    return sha256_of(path) if path.is_dir() else lazy_sha256(path)
