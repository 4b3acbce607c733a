"""Atomic, never-half-written outputs: write beside the destination, fsync, then rename over it."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from convnextv2.reference.errors import BadInputError


def check_destination(path: str | os.PathLike[str], overwrite: bool) -> Path:
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise BadInputError(f"{dest} already exists; pass --overwrite to replace it")
    if not dest.parent.exists():
        raise BadInputError(f"output directory {dest.parent} does not exist")
    return dest


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


def _publish_file(tmp: Path, dest: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, dest)
        return
    # Without --overwrite, never replace a file that appeared after check_destination: link() refuses an
    # existing name atomically, then the temporary name is dropped.
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise BadInputError(f"{dest} appeared while it was being written; pass --overwrite to replace it") from None
    except OSError:
        # Filesystems without hard links: the check made at the start is all there is.
        os.replace(tmp, dest)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the destination's directory; rename it into place on success only.

    A process killed before the rename leaves the destination untouched (absent, or the old file) and a
    ``.<name>.<random>.partial`` file beside it, which may be deleted (docs/safety.md).
    """
    dest = check_destination(path, overwrite)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the output the permissions a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        if dest.is_dir():
            raise BadInputError(f"{dest} is a directory; refusing to replace it with a file")
        _publish_file(tmp, dest, overwrite)
        _fsync_dir(dest.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` (the old one is removed only after).

    An existing destination is swapped with the new one in a single ``renameat2(RENAME_EXCHANGE)``, so at
    every instant the destination is the complete old or the complete new directory. Where the kernel or
    filesystem lacks it, two renames are used and a kill between them leaves the destination absent with
    the old directory kept as ``.<name>.<random>.old`` beside it.
    """
    dest = check_destination(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    old: Path | None = None
    try:
        yield tmp
        for child in sorted(tmp.rglob("*")):
            if child.is_file():
                with open(child, "rb+") as handle:
                    os.fsync(handle.fileno())
        _fsync_dir(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if dest.exists() or dest.is_symlink():
            if not dest.is_dir() or dest.is_symlink():
                raise BadInputError(f"{dest} exists and is not a directory; refusing to replace it")
            if _renameat2(tmp, dest, _RENAME_EXCHANGE):
                old = tmp  # the old directory now lives at the temporary name
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
                os.rmdir(old)
                os.replace(dest, old)
                os.replace(tmp, dest)
        elif not _renameat2(tmp, dest, _RENAME_NOREPLACE):
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()


@contextlib.contextmanager
def atomic_file_with_companions(path: str | os.PathLike[str], companions: tuple[str, ...] = (),
                                overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory in the destination's directory for a file that may come with companion
    files beside it (an ONNX model and its ``.data`` file): write ``<dir>/<name of path>`` and any of the
    ``companions`` (bare file names) there, under their final names, so relative references between them hold.

    On success the companions are published first and the main file last, each by rename: a main file in
    place always finds its complete companions. With ``overwrite``, a companion the new file did not write
    is removed from beside the destination afterwards (it belonged to the file just replaced). On failure
    nothing is published and the temporary directory is removed.
    """
    dest = check_destination(path, overwrite)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield work
        main = work / dest.name
        if not main.is_file():
            raise FileNotFoundError(f"{main}: the main file was not written")
        written = [name for name in companions if (work / name).is_file()]
        for file in [work / name for name in written] + [main]:
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())
            # mkdtemp's files get the creator's mode; give the outputs the permissions a plain open() would have.
            os.chmod(file, 0o666 & ~_umask())
        if dest.is_dir():
            raise BadInputError(f"{dest} is a directory; refusing to replace it with a file")
        for name in written:
            os.replace(work / name, dest.with_name(name))
        _publish_file(main, dest, overwrite)
        if overwrite:
            for name in companions:
                if name not in written:
                    with contextlib.suppress(FileNotFoundError):
                        dest.with_name(name).unlink()
        _fsync_dir(dest.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
