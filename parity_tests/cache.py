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
used (converters/cache_integrity.py; once per process per entry): a damaged entry (a changed, truncated,
missing or extra file, a missing or unreadable record) is discarded and built again, never used, and reported
once, in the cache's summary (the report's ``cache.discarded``) and through the run's progress callback. A
worker's discards reach the parent's summary through :meth:`ParityCache.merge`; an entry a worker built is
checked by the parent itself when it reads it.

The cache is passed to whoever builds through it (a runner's ``RunContext``); it is never found through a module
global. The entry machinery (atomic publish, integrity, locks, eviction) is converters/entry_cache.py, shared
with the export templates (converters/templates.py). Whether an artifact came from the cache or was built, and how long each step took, a runner's context
notes (converters/runners/base.py: ``RunContext.artifact``, ``Timings``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convnextv2.converters import cache_integrity  # noqa: F401  (tests reach the integrity memo through here)
from convnextv2.converters.checkpoint import Checkpoint
from convnextv2.converters.entry_cache import EntryCache, default_root, toolkit_fingerprint  # noqa: F401


def process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports, when asked early), from /proc;
    0 where there is no /proc."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))


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


class ParityCache(EntryCache):
    """The cache a parity run builds its exports and referee through (converters/entry_cache.py), with the run's
    summary. ``root=None`` (``--no-cache``) keeps them in a temporary folder for this run only, removed by
    :meth:`close`: runtimes that read the same export still share it, and nothing survives the run."""

    def __init__(self, root: Path | None, max_bytes: int | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        super().__init__(root, max_bytes, progress)
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

    def summary(self) -> dict[str, Any]:
        record: dict[str, Any] = {"persistent": self.persistent, "root": str(self.root) if self.persistent else None,
                                  "hits": list(self.hits), "misses": list(self.misses)}
        if self.discarded:
            record["discarded"] = list(self.discarded)
        if self._broken:
            record["note"] = f"not used: {self._broken}"
        return record

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

