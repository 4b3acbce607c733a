"""Entries kept on disk between runs (the parity cache's exports and referee, the export templates), each keyed
by what it is made from and by the toolkit itself: its source files and the installed versions of every
framework it drives (:func:`toolkit_fingerprint`), so a changed toolkit or framework never hits an old entry.

The entries live under ``$XDG_CACHE_HOME/convnextv2`` (default ``~/.cache/convnextv2``), one folder per entry,
published atomically (a killed run leaves at most a marked temporary folder, removed by the next run); least
recently used entries go once the cache passes ``CONVNEXTV2_CACHE_MAX_GB`` (default 10). A folder that cannot be
written (read-only, full) is reported once and the run goes on without it. Every entry records the size and
sha256 of each file it stores and is checked against that record before it is used (cache_integrity.py): a
damaged entry is discarded, built again and reported once. parity_tests/cache.py:ParityCache is this cache with
a parity run's summary and referee arrays on top.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from convnextv2.converters import cache_integrity

# Distributions whose version changes what an artifact or the referee holds.
FRAMEWORKS = ("numpy", "torch", "onnx", "onnxscript", "onnxruntime", "openvino", "tensorflow", "keras",
              "ai-edge-litert", "executorch", "torchao", "jax", "flax", "safetensors")
DEFAULT_MAX_GB = 10.0
# The package folders whose code an artifact may depend on (the whole toolkit: a writer change must miss).
_CODE_FOLDERS = ("reference", "converters", "parity_tests", "fixtures")
_ENTRY_RECORD = cache_integrity.RECORD
# A damaged entry is renamed to this (then removed) so that no reader finds it under its key meanwhile.
_DISCARDED_TAG = "discarded"


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "convnextv2"


@functools.lru_cache(maxsize=1)
def toolkit_fingerprint() -> str:
    """The toolkit's source files and the installed framework versions, as one digest."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent.parent
    for folder in _CODE_FOLDERS:
        for path in sorted((package / folder).rglob("*.py")):
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    for name in FRAMEWORKS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{name}={version}\0".encode())
    return digest.hexdigest()


class EntryCache:
    """Entries keyed by what they are made from, under ``root``: each a folder published atomically, recorded
    (converters/cache_integrity.py) and checked before use. ``root=None`` keeps them in a temporary folder for
    this object's life only, removed by :meth:`close`: nothing survives it."""

    def __init__(self, root: Path | None, max_bytes: int | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.persistent = root is not None
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        if root is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="convnextv2-cache-")
            root = Path(self._temporary.name)
        self.root: Path | None = root
        if max_bytes is None:
            max_bytes = int(float(os.environ.get("CONVNEXTV2_CACHE_MAX_GB", DEFAULT_MAX_GB)) * 1e9)
        self.max_bytes = max_bytes
        self.hits: list[str] = []
        self.misses: list[str] = []
        # Damaged entries found (here or by a worker), one line each: "<kind> <key>: <what is wrong>".
        self.discarded: list[str] = []
        self._progress = progress
        self._broken: str | None = None

    @classmethod
    def default(cls, progress: Callable[[str], None] | None = None) -> EntryCache:
        return cls(default_root(), progress=progress)

    @property
    def enabled(self) -> bool:
        return self.root is not None and self._broken is None

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None
            self.root = None

    def key(self, kind: str, parts: Mapping[str, Any]) -> str:
        text = json.dumps({"kind": kind, "toolkit": toolkit_fingerprint(), **parts}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @contextlib.contextmanager
    def folder(self, kind: str, parts: Mapping[str, Any], build: Callable[[Path], None]) -> Iterator[Path]:
        """A folder holding the artifact ``build`` writes into an empty folder: the cached one when it exists,
        else built now (and kept when the cache is on)."""
        if not self.enabled:
            with tempfile.TemporaryDirectory(prefix=f"convnextv2-{kind}-") as tmp:
                build(Path(tmp))
                yield Path(tmp)
            return
        assert self.root is not None
        entry = self.root / kind / self.key(kind, parts)
        published: Path | None = None
        failure: Exception | None = None
        with self._building(entry):
            try:
                usable = self._usable(entry, kind)
            except OSError as exc:  # a damaged entry that cannot be removed: the folder is not ours to use
                usable, failure = False, exc
            if usable:
                published = entry
                self.hits.append(kind)
                with contextlib.suppress(OSError):
                    os.utime(entry / _ENTRY_RECORD)  # least recently used goes first
            else:
                self.misses.append(kind)
                from convnextv2.reference.errors import EnvironmentFaultError

                try:
                    if failure is None:
                        published = self._publish(entry, kind, parts, build)
                except (OSError, EnvironmentFaultError) as exc:
                    failure = exc
        if published is not None:
            yield published
            return
        assert failure is not None
        # The cache's own folder (read-only, full, not ours): once more without it, so a real fault of the build
        # itself is raised from there.
        self._give_up(failure)
        with tempfile.TemporaryDirectory(prefix=f"convnextv2-{kind}-") as tmp:
            build(Path(tmp))
            yield Path(tmp)

    def being_built(self, kind: str, parts: Mapping[str, Any]) -> bool:
        """Whether another process is building this entry now (it is missing and its lock is held): a caller that
        can do without it (a runner that can export its checkpoint directly) need not wait for it."""
        import fcntl

        if not self.enabled or self.root is None:
            return False
        entry = self.root / kind / self.key(kind, parts)
        lock = entry.parent / f".{entry.name}.lock"
        if os.path.lexists(entry) or not lock.exists():
            return False
        try:
            with open(lock, "a+b") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
        except BlockingIOError:
            return not os.path.lexists(entry)
        except OSError:
            return False
        return False

    @contextlib.contextmanager
    def _building(self, entry: Path) -> Iterator[None]:
        """Held while an entry is looked up and, if missing, built: a second process after the same entry (two
        pytest workers, two parity workers, two runs in CI) waits for the first and then finds it, instead of
        building it again (an ExecuTorch lowering is a minute). A folder where no lock can be made (read-only)
        goes on without one; the publish that follows reports it.

        The lock file is removed by its holder before it lets go, so none is left behind. A process that was
        waiting on the removed file then holds a lock nobody else can see; at worst it and a newcomer both find
        the entry missing (after a failed build) and both build it: work done twice, never a torn entry, as
        publishing is atomic."""
        import fcntl

        lock = entry.parent / f".{entry.name}.lock"
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a+b")  # noqa: SIM115  (closed below)
        except OSError:
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            with contextlib.suppress(OSError):
                lock.unlink()
            handle.close()  # releases the lock

    def _publish(self, entry: Path, kind: str, parts: Mapping[str, Any], build: Callable[[Path], None]) -> Path:
        from convnextv2.converters import publishing
        from convnextv2.reference.errors import BadInputError

        entry.parent.mkdir(parents=True, exist_ok=True)
        files: dict[str, dict[str, Any]] | None = None
        try:
            with publishing.atomic_directory(entry) as work:
                build(work)
                files = cache_integrity.file_digests(work)
                (work / _ENTRY_RECORD).write_text(json.dumps(
                    {"kind": kind, "parts": parts, "toolkit": toolkit_fingerprint(), "created": time.time(),
                     "files": files}, sort_keys=True, default=str) + "\n", encoding="utf-8")
        except BadInputError:
            if not (entry / _ENTRY_RECORD).is_file():  # another run published the same entry first: use it
                raise
            files = None
        if files is not None:
            cache_integrity.remember(entry, files)  # hashed just now: its first read here need not hash it again
        self._evict(keep=entry)
        return entry

    def _usable(self, entry: Path, kind: str) -> bool:
        """Whether a sound entry is in place under its key; a damaged one is discarded (and then there is none)."""
        if not os.path.lexists(entry):
            return False
        damage = cache_integrity.problem(entry)
        if damage is None:
            return True
        self._discard(entry, kind, damage)
        return False

    def _discard(self, entry: Path, kind: str, damage: str) -> None:
        """Take a damaged entry out of use (renamed away from its key, then removed) and report it."""
        cache_integrity.forget(entry)
        aside = entry.with_name(f".{entry.name}.{_DISCARDED_TAG}.{os.getpid()}")
        os.rename(entry, aside)
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink()
        self._report_discarded(f"{kind} {entry.name}: {damage}")

    def _report_discarded(self, line: str) -> None:
        if line in self.discarded:  # once, however many processes of the run report it
            return
        self.discarded.append(line)
        if self._progress is not None:
            self._progress(f"parity cache: discarded a damaged entry, built again: {line}")

    def _evict(self, keep: Path) -> None:
        assert self.root is not None
        entries = []
        # A damaged entry's remains, left by a run killed while it removed them.
        for remains in self.root.glob(f"*/.*.{_DISCARDED_TAG}.*"):
            shutil.rmtree(remains, ignore_errors=True)
        for record in self.root.glob(f"*/*/{_ENTRY_RECORD}"):
            with contextlib.suppress(OSError):
                size = sum(f.stat().st_size for f in record.parent.rglob("*") if f.is_file())
                entries.append((record.stat().st_mtime, size, record.parent))
        total = sum(size for _, size, _ in entries)
        for _, size, folder in sorted(entries, key=lambda item: item[0]):
            if total <= self.max_bytes:
                break
            if folder == keep:
                continue
            cache_integrity.forget(folder)
            shutil.rmtree(folder, ignore_errors=True)
            total -= size

    def _give_up(self, exc: Exception) -> None:
        self._stop_using(f"{self.root}: {getattr(exc, 'strerror', None) or exc}")

    def _stop_using(self, reason: str) -> None:
        self._broken = reason
        warnings.warn(f"cache {reason}; running without the cache", UserWarning, stacklevel=5)
