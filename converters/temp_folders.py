"""Temporary folders beside a destination, and who owns them (docs/safety.md).

Where an output cannot be built in an unnamed file, everything temporary lives in one folder beside the
destination, ``.<name>.convnextv2-tmp.<pid>.<random>.partial``, holding an owner record (pid, boot id, process
start time); the next write to the same destination removes such a folder once its owner is provably gone, and
never a folder without a valid record.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from convnextv2.converters.fs_faults import TEMP_TAG
from convnextv2.converters.in_progress import signals_deferred

OLD_TAG = "convnextv2-old"
OWNER_FILE = ".convnextv2-owner"
PENDING_OWNER_FILE = OWNER_FILE + ".pending"
# Room for the tag, pid, random part and suffix inside the 255-byte name limit of common filesystems.
_NAME_ROOM = 180


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


def short_name(name: str) -> str:
    return name if len(name.encode()) <= _NAME_ROOM else name.encode()[:_NAME_ROOM].decode(errors="ignore")


def _temp_prefix(dest: Path) -> str:
    return f".{short_name(dest.name)}.{TEMP_TAG}."


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
                remove_folder(folder)
                removed.append(folder)
    return removed


def make_temp_folder(dest: Path) -> Path:
    folder: Path | None = None
    try:
        with signals_deferred():  # a signal never leaves a folder without its owner record
            folder = _new_temp_folder(dest)
    except BaseException:
        # A signal held while the folder was made is raised as the block ends, before the caller holds the
        # folder to remove it.
        if folder is not None:
            remove_folder(folder)
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


def remove_folder(folder: Path) -> None:
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



__all__ = ["OLD_TAG", "OWNER_FILE", "PENDING_OWNER_FILE", "make_temp_folder", "owner_gone", "remove_folder",
           "remove_stale_temporaries", "short_name"]
