"""What happens when the machine says no: a full disk or quota, a read-only filesystem, a permission, a
destination directory that vanishes (docs/safety.md).

Each becomes one :class:`EnvironmentFaultError` naming the destination the user gave (never one of our
temporary names) and the cause. ``check_destination`` refuses before a large source is read;
``require_space`` before a gigabyte is written.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from convnextv2.reference.errors import BadInputError, EnvironmentFaultError

# The tag in the name of every temporary folder beside a destination (converters/temp_folders.py): a path
# inside one stands, in a message, for the same name beside the folder.
TEMP_TAG = "convnextv2-tmp"

_ERRNO_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only filesystem",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
    errno.EFBIG: "file too large for the filesystem",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
    errno.ESTALE: "stale file handle (network filesystem)",
    errno.ENOTDIR: "a path component is not a directory",
}
ENVIRONMENT_ERRNOS = frozenset(_ERRNO_CAUSES) | {errno.ENOENT}


def user_facing(dest: Path) -> Path:
    """The destination a user named: a path inside one of our temporary folders (a staged output) stands for
    the same name beside the folder."""
    if f".{TEMP_TAG}." in dest.parent.name and dest.parent.name.endswith(".partial"):
        return dest.parent.parent / dest.name
    return dest


def is_temporary(name: str) -> bool:
    return name.startswith("/proc/self/fd/") or f".{TEMP_TAG}." in name


def free_bytes(directory: Path) -> int | None:
    """Bytes an unprivileged writer may still use on ``directory``'s filesystem; None where unknown."""
    try:
        usage = os.statvfs(directory)
    except OSError:
        return None
    return usage.f_bavail * usage.f_frsize


def read_only(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def require_space(dest: Path, expected_bytes: int | None) -> None:
    """Fail in the first second, not after writing a gigabyte, when the output cannot fit."""
    if not expected_bytes:
        return
    free = free_bytes(dest.parent)
    if free is not None and expected_bytes > free:
        dest = user_facing(dest)
        raise EnvironmentFaultError(f"{dest}: not enough space in {dest.parent}: the output needs "
                                    f"{expected_bytes:,} bytes and {free:,} are free; nothing was written")


def environment_fault(exc: OSError, dest: Path | None = None,
                      expected_bytes: int | None = None) -> EnvironmentFaultError | None:
    """The one-line error for an OSError the machine raised while writing ``dest``; None when it is not an
    environment fault (it is then a bug, and is left to surface as one)."""
    code = exc.errno
    if code not in ENVIRONMENT_ERRNOS:
        return None
    named = exc.filename if isinstance(exc.filename, str) and not is_temporary(exc.filename) else None
    if dest is None:
        if named is None:
            return None
        return EnvironmentFaultError(f"{named}: {_ERRNO_CAUSES.get(code, os.strerror(code or 0))}")
    dest = user_facing(dest)
    parent = dest.parent
    if code == errno.ENOENT:
        if parent.is_dir():
            return None  # a missing file that is not the destination's directory: not ours to explain
        return EnvironmentFaultError(f"{dest}: the output directory {parent} vanished while it was being "
                                     "written; nothing was written")
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(parent)
        cause = "no space left" if code == errno.ENOSPC else "disk quota exceeded"
        have = f"{free:,} bytes free" if free is not None else "the free space unknown"
        need = f"the output needs {expected_bytes:,} bytes, {have}" if expected_bytes else f"{have}, the output needs more"
        return EnvironmentFaultError(f"{dest}: {cause} in {parent} ({need}); nothing was written")
    if code == errno.EROFS or (code in (errno.EACCES, errno.EPERM) and read_only(parent)):
        return EnvironmentFaultError(f"{dest}: {parent} is on a read-only filesystem; nothing was written")
    where = named if named is not None and Path(named).parent != parent else str(parent)
    return EnvironmentFaultError(f"{dest}: {_ERRNO_CAUSES[code]} writing to {where}; nothing was written")


def check_destination(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse, before any work, a destination that exists (without ``overwrite``), whose directory does not
    exist, or whose directory takes no new names."""
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise BadInputError(f"{dest} already exists; pass --overwrite to replace it")
    if not dest.parent.exists():
        raise BadInputError(f"output directory {dest.parent} does not exist")
    if not _writable(dest.parent):
        cause = "is on a read-only filesystem" if read_only(dest.parent) else "is not writable (permission denied)"
        raise EnvironmentFaultError(f"{dest}: {dest.parent} {cause}; nothing was written")
    return dest


def _writable(directory: Path) -> bool:
    mode = os.W_OK | os.X_OK
    if os.access in os.supports_effective_ids:
        return os.access(directory, mode, effective_ids=True)
    return os.access(directory, mode)


__all__ = ["ENVIRONMENT_ERRNOS", "TEMP_TAG", "check_destination", "environment_fault", "free_bytes", "is_temporary",
           "read_only", "require_space", "user_facing"]
