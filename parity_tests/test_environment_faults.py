"""Faults of the machine, produced for real: a full tmpfs, a read-only mount, a directory the writer may not
enter, a destination directory removed mid-write, SIGTERM/SIGHUP/SIGINT/SIGKILL sent to a running conversion.

Each fault must give one line naming the destination and the cause, the documented exit code (3 for the
machine's refusals, 128+N for signal N) and nothing left behind. The mounts need root (or CAP_SYS_ADMIN); where
mounting is impossible those tests skip and say so. Signals are sent to a conversion stopped (SIGSTOP) while
its temporary output is open, so the signal lands mid-write every time, not by luck of timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convnextv2 import converters, fixtures
from convnextv2.converters import fs_faults, publishing, temp_folders
from convnextv2.converters.cli import signals

CLI = [sys.executable, "-m", "convnextv2.converters"]
ENV = {**os.environ, "CONVNEXTV2_PROGRESS": "0"}
EXIT_ENVIRONMENT = 3

# Runs the CLI with a fault armed from inside, where only the inside can place it at an exact moment.
# FAULT: "no-precheck" (the free-space check is skipped, so the disk fills mid-write: the kernel's ENOSPC);
# "vanish" (the destination's directory is removed when the first tensor is written); "named" (as on a
# filesystem without O_TMPFILE) may be combined with either, comma-separated.
DRIVER = r"""
import os, shutil, sys
from convnextv2.converters import publishing, streaming

faults = set(os.environ["FAULT"].split(","))
if "no-precheck" in faults:
    publishing.require_space = lambda dest, expected_bytes: None
if "named" in faults:
    publishing._open_anonymous = lambda directory: None
if "vanish" in faults:
    target = os.path.dirname(os.path.abspath(sys.argv[sys.argv.index("-o") + 1]))
    real = streaming.TensorStreamer.write_array
    def write_array(self, array):
        if os.path.isdir(target):
            shutil.rmtree(target)
        return real(self, array)
    streaming.TensorStreamer.write_array = write_array
from convnextv2.converters.cli import main
main(sys.argv[1:])
"""


def _cli(*args: str, fault: str | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    command = [*prefix, sys.executable, "-c", DRIVER, *args] if fault else [*prefix, *CLI, *args]
    return subprocess.run(command, env={**ENV, "FAULT": fault or ""}, capture_output=True, text=True, timeout=600)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@contextlib.contextmanager
def _tmpfs(directory: Path, options: str):
    directory.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here: the environment-fault tests mount a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def _payload_bytes(path: Path) -> int:
    ckpt = converters.load(path)
    return sum(int(a.size) * a.dtype.itemsize for _, a in ckpt.ordered_tensors())


@pytest.fixture(scope="module")
def atto(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "atto.pt"
    fixtures.write_fixture(path, "atto", "original", seed=3)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Large enough (115 MB) that a conversion is caught mid-write by polling."""
    path = tmp_path_factory.mktemp("faults-tiny") / "tiny.pt"
    fixtures.write_fixture(path, "tiny", "original", seed=3)
    return path


DESTINATIONS = {"hf": "out-dir", "canonical": "out.safetensors", "original": "out.pt", "keras": "out.keras",
                "keras-h5": "out.weights.h5", "onnx": "out.onnx"}


def _destination(directory: Path, fmt: str) -> Path:
    return directory / DESTINATIONS[fmt]


# ------------------------------------------------------------------ full disk

@pytest.mark.parametrize("fmt", ["canonical", "hf", pytest.param("original", marks=pytest.mark.slow)])
def test_full_disk_is_refused_before_anything_is_written(tmp_path, atto, fmt):
    with _tmpfs(tmp_path / "small", "size=4m") as small:
        free = fs_faults.free_bytes(small)
        dst = _destination(small, fmt)
        result = _cli("convert", str(atto), "-o", str(dst), "--to", fmt)
        assert result.returncode == EXIT_ENVIRONMENT, result.stderr[-3000:]
        line = _one_error_line(result)
        match = re.fullmatch(rf"error: {re.escape(str(dst))}: not enough space in {re.escape(str(small))}: the output "
                             r"needs ([\d,]+) bytes and ([\d,]+) are free; nothing was written", line)
        assert match, line
        needed, said_free = (int(g.replace(",", "")) for g in match.groups())
        # Free space as it was when checked (the temporary folder beside the destination holds a block or two).
        assert needed >= _payload_bytes(atto) and free - 65536 <= said_free <= free
        assert os.listdir(small) == [] and fs_faults.free_bytes(small) == free


@pytest.mark.parametrize(("fmt", "fault"), [("canonical", "no-precheck"), ("canonical", "no-precheck,named"),
                                            ("hf", "no-precheck"),
                                            pytest.param("original", "no-precheck", marks=pytest.mark.slow)])
def test_disk_filling_up_mid_write_leaves_nothing(tmp_path, atto, fmt, fault):
    """The free-space check is skipped so the kernel itself says ENOSPC half-way through the tensors."""
    with _tmpfs(tmp_path / "small", "size=6m") as small:
        free = fs_faults.free_bytes(small)
        dst = _destination(small, fmt)
        result = _cli("convert", str(atto), "-o", str(dst), "--to", fmt, fault=fault)
        assert result.returncode == EXIT_ENVIRONMENT, result.stderr[-3000:]
        line = _one_error_line(result)
        assert re.fullmatch(rf"error: {re.escape(str(dst))}: no space left in {re.escape(str(small))} \(.*bytes free"
                            r".*\); nothing was written", line), line
        # Nothing left: no name, and no space held by an unnamed file either.
        assert os.listdir(small) == [] and fs_faults.free_bytes(small) == free


# ------------------------------------------------------------------ read-only, permissions, a vanishing directory

@pytest.mark.parametrize("command", ["convert-canonical", pytest.param("convert-hf", marks=pytest.mark.slow), "fixture",
                                     "parity-report"])
def test_read_only_filesystem(tmp_path, atto, command):
    with _tmpfs(tmp_path / "ro", "ro,size=4m") as ro:
        dst = ro / ("out-dir" if command == "convert-hf" else "report.json" if command == "parity-report"
                    else "out.safetensors")
        args = {"convert-canonical": ["convert", str(atto), "-o", str(dst), "--to", "canonical"],
                "convert-hf": ["convert", str(atto), "-o", str(dst), "--to", "hf"],
                "fixture": ["fixture", "-o", str(dst), "--format", "canonical"],
                "parity-report": ["parity", str(atto), "--runtimes", "torch", "--report", str(dst)]}[command]
        result = _cli(*args)
        assert result.returncode == EXIT_ENVIRONMENT, result.stderr[-3000:]
        assert _one_error_line(result) == (f"error: {dst}: {ro} is on a read-only filesystem; nothing was written")
        assert os.listdir(ro) == []


def _without_dac_override() -> tuple[str, ...]:
    """A command prefix under which the write-permission bits bind: root bypasses them through the
    CAP_DAC_OVERRIDE capability, so root drops it (and CAP_DAC_READ_SEARCH) for the command."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv(1): cannot drop CAP_DAC_OVERRIDE to make a 0555 directory bind")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search")


@pytest.mark.parametrize("fmt", ["canonical", pytest.param("hf", marks=pytest.mark.slow)])
def test_permission_denied(tmp_path, atto, fmt):
    prefix = _without_dac_override()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        dst = _destination(locked, fmt)
        result = _cli("convert", str(atto), "-o", str(dst), "--to", fmt, prefix=prefix)
        assert result.returncode == EXIT_ENVIRONMENT, result.stderr[-3000:]
        assert _one_error_line(result) == (f"error: {dst}: {locked} is not writable (permission denied); "
                                           "nothing was written")
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("fault", ["vanish", "vanish,named"])
@pytest.mark.parametrize("fmt", ["canonical", "hf"])
def test_destination_directory_vanishing_mid_write(tmp_path, atto, fmt, fault):
    out = tmp_path / "out"
    out.mkdir()
    dst = _destination(out, fmt)
    result = _cli("convert", str(atto), "-o", str(dst), "--to", fmt, fault=fault)
    assert result.returncode == EXIT_ENVIRONMENT, result.stderr[-3000:]
    assert _one_error_line(result) == (f"error: {dst}: the output directory {out} vanished while it was being "
                                       "written; nothing was written")
    assert not out.exists() and os.listdir(tmp_path) == []


# ------------------------------------------------------------------ signals

def _open_under(pid: int, directory: Path, min_bytes: int = 0) -> bool:
    """Whether process ``pid`` holds a file of at least ``min_bytes`` open under ``directory`` (an unnamed
    O_TMPFILE file shows as ``<dir>/#<inode> (deleted)``)."""
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if (os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{directory}/")
                        and os.stat(f"/proc/{pid}/fd/{fd}").st_size >= min_bytes):
                    return True
    return False


def _stopped_mid_write(args: list[str], directory: Path, min_bytes: int = 0) -> subprocess.Popen[str]:
    process = subprocess.Popen([*CLI, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not _open_under(process.pid, directory, min_bytes):
        assert process.poll() is None, f"finished before it was caught writing: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "the output was never opened"
        time.sleep(0.002)
    process.send_signal(signal.SIGSTOP)
    return process


def test_a_signal_held_while_a_temporary_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    """A signal arriving while a temporary folder and its owner record are made is held until they are, then
    raised before the caller holds the folder: the folder must still go."""
    from convnextv2.reference.errors import Interrupted

    made = temp_folders._new_temp_folder

    def signalled(dest: Path) -> Path:
        folder = made(dest)
        signals.on_signal(signal.SIGTERM)  # deferred: folders are made with signals held
        return folder

    monkeypatch.setattr(temp_folders, "_new_temp_folder", signalled)
    with signals.handling_signals(), pytest.raises(Interrupted), publishing.atomic_directory(tmp_path / "out-dir"):
        pytest.fail("the block must not run")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("fmt", "signum"), [("canonical", signal.SIGTERM), ("canonical", signal.SIGHUP),
                                             ("canonical", signal.SIGINT), ("hf", signal.SIGTERM)],
                         ids=["file-SIGTERM", "file-SIGHUP", "file-SIGINT", "folder-SIGTERM"])
def test_signal_mid_write_exits_cleanly(tmp_path, tiny, fmt, signum):
    work = tmp_path / "work"
    work.mkdir()
    dst = _destination(work, fmt)
    process = _stopped_mid_write(["convert", str(tiny), "-o", str(dst), "--to", fmt], work)
    process.send_signal(signum)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-3000:]
    name = signal.Signals(signum).name
    assert _one_error_line(subprocess.CompletedProcess([], process.returncode, "", stderr)) == (
        f"error: interrupted by {name} while writing {dst}; nothing was written")
    assert os.listdir(work) == []


def test_sigterm_during_overwrite_keeps_the_old_file(tmp_path, tiny, atto):
    work = tmp_path / "work"
    work.mkdir()
    dst = work / "out.safetensors"
    converters.save(converters.load(atto), dst, format="canonical")
    old = dst.read_bytes()
    process = _stopped_mid_write(["convert", str(tiny), "-o", str(dst), "--to", "canonical", "--overwrite"], work)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert dst.read_bytes() == old and os.listdir(work) == ["out.safetensors"]


@pytest.mark.parametrize("fmt", ["canonical", "original", pytest.param("keras", marks=pytest.mark.slow),
                                 pytest.param("onnx", marks=pytest.mark.slow)])
def test_sigkill_of_a_single_file_conversion_leaves_nothing_at_all(tmp_path, tiny, atto, fmt):
    """A conversion to one file (its scratch files too) is built, read back and checked unnamed; the stop lands
    once 10 MB of it are in the destination's directory."""
    work = tmp_path / "work"
    work.mkdir()
    dst = _destination(work, fmt)
    process = _stopped_mid_write(["convert", str(tiny), "-o", str(dst), "--to", fmt], work, min_bytes=10 << 20)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert os.listdir(work) == []


@pytest.mark.parametrize("fmt", ["hf", pytest.param("keras-h5", marks=pytest.mark.slow)],
                         ids=["folder", "file-made-by-name"])
def test_sigkill_leaves_one_marked_folder_that_the_next_conversion_removes(tmp_path, tiny, atto, fmt):
    """Outputs that need names while they are made (a folder; Keras's weights-only .h5, saved only under a
    .weights.h5 name) leave at most one marked folder, which the next conversion removes."""
    work = tmp_path / "work"
    work.mkdir()
    dst = _destination(work, fmt)
    fmt = fmt.split("-")[0]
    process = _stopped_mid_write(["convert", str(tiny), "-o", str(dst), "--to", fmt], work)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    left = os.listdir(work)
    assert len(left) <= 1, left
    for name in left:
        assert re.fullmatch(rf"\.{re.escape(dst.name)}\.convnextv2-tmp\.{process.pid}\.[^/]+\.partial", name), name
        if (work / name / temp_folders.OWNER_FILE).exists():
            assert json.loads((work / name / temp_folders.OWNER_FILE).read_text())["pid"] == process.pid
        else:  # stopped while the record was being written: only the pending record is in it
            assert set(os.listdir(work / name)) <= {temp_folders.PENDING_OWNER_FILE}
    done = _cli("convert", str(atto), "-o", str(dst), "--to", fmt)
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.listdir(work) == [dst.name]


def test_sigkill_of_a_library_save_leaves_nothing_at_all(tmp_path, tiny):
    """A single file written through converters.save (O_TMPFILE) has no name until it is complete."""
    work = tmp_path / "work"
    work.mkdir()
    code = ("import sys; from pathlib import Path; from convnextv2 import converters; "
            "converters.save(converters.load(Path(sys.argv[1])), Path(sys.argv[2]), format='canonical')")
    process = subprocess.Popen([sys.executable, "-c", code, str(tiny), str(work / "out.safetensors")], env=ENV,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not _open_under(process.pid, work):
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert os.listdir(work) == []


def _parity_workers(pid: int) -> list[int]:
    """The parity worker processes of ``pid``: its children, of any of its threads (the worker pool starts each
    worker from a thread of its own), that run ``worker_main``."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in map(int, children.read_text().split()):
                with contextlib.suppress(OSError):
                    if b"worker_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                        found.append(child)
    return found


@pytest.mark.slow
def test_sigterm_while_a_parity_child_process_runs(tmp_path, atto):
    """SIGTERM while the worker pool's child runs a runtime (transformers-tf, which always runs in a process of its
    own): the command exits 143 with one error line, the worker is gone, no report and no hand-off folder are
    left."""
    from convnextv2.parity_tests import runtimes

    reason = runtimes.get("transformers-tf").availability()
    if reason is not None:
        pytest.skip(f"the transformers-tf peer (the one run in a child process) is not available: {reason}")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    report = tmp_path / "report.json"
    process = subprocess.Popen([*CLI, "parity", str(atto), "--runtimes", "none", "--peers", "transformers-tf",
                                "--report", str(report)], env={**ENV, "TMPDIR": str(scratch)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    children: list[int] = []
    while not children:
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no worker process started"
        children = _parity_workers(process.pid)
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert _one_error_line(subprocess.CompletedProcess([], process.returncode, "", stderr)).startswith(
        "error: interrupted by SIGTERM")
    for child in children:
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
    assert not report.exists() and os.listdir(scratch) == []


# ------------------------------------------------------------------ which leftovers are removed

def test_only_provably_abandoned_folders_are_removed(tmp_path):
    dest = tmp_path / "out-dir"
    dead_pid = subprocess.Popen(["true"])  # a pid that no longer runs
    dead_pid.wait()
    me = temp_folders._owner_record()

    def folder(tag: str, pid: int, record: object | None) -> Path:
        path = tmp_path / f".out-dir.convnextv2-tmp.{pid}.{tag}.partial"
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
        if record is not None:
            (path / temp_folders.OWNER_FILE).write_text(record if isinstance(record, str) else json.dumps(record))
        return path

    gone = [folder("dead", dead_pid.pid, {**me, "pid": dead_pid.pid}),
            folder("reboot", os.getpid(), {**me, "boot_id": "another-boot"}),
            folder("recycled", os.getpid(), {**me, "start_time": "1"})]
    kept = [folder("alive", os.getpid(), me),
            folder("unmarked", dead_pid.pid, None),
            folder("garbled", dead_pid.pid, "{not json"),
            folder("foreign", dead_pid.pid, {**me, "pid": dead_pid.pid, "tool": "something-else"}),
            folder("renamed", dead_pid.pid + 1, {**me, "pid": dead_pid.pid})]
    # Killed while its owner record was being written: nothing in it but the pending record.
    unfinished = [tmp_path / f".out-dir.convnextv2-tmp.{pid}.{tag}.partial"
                  for tag, pid in (("empty", dead_pid.pid), ("pending", dead_pid.pid), ("pending-alive", os.getpid()),
                                   ("pending-and-more", dead_pid.pid))]
    for path in unfinished:
        path.mkdir()
    for path in unfinished[1:]:
        (path / temp_folders.PENDING_OWNER_FILE).write_text('{"tool": "conv')
    (unfinished[3] / "model.safetensors").write_bytes(b"half")
    gone += unfinished[:2]
    kept += unfinished[2:]
    other = tmp_path / f".other.convnextv2-tmp.{dead_pid.pid}.x.partial"
    other.mkdir()
    (other / temp_folders.OWNER_FILE).write_text(json.dumps({**me, "pid": dead_pid.pid}))
    removed = temp_folders.remove_stale_temporaries(dest)
    assert sorted(removed) == sorted(gone)
    assert all(not p.exists() for p in gone) and all(p.exists() for p in kept) and other.exists()
