"""What a parity run makes on the way (each runtime's export, the PyTorch referee's features), cached on disk, and
where its time goes.

A second ``convnextv2 parity`` of the same checkpoint skips the exports and the float64 referee: both are
functions of the checkpoint, the input images and the code, and the cache key is a digest of exactly those: the
checkpoint's config and every tensor's bytes (not its provenance: :func:`checkpoint_digest`); the images' bytes; the toolkit's own source files and
the installed versions of every framework it drives. A changed checkpoint, input set, toolkit or framework can
therefore never hit an old entry. The runtimes themselves always run: parity is their output on this machine.

The cache lives under ``$XDG_CACHE_HOME/convnextv2`` (default ``~/.cache/convnextv2``), one folder per entry,
published atomically (a killed run leaves at most a marked temporary folder, removed by the next run); least
recently used entries go once the cache passes ``CONVNEXTV2_CACHE_MAX_GB`` (default 10). ``--no-cache`` (a
:class:`ParityCache` without a root) builds every artifact afresh in a temporary folder. A cache folder that
cannot be written (read-only, full) is reported once and the run goes on without it.

Every entry records the size and sha256 of each file it stores, and is checked against that record before it is
used (parity_tests/cache_integrity.py; once per process per entry): a damaged entry (a changed, truncated,
missing or extra file, a missing or unreadable record) is discarded and built again, never used, and reported
once, in the cache's summary (the report's ``cache.discarded``) and through the run's progress callback. A
worker's discards reach the parent's summary through :meth:`ParityCache.merge`; an entry a worker built is
checked by the parent itself when it reads it.

The cache is passed to whoever builds through it (a runner's ``RunContext``); it is never found through a module
global. Whether an artifact came from the cache or was built, and how long each step took, a runner's context
notes (converters/runners/base.py: ``RunContext.artifact``, ``Timings``).
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

import numpy as np

from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.parity_tests import cache_integrity

# Distributions whose version changes what an artifact or the referee holds.
FRAMEWORKS = ("numpy", "torch", "onnx", "onnxscript", "onnxruntime", "openvino", "tensorflow", "keras",
              "ai-edge-litert", "executorch", "torchao", "jax", "flax", "safetensors")
DEFAULT_MAX_GB = 10.0
# The package folders whose code an artifact may depend on (the whole toolkit: a writer change must miss).
_CODE_FOLDERS = ("reference", "converters", "parity_tests", "fixtures")
_ENTRY_RECORD = cache_integrity.RECORD
# A damaged entry is renamed to this (then removed) so that no reader finds it under its key meanwhile.
_DISCARDED_TAG = "discarded"


def process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports, when asked early), from /proc;
    0 where there is no /proc."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))


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


def checkpoint_digest(ckpt: Checkpoint) -> str:
    """The checkpoint as the numbers see it: its config and every tensor's name, dtype, shape and bytes.

    Provenance (source file name and digest, preprocessing notes, training info) is left out: it changes what an
    export's embedded metadata says, never what a runtime computes, and a parity artifact is never handed to the
    user. So the same weights read from any format (the matrix reads one fixture from nine) share their exports
    and referee, while one changed weight or config field misses."""
    digest = hashlib.sha256(json.dumps(ckpt.config.to_json_dict(), sort_keys=True).encode())
    for name, array in ckpt.ordered_tensors():
        array = np.ascontiguousarray(array)
        digest.update(f"\0{name}\0{array.dtype.str}\0{list(array.shape)}\0".encode())
        digest.update(memoryview(array.reshape(-1).view(np.uint8)))
    return digest.hexdigest()


def images_digest(images: np.ndarray) -> str:
    images = np.ascontiguousarray(images)
    digest = hashlib.sha256(f"{images.dtype.str}{list(images.shape)}".encode())
    digest.update(memoryview(images.reshape(-1).view(np.uint8)))
    return digest.hexdigest()


class ParityCache:
    """Artifacts keyed by what they are made from, under ``root``. ``root=None`` (``--no-cache``) keeps them in a
    temporary folder for this run only, removed by :meth:`close`: runtimes that read the same export still
    share it, and nothing survives the run."""

    def __init__(self, root: Path | None, max_bytes: int | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.persistent = root is not None
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        if root is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="convnextv2-parity-")
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
        # One run's digests (a cache object lives for one run): each checkpoint hashed once, however many
        # runtimes key an export by it. The checkpoint is held so that its id cannot be reused meanwhile.
        self._digests: dict[int, tuple[Checkpoint, str]] = {}

    def digest(self, ckpt: Checkpoint) -> str:
        known = self._digests.get(id(ckpt))
        if known is None or known[0] is not ckpt:
            known = self._digests[id(ckpt)] = (ckpt, checkpoint_digest(ckpt))
        return known[1]

    def adopt_digest(self, ckpt: Checkpoint, digest: str) -> None:
        """``ckpt``'s digest as computed by the process that handed it over (a worker's copy holds the same bytes):
        not hashed twice."""
        self._digests[id(ckpt)] = (ckpt, digest)

    @classmethod
    def default(cls, progress: Callable[[str], None] | None = None) -> ParityCache:
        return cls(default_root(), progress=progress)

    def report_to(self, progress: Callable[[str], None] | None) -> None:
        """Where a damaged entry is reported as it is found (the run's progress callback), unless one was given."""
        if self._progress is None:
            self._progress = progress

    @classmethod
    def attach(cls, root: Path | None, *, persistent: bool) -> ParityCache:
        """The cache another process of the same run opened (a parity worker): the same folder, which this
        object never removes. ``root=None``: that run has no usable cache folder, so neither has this one."""
        cache = cls(root if root is not None else Path(tempfile.gettempdir()))
        cache.persistent = persistent
        if root is None:
            cache._broken = "the parent run has no usable cache folder"
        return cache

    def merge(self, summary: Mapping[str, Any]) -> None:
        """Take in what a worker's cache did (its hits, misses, damaged entries it discarded, a folder it could not
        write)."""
        self.hits.extend(summary.get("hits", []))
        self.misses.extend(summary.get("misses", []))
        for line in summary.get("discarded", []):
            self._report_discarded(line)
        note = summary.get("note")
        if note and self.enabled:
            self._stop_using(note.removeprefix("not used: "))

    @property
    def enabled(self) -> bool:
        return self.root is not None and self._broken is None

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None
            self.root = None

    def summary(self) -> dict[str, Any]:
        record: dict[str, Any] = {"persistent": self.persistent, "root": str(self.root) if self.persistent else None,
                                  "hits": list(self.hits), "misses": list(self.misses)}
        if self.discarded:
            record["discarded"] = list(self.discarded)
        if self._broken:
            record["note"] = f"not used: {self._broken}"
        return record

    def key(self, kind: str, parts: Mapping[str, Any]) -> str:
        text = json.dumps({"kind": kind, "toolkit": toolkit_fingerprint(), **parts}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @contextlib.contextmanager
    def folder(self, kind: str, parts: Mapping[str, Any], build: Callable[[Path], None]) -> Iterator[Path]:
        """A folder holding the artifact ``build`` writes into an empty folder: the cached one when it exists,
        else built now (and kept when the cache is on)."""
        if not self.enabled:
            with tempfile.TemporaryDirectory(prefix=f"convnextv2-parity-{kind}-") as tmp:
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
        with tempfile.TemporaryDirectory(prefix=f"convnextv2-parity-{kind}-") as tmp:
            build(Path(tmp))
            yield Path(tmp)

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

    def arrays(self, kind: str, parts: Mapping[str, Any], compute: Callable[[], dict[str, np.ndarray]]
               ) -> dict[str, np.ndarray]:
        """Named arrays (the referee's features) computed once per key."""
        made: dict[str, dict[str, np.ndarray]] = {}

        def build(directory: Path) -> None:
            made["value"] = compute()
            np.savez(directory / "arrays.npz", **made["value"])  # type: ignore[arg-type]

        with self.folder(kind, parts, build) as directory:
            if "value" in made:
                return made["value"]
            with np.load(directory / "arrays.npz") as data:
                return {name: data[name] for name in data.files}

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
        warnings.warn(f"parity cache {reason}; running without the cache", UserWarning, stacklevel=5)
