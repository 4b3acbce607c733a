"""Wall time and peak resident memory of a command, measured from outside it."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from typing import Any


def run_measured(command: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None,
                 timeout: float = 3600) -> dict[str, Any]:
    """Run ``command``; return wall seconds, peak RSS in bytes (the kernel's ru_maxrss of that child, via
    wait4), exit code and the tail of its output. File pages mapped by the process count in its RSS; its
    anonymous memory alone (``RssAnon``, which the kernel keeps no peak of) is sampled every few milliseconds
    while it runs: ``peak_anon_bytes``, None where there is no procfs."""
    start = time.perf_counter()
    process = subprocess.Popen(list(command), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = start + timeout
    peak_anon: int | None = None
    # wait4 gives this child's own rusage; the pipe is drained after (outputs here are a few lines).
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        anon = _rss_anon(process.pid)
        if anon is not None:
            peak_anon = max(peak_anon or 0, anon)
        if time.perf_counter() > deadline:
            process.kill()
            pid, status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(0.005)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    output = process.stdout.read().decode("utf-8", "replace") if process.stdout else ""
    if process.stdout:
        process.stdout.close()
    return {"wall_s": wall, "peak_rss_bytes": int(usage.ru_maxrss) * 1024, "peak_anon_bytes": peak_anon,
            "returncode": process.returncode, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "output_tail": output[-4000:]}


def _rss_anon(pid: int) -> int | None:
    """A running process's resident anonymous memory in bytes (/proc/PID/status RssAnon), or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def warm_file(path: str | os.PathLike[str]) -> None:
    """Read a file once so the next reader finds it in the page cache (every contender starts alike)."""
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(16 * 1024 * 1024)
        while handle.readinto(buffer):
            pass


def evict_file(path: str | os.PathLike[str]) -> None:
    """Drop one file's pages from the page cache (only that file; the rest of the machine is untouched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
