"""Publishing: an output becomes its destination whole or not at all (docs/safety.md).

A single file is built in an anonymous file (``O_TMPFILE``) in the destination's directory and linked into
place only when complete, so a process killed at any instant leaves nothing. Where the filesystem (or the
writer) cannot use one, and for directory outputs, it is built in a temporary folder beside the destination
(converters/temp_folders.py) and renamed into place: ``renameat2`` swaps a directory in whole, ``link``
refuses a file that appeared meanwhile, and every step is fsynced. The few system calls that publish hold an
arriving signal until they are done (converters/in_progress.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from convnextv2.converters import in_progress
from convnextv2.converters.fs_faults import (
    ENVIRONMENT_ERRNOS,
    TEMP_TAG,
    check_destination,
    environment_fault,
    require_space,
)
from convnextv2.converters.in_progress import signals_deferred
from convnextv2.converters.temp_folders import (
    OLD_TAG,
    OWNER_FILE,
    make_temp_folder,
    remove_folder,
    remove_stale_temporaries,
    short_name,
)
from convnextv2.reference.errors import BadInputError


@contextlib.contextmanager
def _output(dest: Path, expected_bytes: int | None) -> Iterator[None]:
    """Around one output: free-space check, stale temporaries of earlier runs, the in-progress registry (for
    the interruption message), and OSErrors of the machine turned into one line."""
    require_space(dest, expected_bytes)
    remove_stale_temporaries(dest)
    with in_progress.writing(dest):
        try:
            yield
        except OSError as exc:
            fault = environment_fault(exc, dest, expected_bytes)
            if fault is None:
                raise
            raise fault from exc



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
    folder = make_temp_folder(dest)
    try:
        staged = folder / dest.name
        _linkat(fd, staged)
        os.replace(staged, dest)
    finally:
        remove_folder(folder)


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
        in_progress.mark_written(dest)


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
                    in_progress.mark_written(dest)
            finally:
                os.close(fd)
            return
        folder = make_temp_folder(dest)
        try:
            yield folder / dest.name
            _finish_named_file(folder / dest.name, dest, overwrite, stale_companions)
        finally:
            remove_folder(folder)


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
    folder = make_temp_folder(dest)
    try:
        yield folder / "scratch"
    finally:
        remove_folder(folder)


def _publish_copy(fd: int, dest: Path, overwrite: bool) -> None:
    folder = make_temp_folder(dest)
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
        remove_folder(folder)


@contextlib.contextmanager
def staging_folder(path: str | os.PathLike[str], *, expected_bytes: int | None = None) -> Iterator[Path]:
    """A private folder beside ``path`` (same filesystem: publishing from it is a rename) for an output that
    is checked before it is published; removed on exit. ``expected_bytes``: as for :func:`atomic_file`. It carries an owner record, so after a SIGKILL the
    next write to ``path`` removes it. Publish from it with :func:`publish_file`, :func:`publish_directory`
    or :func:`publish_with_companions` (no second temporary folder). Interrupted or failed, the message names
    ``path``, not the folder."""
    dest = Path(path)
    with _output(dest, expected_bytes):
        folder = make_temp_folder(dest)
        try:
            yield folder
        finally:
            remove_folder(folder)


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
    """Publish ``<work>/<name of path>`` and its companion files (bare names of files beside it, an ONNX
    model's ``.data``), written in ``work``, a :func:`staging_folder` of ``path``, under their final names: the
    companions first and the main file last, each by rename, so a main file in place always finds its complete
    companions. With ``overwrite``, a companion the new output lacks is removed from beside the destination."""
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
                old = dest.with_name(f".{short_name(dest.name)}.{OLD_TAG}.{os.getpid()}.{secrets.token_hex(4)}.old")
                os.replace(dest, old)
                try:
                    os.replace(tmp, dest)
                except BaseException:
                    os.replace(old, dest)  # put the old one back: nothing lost
                    raise
        elif not _renameat2(tmp, dest, _RENAME_NOREPLACE):
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        in_progress.mark_written(dest)
        if old is not None:
            remove_folder(old)


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
        folder = make_temp_folder(dest)
        try:
            os.mkdir(folder / dest.name)  # 0777 less the umask, as a plain mkdir
            yield folder / dest.name
            _finish_directory(folder / dest.name, dest)
        finally:
            remove_folder(folder)


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
        in_progress.mark_written(dest)


__all__ = ["OWNER_FILE", "atomic_directory", "atomic_file", "publish_directory", "publish_file", "publish_staged",
           "publish_with_companions", "scratch_file", "staging_folder"]


def publish_staged(work: Path, dest: Path, overwrite: bool, companions: tuple[str, ...] = ()) -> None:
    """Move what a writer left in ``work``, a :func:`staging_folder` of ``dest`` (``dest.name``, plus any
    companion files beside it), into place, atomically, straight from the staging folder (no second temporary
    folder beside the destination). ``companions``: the names the format may put beside its main file; with
    ``overwrite`` those the new output lacks are removed."""
    main = work / dest.name
    written = tuple(sorted(p.name for p in work.iterdir() if p.name not in (dest.name, OWNER_FILE)))
    if not main.exists() and not main.is_symlink():
        raise FileNotFoundError(f"{main}: the writer left no output")
    if not overwrite:
        for name in written:
            if (dest.parent / name).exists():
                raise BadInputError(f"{dest.parent / name} already exists; pass --overwrite to replace it")
    if written or companions:
        publish_with_companions(work, dest, tuple(dict.fromkeys(written + companions)), overwrite)
    elif main.is_dir():
        publish_directory(main, dest, overwrite)
    else:
        publish_file(main, dest, overwrite)
