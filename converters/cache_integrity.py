"""What a cache entry (the parity cache's, an export template's) stores, checked against its record.

An entry's record (``entry.json``) lists every file the entry holds with its size and sha256, written when the
entry is built. Before an entry is used its files are checked against that list: a changed, truncated, missing
or extra file, or a record that is missing or unreadable, makes the entry unusable (:func:`problem` says why),
so a damaged export or referee can never reach a verdict.

Hashing an entry costs about a second per GB, so each entry is hashed once per process: a check that passed is
remembered with the files' identities (size, inode, modification and change times), and the next read of the
same entry in this process hashes again only if one of them changed (a file rewritten, replaced or truncated
meanwhile changes them). Another process (a parity worker, the next run) checks for itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

RECORD = "entry.json"
_CHUNK = 8 << 20

# Entries whose files matched their record in this process, by folder: the record's file list and the files'
# identities at that moment. Not how the cache is passed (that is the ParityCache object): a memo of hashing done.
_checked: dict[str, tuple[str, tuple[tuple[str, int, int, int, int], ...]]] = {}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stored_files(folder: Path) -> list[str]:
    """Every file under ``folder`` but the record, as sorted relative POSIX paths."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                  if path.name != RECORD or path.parent != folder
                  if path.is_file() or path.is_symlink())


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """What the record keeps of a freshly built entry: each stored file's size and sha256."""
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)}
            for name in _stored_files(folder)}


def _identities(folder: Path, names: list[str]) -> tuple[tuple[str, int, int, int, int], ...]:
    identities = []
    for name in names:
        status = (folder / name).stat()
        identities.append((name, status.st_size, status.st_ino, status.st_mtime_ns, status.st_ctime_ns))
    return tuple(identities)


def _listed(files: Any) -> bool:
    return isinstance(files, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
        for entry in files.values())


def remember(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    """``folder`` was just built by this process with these ``files``: its first read here need not hash it."""
    names = sorted(files)
    try:
        _checked[str(folder)] = (json.dumps(files, sort_keys=True), _identities(folder, names))
    except OSError:
        _checked.pop(str(folder), None)


def problem(folder: Path) -> str | None:
    """Why the entry in ``folder`` cannot be used, or None when its files are exactly what its record lists."""
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"its record {RECORD} is missing"
    except (OSError, ValueError) as exc:
        return f"its record {RECORD} is unreadable ({exc.__class__.__name__})"
    files = record.get("files") if isinstance(record, dict) else None
    if not _listed(files):
        return f"its record {RECORD} lists no file digests"
    try:
        present = _stored_files(folder)
        missing = sorted(set(files) - set(present))
        if missing:
            return f"{missing[0]} is missing"
        extra = sorted(set(present) - set(files))
        if extra:
            return f"{extra[0]} was not in it when it was built"
        listed = json.dumps(files, sort_keys=True)
        identities = _identities(folder, present)
        if _checked.get(str(folder)) == (listed, identities):
            return None
        for name, size, *_ in identities:
            if size != files[name]["bytes"]:
                return f"{name} is {size} bytes, {files[name]['bytes']} when it was built"
        for name in present:
            if sha256_of(folder / name) != files[name]["sha256"]:
                return f"{name} does not match the sha256 recorded when it was built"
    except OSError as exc:
        return f"its files cannot be read ({exc.strerror or exc})"
    _checked[str(folder)] = (listed, identities)
    return None


def forget(folder: Path) -> None:
    """``folder`` is going (discarded or evicted): a new entry there is checked afresh."""
    _checked.pop(str(folder), None)
