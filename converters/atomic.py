"""Atomic, never-half-written outputs, and what happens when the machine says no (docs/safety.md).

A single file is built in an anonymous file (``O_TMPFILE``) in the destination's directory and linked into
place only when complete, so a process killed at any instant leaves nothing. Where the filesystem (or the
writer) cannot use one, and for directory outputs, everything temporary lives in one folder beside the
destination, ``.<name>.convnextv2-tmp.<pid>.<random>.partial``, holding an owner record (pid, boot id,
process start time); the next write to the same destination removes such a folder once its owner is
provably gone, and never a folder without a valid record.

Faults of the environment (full disk or quota, read-only filesystem, permissions, a destination directory
that vanishes) become one :class:`EnvironmentFaultError` naming the destination and the cause. The command
line routes SIGINT, SIGTERM and SIGHUP through :func:`on_signal`, which raises :class:`Interrupted` in the
main thread so every cleanup below runs, except inside the few system calls that publish an output, where
it is held until they are done.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from convnextv2.reference.errors import BadInputError, EnvironmentFaultError, Interrupted

TEMP_TAG = "convnextv2-tmp"
OLD_TAG = "convnextv2-old"
OWNER_FILE = ".convnextv2-owner"
PENDING_OWNER_FILE = OWNER_FILE + ".pending"
# Room for the tag, pid, random part and suffix inside the 255-byte name limit of common filesystems.
_NAME_ROOM = 180

# ------------------------------------------------------------------ signals and the outputs in progress

_writing: list[Path] = []  # destinations being written now, innermost last
_written: list[Path] = []  # destinations completed since handling_signals() began
_defer_depth = 0
_pending_signal: int | None = None
_unwinding = False

HANDLED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def on_signal(signum: int, _frame: Any = None) -> None:
    """The handler the command line installs: raise :class:`Interrupted` now, or once publishing is done."""
    global _pending_signal, _unwinding
    if _unwinding:
        # Already unwinding from the first signal: a second one must not cut the cleanup short.
        return
    if _defer_depth:
        if _pending_signal is None:
            _pending_signal = signum
        return
    _unwinding = True
    writing = tuple(dict.fromkeys(str(p) for p in _writing if p not in _written))
    raise Interrupted(signum, writing, tuple(dict.fromkeys(str(p) for p in _written)))


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold an arriving signal until the block is done (publishing renames, creating and removing temporaries)."""
    global _defer_depth, _pending_signal
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        if _defer_depth == 0 and _pending_signal is not None:
            signum, _pending_signal = _pending_signal, None
            on_signal(signum)


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
    """Route SIGINT, SIGTERM and SIGHUP to :func:`on_signal` for the duration (main thread only; elsewhere
    Python cannot install handlers and the defaults stay)."""
    global _pending_signal, _unwinding, _defer_depth
    _written.clear()
    _pending_signal, _unwinding, _defer_depth = None, False, 0
    previous: dict[int, Any] = {}
    try:
        for signum in HANDLED_SIGNALS:
            previous[signum] = signal.signal(signum, on_signal)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _pending_signal, _unwinding = None, False


def _user_facing(dest: Path) -> Path:
    """The destination a user named: a path inside one of our temporary folders (a staged output) stands for
    the same name beside the folder."""
    if f".{TEMP_TAG}." in dest.parent.name and dest.parent.name.endswith(".partial"):
        return dest.parent.parent / dest.name
    return dest


def _mark_written(dest: Path) -> None:
    if _user_facing(dest) != dest:
        return  # a staged output is written, not yet published
    with contextlib.suppress(ValueError):
        _writing.remove(dest)
    _written.append(dest)


# ------------------------------------------------------------------ environment faults

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


def free_bytes(directory: Path) -> int | None:
    """Bytes an unprivileged writer may still use on ``directory``'s filesystem; None where unknown."""
    try:
        usage = os.statvfs(directory)
    except OSError:
        return None
    return usage.f_bavail * usage.f_frsize


def _read_only(directory: Path) -> bool:
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
        dest = _user_facing(dest)
        raise EnvironmentFaultError(f"{dest}: not enough space in {dest.parent}: the output needs "
                                    f"{expected_bytes:,} bytes and {free:,} are free; nothing was written")


def environment_fault(exc: OSError, dest: Path | None = None,
                      expected_bytes: int | None = None) -> EnvironmentFaultError | None:
    """The one-line error for an OSError the machine raised while writing ``dest``; None when it is not an
    environment fault (it is then a bug, and is left to surface as one)."""
    code = exc.errno
    if code not in ENVIRONMENT_ERRNOS:
        return None
    named = exc.filename if isinstance(exc.filename, str) and not _is_temporary(exc.filename) else None
    if dest is None:
        if named is None:
            return None
        return EnvironmentFaultError(f"{named}: {_ERRNO_CAUSES.get(code, os.strerror(code or 0))}")
    dest = _user_facing(dest)
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
    if code == errno.EROFS or (code in (errno.EACCES, errno.EPERM) and _read_only(parent)):
        return EnvironmentFaultError(f"{dest}: {parent} is on a read-only filesystem; nothing was written")
    where = named if named is not None and Path(named).parent != parent else str(parent)
    return EnvironmentFaultError(f"{dest}: {_ERRNO_CAUSES[code]} writing to {where}; nothing was written")


def _is_temporary(name: str) -> bool:
    return name.startswith("/proc/self/fd/") or f".{TEMP_TAG}." in name


def check_destination(path: str | os.PathLike[str], overwrite: bool) -> Path:
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise BadInputError(f"{dest} already exists; pass --overwrite to replace it")
    if not dest.parent.exists():
        raise BadInputError(f"output directory {dest.parent} does not exist")
    # Before a large source is read: the directory must take new names.
    if not _writable(dest.parent):
        cause = "is on a read-only filesystem" if _read_only(dest.parent) else "is not writable (permission denied)"
        raise EnvironmentFaultError(f"{dest}: {dest.parent} {cause}; nothing was written")
    return dest


def _writable(directory: Path) -> bool:
    mode = os.W_OK | os.X_OK
    if os.access in os.supports_effective_ids:
        return os.access(directory, mode, effective_ids=True)
    return os.access(directory, mode)


@contextlib.contextmanager
def _output(dest: Path, expected_bytes: int | None) -> Iterator[None]:
    """Around one output: free-space check, stale temporaries of earlier runs, the in-progress registry (for
    the interruption message), and OSErrors of the machine turned into one line."""
    shown = _user_facing(dest)
    require_space(dest, expected_bytes)
    remove_stale_temporaries(dest)
    _writing.append(shown)
    try:
        yield
    except OSError as exc:
        fault = environment_fault(exc, dest, expected_bytes)
        if fault is None:
            raise
        raise fault from exc
    finally:
        with contextlib.suppress(ValueError):
            _writing.remove(shown)


# ------------------------------------------------------------------ temporary folders and their owners

def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, a name for
    one process that a recycled pid does not share."""
    try:
        line = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""
    fields = line.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def _owner_record() -> dict[str, Any]:
    return {"tool": "convnextv2", "pid": os.getpid(), "boot_id": _boot_id(), "start_time": _start_time(os.getpid())}


def owner_gone(record: dict[str, Any]) -> bool:
    """True only when the process that wrote ``record`` provably no longer runs."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    boot = _boot_id()
    if record.get("boot_id") and boot and record["boot_id"] != boot:
        return True  # written before a reboot
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = _start_time(pid)
    return bool(record.get("start_time") and start and start != record["start_time"])  # the pid was recycled


def _short(name: str) -> str:
    return name if len(name.encode()) <= _NAME_ROOM else name.encode()[:_NAME_ROOM].decode(errors="ignore")


def _temp_prefix(dest: Path) -> str:
    return f".{_short(dest.name)}.{TEMP_TAG}."


def _read_owner(folder: Path) -> dict[str, Any] | None:
    marker = folder / OWNER_FILE
    try:
        info = marker.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
            return None
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("tool") != "convnextv2":
        return None
    # The pid in the folder's name must be the record's: a record copied into another folder is not trusted.
    if folder.name.split(".")[-3:-2] != [str(record.get("pid"))]:
        return None
    return record


def remove_stale_temporaries(dest: Path) -> list[Path]:
    """Remove the temporary folders of earlier writes to ``dest`` whose owner is provably gone (killed with
    SIGKILL, a power cut). A folder without a valid owner record, or whose owner may still run, is kept."""
    removed: list[Path] = []
    prefix = _temp_prefix(dest)
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".partial")):
            continue
        with contextlib.suppress(OSError):
            if not entry.is_dir(follow_symlinks=False):
                continue
            folder = Path(entry.path)
            record = _read_owner(folder)
            if (record is not None and owner_gone(record)) or (record is None and _unfinished_and_abandoned(folder)):
                _remove_folder(folder)
                removed.append(folder)
    return removed


def _make_temp_folder(dest: Path) -> Path:
    folder: Path | None = None
    try:
        with signals_deferred():  # a signal never leaves a folder without its owner record
            folder = _new_temp_folder(dest)
    except BaseException:
        # A signal held while the folder was made is raised as the block ends, before the caller holds the
        # folder to remove it.
        if folder is not None:
            _remove_folder(folder)
        raise
    return folder


def _new_temp_folder(dest: Path) -> Path:
    """A temporary folder beside ``dest`` with its owner record; removed again if the record cannot be made."""
    folder = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(dest)}{os.getpid()}.", suffix=".partial",
                                   dir=dest.parent))
    pending = folder / PENDING_OWNER_FILE
    try:
        # Written aside and renamed: a SIGKILL can leave the folder without its record (see
        # _unfinished_and_abandoned), never with half of one.
        fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, json.dumps(_owner_record()).encode())
            os.fsync(fd)  # a record lost in a power cut would keep the folder forever
        finally:
            os.close(fd)
        os.rename(pending, folder / OWNER_FILE)
    except BaseException:
        for name in (PENDING_OWNER_FILE, OWNER_FILE):
            with contextlib.suppress(OSError):
                os.unlink(folder / name)
        with contextlib.suppress(OSError):
            os.rmdir(folder)
        raise
    return folder


def _unfinished_and_abandoned(folder: Path) -> bool:
    """A folder killed before its owner record was in place: it holds nothing but (part of) the pending
    record, and the pid in its name, the process that made it, no longer runs. (A recycled pid keeps it.)"""
    try:
        if not set(os.listdir(folder)) <= {PENDING_OWNER_FILE}:
            return False
        pid = int(folder.name.split(".")[-3])
    except (OSError, ValueError, IndexError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _remove_folder(folder: Path) -> None:
    """Remove a temporary folder, its owner record last: interrupted half-way, it is still recognisable."""
    with signals_deferred():
        for root, dirs, files in os.walk(folder, topdown=False):
            for name in files:
                if not (name == OWNER_FILE and Path(root) == folder):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(root, name))
            for name in dirs:
                path = os.path.join(root, name)
                with contextlib.suppress(FileNotFoundError):
                    if os.path.islink(path):
                        os.unlink(path)
                    else:
                        os.rmdir(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / OWNER_FILE)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(folder)


# ------------------------------------------------------------------ publishing

def _fsync_dir(directory: Path) -> None:
    # Without this the rename itself may not survive a power cut on some filesystems.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux renameat2(2); False where the kernel, libc or filesystem lacks it (the caller falls back)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = function(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), ctypes.c_uint(flags))
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    if error == errno.EEXIST:
        raise BadInputError(f"{target} appeared while it was being written; pass --overwrite to replace it")
    raise OSError(error, os.strerror(error), str(target))


def _appeared(dest: Path) -> BadInputError:
    return BadInputError(f"{dest} appeared while it was being written; pass --overwrite to replace it")


def _publish_file(tmp: Path, dest: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, dest)
        return
    # Without --overwrite, never replace a file that appeared after check_destination: link() refuses an
    # existing name atomically, then the temporary name is dropped.
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise _appeared(dest) from None
    except OSError as exc:
        if exc.errno in ENVIRONMENT_ERRNOS and exc.errno != errno.EPERM:
            raise
        # Filesystems without hard links: the check made at the start is all there is.
        os.replace(tmp, dest)
        return
    tmp.unlink()


def _open_anonymous(directory: Path) -> int | None:
    """An unnamed file in ``directory`` (O_TMPFILE), or None where the kernel or filesystem has none."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        # The mode passes through the umask, as for a plain open().
        return os.open(directory, flag | os.O_RDWR | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        # EOPNOTSUPP: the filesystem has no O_TMPFILE; EISDIR/EINVAL: the kernel predates it.
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


def _link_anonymous(fd: int, dest: Path, overwrite: bool) -> None:
    """Give the anonymous file its name. linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N cannot replace a
    name, so with --overwrite it is linked inside a temporary folder first and renamed over the old file."""
    if not overwrite:
        try:
            _linkat(fd, dest)
        except FileExistsError:
            raise _appeared(dest) from None
        return
    folder = _make_temp_folder(dest)
    try:
        staged = folder / dest.name
        _linkat(fd, staged)
        os.replace(staged, dest)
    finally:
        _remove_folder(folder)


def _linkat(fd: int, target: Path) -> None:
    # os.link() passes AT_SYMLINK_FOLLOW (needed to link what /proc/self/fd/N points at, not the magic link
    # itself) only on the linkat() path, which a directory descriptor selects.
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(f"/proc/self/fd/{fd}", target.name, dst_dir_fd=directory, follow_symlinks=True)
    finally:
        os.close(directory)


def _refuse_directory(dest: Path) -> None:
    if dest.is_dir():
        raise BadInputError(f"{dest} is a directory; refusing to replace it with a file")


def _remove_companions(dest: Path, names: tuple[str, ...], overwrite: bool) -> None:
    # After the main file is in place: a crash before this leaves the new file and a stray old companion,
    # never an old main file without its companion.
    if overwrite:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                dest.with_name(name).unlink()


def _finish_named_file(tmp: Path, dest: Path, overwrite: bool, stale_companions: tuple[str, ...] = ()) -> None:
    """Publish ``tmp``, a complete file inside one of our temporary folders, as ``dest``."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    # Writers may move in a file made elsewhere; give the output the permissions a plain open() would have.
    os.chmod(tmp, 0o666 & ~_umask())
    _refuse_directory(dest)
    with signals_deferred():
        _publish_file(tmp, dest, overwrite)
        _remove_companions(dest, stale_companions, overwrite)
        _fsync_dir(dest.parent)
        _mark_written(dest)


# Destinations whose output file is already being built by anonymous_output: a writer's own atomic_file(dest)
# inside that block writes straight into it instead of making a second temporary.
_adopted: dict[str, Path] = {}


@contextlib.contextmanager
def anonymous_output(path: str | os.PathLike[str], overwrite: bool = False, *,
                     expected_bytes: int | None = None, stale_companions: tuple[str, ...] = ()) -> Iterator[Path]:
    """:func:`atomic_file` for a caller that checks the output before it is published (converters.save reads
    every output back): yields the unnamed file's path (``/proc/self/fd/N``, or the named fallback), which a
    writer's own ``atomic_file(path)`` inside the block fills; published as ``path`` when the block succeeds,
    so a process killed before that leaves nothing at all. Only for files a reader recognises by content:
    the path has no name of its own to read back."""
    key = os.fspath(path)
    with atomic_file(path, overwrite, expected_bytes=expected_bytes, stale_companions=stale_companions) as target:
        _adopted[key] = target
        try:
            yield target
        finally:
            _adopted.pop(key, None)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], overwrite: bool = False, *, expected_bytes: int | None = None,
                named: bool = False, stale_companions: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a path to write the output to; it becomes ``path`` on success only.

    The path is ``/proc/self/fd/N`` of an anonymous file in the destination's directory where the
    filesystem supports ``O_TMPFILE`` (a killed process leaves nothing); open it by name (``open``, a
    library's ``save(path)``) but do not rename anything onto it or derive sibling names from it. Writers that
    must (``named=True``), and filesystems without ``O_TMPFILE``, get ``<temporary folder>/<name>`` instead.
    ``expected_bytes``, where the writer knows its output size, is checked against the free space first.
    ``stale_companions`` (bare file names) are files the replaced output may have had beside it (an ONNX
    model's ``.data``) and this one has not: with ``overwrite`` they are removed once the new file is in place.
    """
    adopted = _adopted.get(os.fspath(path))
    if adopted is not None:  # the caller of anonymous_output publishes it; the writer only fills it
        require_space(Path(path), expected_bytes)
        yield adopted
        return
    dest = check_destination(path, overwrite)
    with _output(dest, expected_bytes):
        with signals_deferred():
            fd = None if named else _open_anonymous(dest.parent)
        if fd is not None:
            try:
                yield Path(f"/proc/self/fd/{fd}")
                os.fsync(fd)
                _refuse_directory(dest)
                with signals_deferred():
                    try:
                        _link_anonymous(fd, dest, overwrite)
                    except OSError as exc:
                        if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS):
                            raise
                        _publish_copy(fd, dest, overwrite)  # a filesystem refusing links to /proc files
                    _remove_companions(dest, stale_companions, overwrite)
                    _fsync_dir(dest.parent)
                    _mark_written(dest)
            finally:
                os.close(fd)
            return
        folder = _make_temp_folder(dest)
        try:
            yield folder / dest.name
            _finish_named_file(folder / dest.name, dest, overwrite, stale_companions)
        finally:
            _remove_folder(folder)


@contextlib.contextmanager
def scratch_file(beside: str | os.PathLike[str]) -> Iterator[Path]:
    """An unnamed scratch file on the filesystem of ``beside``, for a library's intermediate output that the
    writer reads and discards: yields a path to open by name (``/proc/self/fd/N``), like :func:`atomic_file`'s.
    A process killed while it exists leaves nothing. Where the filesystem has no ``O_TMPFILE`` it is a file in
    a marked temporary folder, which the next write to ``beside`` removes."""
    dest = Path(beside)
    with signals_deferred():
        fd = _open_anonymous(dest.parent)
    if fd is not None:
        try:
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    folder = _make_temp_folder(dest)
    try:
        yield folder / "scratch"
    finally:
        _remove_folder(folder)


def _publish_copy(fd: int, dest: Path, overwrite: bool) -> None:
    folder = _make_temp_folder(dest)
    try:
        tmp = folder / dest.name
        with open(tmp, "wb") as out:
            offset, size = 0, os.fstat(fd).st_size
            while offset < size:
                chunk = os.pread(fd, min(16 << 20, size - offset), offset)
                out.write(chunk)
                offset += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        _publish_file(tmp, dest, overwrite)
    finally:
        _remove_folder(folder)


@contextlib.contextmanager
def staging_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A private folder beside ``path`` (same filesystem: publishing from it is a rename) for an output that
    is checked before it is published; removed on exit. It carries an owner record, so after a SIGKILL the
    next write to ``path`` removes it. Publish from it with :func:`publish_file`, :func:`publish_directory`
    or :func:`publish_with_companions` (no second temporary folder). Interrupted or failed, the message names
    ``path``, not the folder."""
    dest = Path(path)
    with _output(dest, None):
        folder = _make_temp_folder(dest)
        try:
            yield folder
        finally:
            _remove_folder(folder)


def _require_staged(source: Path, dest: Path) -> None:
    # Publishing is a rename: the source must be one of our temporary folders beside the destination.
    if source.parent.parent.resolve() != dest.parent.resolve() or f".{TEMP_TAG}." not in source.parent.name:
        raise ValueError(f"{source} is not inside a staging_folder({dest})")


def publish_file(source: str | os.PathLike[str], path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Publish a complete file written inside :func:`staging_folder` (``path``) as ``path``, atomically."""
    source, dest = Path(source), check_destination(path, overwrite)
    _require_staged(source, dest)
    with _output(dest, None):
        _finish_named_file(source, dest, overwrite)


def publish_directory(source: str | os.PathLike[str], path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Publish a complete directory written inside :func:`staging_folder` (``path``) as ``path``; an old
    destination ends up at ``source``, removed with the staging folder."""
    source, dest = Path(source), check_destination(path, overwrite)
    _require_staged(source, dest)
    with _output(dest, None):
        _finish_directory(source, dest)


def publish_with_companions(work: str | os.PathLike[str], path: str | os.PathLike[str],
                            companions: tuple[str, ...] = (), overwrite: bool = False) -> None:
    """Publish ``<work>/<name of path>`` and its companion files (see :func:`atomic_file_with_companions`),
    written in ``work``, a :func:`staging_folder` of ``path``."""
    work, dest = Path(work), check_destination(path, overwrite)
    _require_staged(work / dest.name, dest)
    with _output(dest, None):
        _finish_companions(work, dest, companions, overwrite)


def _fsync_tree(root: Path) -> None:
    for child in sorted(root.rglob("*")):
        if child.is_file() and not child.is_symlink():
            with open(child, "rb+") as handle:
                os.fsync(handle.fileno())
        elif child.is_dir() and not child.is_symlink():
            _fsync_dir(child)
    _fsync_dir(root)


def _finish_directory(tmp: Path, dest: Path) -> None:
    """Swap the complete directory ``tmp`` (inside one of our temporary folders) in as ``dest``."""
    _fsync_tree(tmp)
    old: Path | None = None
    with signals_deferred():
        if dest.exists() or dest.is_symlink():
            if not dest.is_dir() or dest.is_symlink():
                raise BadInputError(f"{dest} exists and is not a directory; refusing to replace it")
            # After an exchange the old directory lives at the temporary name, inside the folder that is
            # removed afterwards.
            if not _renameat2(tmp, dest, _RENAME_EXCHANGE):
                old = dest.with_name(f".{_short(dest.name)}.{OLD_TAG}.{os.getpid()}.{secrets.token_hex(4)}.old")
                os.replace(dest, old)
                try:
                    os.replace(tmp, dest)
                except BaseException:
                    os.replace(old, dest)  # put the old one back: nothing lost
                    raise
        elif not _renameat2(tmp, dest, _RENAME_NOREPLACE):
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        _mark_written(dest)
        if old is not None:
            _remove_folder(old)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False, *,
                     expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a directory to fill; on success it replaces ``path`` (the old one is removed only after).

    The directory lives inside one temporary folder beside the destination. An existing destination is
    swapped with the new one in a single ``renameat2(RENAME_EXCHANGE)``, so at every instant the destination is
    the complete old or the complete new directory. Where the kernel or filesystem lacks it, two renames are
    used and a kill between them leaves the destination absent with the old directory kept, intact, as
    ``.<name>.convnextv2-old.<pid>.<random>.old`` beside it (it is the user's data: never removed for them).
    """
    dest = check_destination(path, overwrite)
    with _output(dest, expected_bytes):
        folder = _make_temp_folder(dest)
        try:
            os.mkdir(folder / dest.name)  # 0777 less the umask, as a plain mkdir
            yield folder / dest.name
            _finish_directory(folder / dest.name, dest)
        finally:
            _remove_folder(folder)


def _finish_companions(work: Path, dest: Path, companions: tuple[str, ...], overwrite: bool) -> None:
    main = work / dest.name
    if not main.is_file():
        raise FileNotFoundError(f"{main}: the main file was not written")
    written = [name for name in companions if (work / name).is_file()]
    for file in [work / name for name in written] + [main]:
        with open(file, "rb+") as handle:
            os.fsync(handle.fileno())
        # Files made by a library get its mode; give the outputs the permissions a plain open() would have.
        os.chmod(file, 0o666 & ~_umask())
    _refuse_directory(dest)
    with signals_deferred():
        for name in written:
            os.replace(work / name, dest.with_name(name))
        _publish_file(main, dest, overwrite)
        _remove_companions(dest, tuple(name for name in companions if name not in written), overwrite)
        _fsync_dir(dest.parent)
        _mark_written(dest)


@contextlib.contextmanager
def atomic_file_with_companions(path: str | os.PathLike[str], companions: tuple[str, ...] = (),
                                overwrite: bool = False, *, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory in the destination's directory for a file that may come with companion
    files beside it (an ONNX model and its ``.data`` file): write ``<dir>/<name of path>`` and any of the
    ``companions`` (bare file names) there, under their final names, so relative references between them hold.

    On success the companions are published first and the main file last, each by rename: a main file in
    place always finds its complete companions. With ``overwrite``, a companion the new file did not write
    is removed from beside the destination afterwards (it belonged to the file just replaced). On failure
    nothing is published and the temporary directory is removed. The directory is a temporary folder with an
    owner record, like :func:`atomic_directory`'s.
    """
    dest = check_destination(path, overwrite)
    with _output(dest, expected_bytes):
        work = _make_temp_folder(dest)
        try:
            yield work
            _finish_companions(work, dest, companions, overwrite)
        finally:
            _remove_folder(work)
