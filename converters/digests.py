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
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

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
