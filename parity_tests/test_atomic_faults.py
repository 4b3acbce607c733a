"""Atomic outputs under faults: a conversion killed with SIGKILL at chosen moments leaves the
destination absent, the complete old file, or the complete new file; never a half-written one.

Each conversion runs in a subprocess through the CLI. A small driver wraps the writer's tensor loop, fsync
and the publishing rename so the process SIGKILLs itself at an exact point (it is a real SIGKILL: no cleanup,
no finally blocks). A slow test kills conversions of a larger model after random delays from outside.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convnextv2 import converters, fixtures
from convnextv2.parity_tests.conftest_helpers import run_cli

# Runs the CLI with one kill point armed. KILL_AT: "tensor:N" (before the Nth tensor's bytes), "half:N" (after
# half of them), "fsync:N" (at the Nth fsync), "publish" (before the rename/link/exchange that gives the
# destination its new content), "published" (right after it, before cleanup), "between" (directory fallback
# without renameat2: between moving the old directory away and moving the new one in).
DRIVER = r"""
import os, signal, sys
import numpy as np
from convnextv2.converters import publishing as publisher
from convnextv2.converters import safetensors_io, torchzip

kind, _, number = os.environ["KILL_AT"].partition(":")
number = int(number or 0)
counts = {"tensor": 0, "fsync": 0}
final = os.path.abspath(sys.argv[sys.argv.index("-o") + 1])

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

real_write = safetensors_io.write_array_bytes
def write_array_bytes(out, array):
    index = counts["tensor"]
    counts["tensor"] += 1
    if kind == "tensor" and index == number:
        die()
    if kind == "half" and index == number:
        raw = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        out.write(raw[: len(raw) // 2])
        if hasattr(out, "flush"):
            out.flush()
        die()
    real_write(out, array)
safetensors_io.write_array_bytes = write_array_bytes
torchzip.write_array_bytes = write_array_bytes

real_fsync = os.fsync
def fsync(fd):
    counts["fsync"] += 1
    if kind == "fsync" and counts["fsync"] == number:
        die()
    real_fsync(fd)
os.fsync = fsync

def target_of(args, kwargs):
    target = os.fspath(args[1])
    directory = kwargs.get("dst_dir_fd")
    if directory is not None and not os.path.isabs(target):
        target = os.path.join(os.readlink(f"/proc/self/fd/{directory}"), target)
    return os.path.abspath(target)

def publishing(real):
    # The call that gives the destination its new content is the one whose target is the destination.
    def wrapper(*args, **kwargs):
        target = target_of(args, kwargs)
        if target == final and kind == "publish":
            die()
        result = real(*args, **kwargs)
        if target == final and kind == "published":
            die()
        if kind == "between" and target.endswith(".old"):
            die()
        return result
    return wrapper
os.replace = publishing(os.replace)
os.link = publishing(os.link)
real_renameat2 = publisher._renameat2
def renameat2(source, target, flags):
    if kind == "between":
        return False  # as on a kernel or filesystem without renameat2
    return publishing(real_renameat2)(source, target, flags)
publisher._renameat2 = renameat2

from convnextv2.converters.cli import main
main(sys.argv[1:])
"""

# What a SIGKILLed write may leave beside the destination: one temporary folder with its owner record (the next
# write to the destination removes it), or, in the directory fallback without renameat2, the old directory.
LEFTOVER = re.compile(r"\..+\.convnextv2-(tmp|old)\.\d+\.[^/]+\.(partial|old)")


# Formats whose writer is fast enough for the default suite, with where their output lives. timm and flax
# write through the same safetensors writer as canonical; the default suite kills canonical, original
# (zip writer), hf (directory) and timm (weights plus a sidecar JSON); flax runs under slow.
DIRECTORY_FORMATS = {"hf"}
SIDECAR_FORMATS = {"timm"}
FAST_WRITABLE = ["canonical", "original", "hf", "timm", "flax"]
# One file output and one folder output in the default suite; the other writers under slow.
DEFAULT_SUITE = {"canonical", "hf"}
KILL_POINTS = ["tensor:0", "half:5", "tensor:last", "fsync:1", "publish", "published"]


def _output_files(path: Path) -> list[Path]:
    """Every file an output consists of: a directory's files, or a file and the sidecar JSON timm writes."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    sidecar = path.with_suffix(".json")
    return [p for p in (path, sidecar) if p.exists()]


def _digest(path: Path, weights_only: bool = False) -> str:
    files = [path] if weights_only and path.exists() else [] if weights_only else _output_files(path)
    if not files:
        return "absent"
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _destination(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / ("out-dir" if fmt in DIRECTORY_FORMATS else f"out.{'pt' if fmt == 'original' else 'safetensors'}")


def _convert(src: Path, dst: Path, fmt: str, kill_at: str | None, overwrite: bool) -> subprocess.CompletedProcess[str]:
    args = ["convert", str(src), "-o", str(dst), "--to", fmt] + (["--overwrite"] if overwrite else [])
    env = {**os.environ, "CONVNEXTV2_PROGRESS": "0", "KILL_AT": kill_at or "none:0"}
    return subprocess.run([sys.executable, "-c", DRIVER, *args], env=env, capture_output=True, text=True, timeout=300)


def _leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def _tensor_count(src: Path, fmt: str, tmp_path: Path) -> int:
    probe = tmp_path / "count"
    probe.mkdir()
    dst = _destination(probe, fmt)
    converters.save(converters.load(src), dst, format=fmt)
    files = sorted(p for p in dst.rglob("*.safetensors")) if dst.is_dir() else [dst]
    if fmt == "original":
        from convnextv2.converters.torchzip import read_torch_zip

        return len(read_torch_zip(dst)["model"])
    from convnextv2.converters.safetensors_io import read_safetensors

    return sum(len(read_safetensors(f)[0]) for f in files)


def _writable_fast() -> list:
    available = converters.available_formats()
    return [pytest.param(f, id=f, marks=[] if f in DEFAULT_SUITE else [pytest.mark.slow])
            for f in FAST_WRITABLE if f in available]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Source checkpoint, its clean conversion to each format (the reference), and an older different one."""
    root = tmp_path_factory.mktemp("atomic")
    src = root / "src.pt"
    fixtures.write_fixture(src, "atto", "original", seed=1)
    old_src = root / "old.pt"
    fixtures.write_fixture(old_src, "atto", "original", seed=2)
    return root, src, old_src


@pytest.mark.parametrize("fmt", _writable_fast())
@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_killed_conversion_leaves_absent_old_or_complete(tmp_path, sources, fmt, overwrite):
    root, src, old_src = sources
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference = _destination(reference_dir, fmt)
    assert _convert(src, reference, fmt, None, False).returncode == 0
    new_digest = _digest(reference)
    new_weights = _digest(reference, weights_only=True) if fmt in SIDECAR_FORMATS else None
    tensors = _tensor_count(src, fmt, tmp_path)
    for kill_at in KILL_POINTS:
        kill_at = kill_at.replace("last", str(tensors - 1))
        work = tmp_path / kill_at.replace(":", "-")
        work.mkdir()
        dst = _destination(work, fmt)
        if overwrite:
            assert _convert(old_src, dst, fmt, None, False).returncode == 0
        before = _digest(dst)
        before_weights = _digest(dst, weights_only=True) if fmt in SIDECAR_FORMATS else None
        keep = {p.name for p in work.iterdir()} | {dst.name, dst.with_suffix(".json").name}
        done = _convert(src, dst, fmt, kill_at, overwrite)
        assert done.returncode == -signal.SIGKILL, f"{kill_at}: the kill point was not reached: {done.stderr[-2000:]}"
        if fmt in SIDECAR_FORMATS:
            # A weights file and its sidecar JSON take two renames, and the kill points fire at the first (the
            # sidecar's). The weights are the checkpoint: they must be the old or the new complete file, and
            # new weights must never sit beside an old sidecar.
            after_weights = _digest(dst, weights_only=True)
            assert after_weights in (before_weights, new_weights), (
                f"{kill_at}: the weights are neither the old nor the new file")
            if after_weights == new_weights:
                assert _digest(dst) == new_digest, f"{kill_at}: new weights beside an old sidecar"
        else:
            after = _digest(dst)
            if kill_at == "published":
                assert after == new_digest, f"{kill_at}: the published output differs from a clean conversion"
            else:
                assert after == before, f"{kill_at}: destination changed before it was published ({before} -> {after})"
        left = _leftovers(work, keep)
        for name in left:
            assert LEFTOVER.fullmatch(name), f"{kill_at}: left {name}"
        assert len([n for n in left if ".convnextv2-tmp." in n]) <= 1, f"{kill_at}: more than one temporary: {left}"
        # A complete destination is valid: it reads back.
        if dst.exists():
            converters.load(dst)
        if kill_at == "half:5":
            # The next write to the same destination removes what the killed one left (its owner is gone).
            assert _convert(src, dst, fmt, None, True).returncode == 0
            assert not [n for n in _leftovers(work, keep) if ".convnextv2-tmp." in n], _leftovers(work, keep)


@pytest.mark.skipif("hf" not in converters.available_formats(), reason="the hf converter has not landed")
def test_directory_fallback_between_renames_keeps_old_directory(tmp_path, sources):
    """Without renameat2, a kill between the two renames leaves no destination but the old one kept intact."""
    _, src, old_src = sources
    dst = tmp_path / "out-dir"
    assert _convert(old_src, dst, "hf", None, False).returncode == 0
    old_digest = _digest(dst)
    done = _convert(src, dst, "hf", "between", True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    kept = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert len(kept) == 1 and _digest(kept[0]) == old_digest
    assert not dst.exists() or _digest(dst) == old_digest


def test_existing_destination_needs_overwrite(tmp_path, sources):
    _, src, old_src = sources
    dst = tmp_path / "out.safetensors"
    converters.save(converters.load(old_src), dst, format="canonical")
    before = _digest(dst)
    result = run_cli("convert", str(src), "-o", str(dst), "--to", "canonical")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert _digest(dst) == before
    result = run_cli("convert", str(src), "-o", str(dst), "--to", "canonical", "--overwrite")
    assert result.returncode == 0 and _digest(dst) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"], "a normal run left temporary files"


def test_failure_during_write_leaves_nothing(tmp_path, sources, monkeypatch):
    """An error mid-write (here a full disk as the writer sees it) removes the temporaries; the old file stays,
    and the error is the toolkit's one line naming the destination."""
    from convnextv2.converters import safetensors_io
    from convnextv2.reference.errors import EnvironmentFaultError

    _, src, old_src = sources
    dst = tmp_path / "out.safetensors"
    converters.save(converters.load(old_src), dst, format="canonical")
    before = _digest(dst)
    calls = []

    def failing(out, array):
        calls.append(1)
        if len(calls) == 7:
            raise OSError(28, "No space left on device")
        out.write(array.tobytes())

    monkeypatch.setattr(safetensors_io, "write_array_bytes", failing)
    with pytest.raises(EnvironmentFaultError, match=f"^{re.escape(str(dst))}: no space left in "):
        converters.save(converters.load(src), dst, format="canonical", overwrite=True)
    assert _digest(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_file_appearing_mid_write_is_not_replaced(tmp_path, sources, monkeypatch):
    """Without --overwrite a destination created while we wrote is kept (link() refuses it atomically)."""
    from convnextv2.converters import safetensors_io
    from convnextv2.reference.errors import BadInputError

    _, src, _ = sources
    dst = tmp_path / "out.safetensors"
    real = safetensors_io.write_array_bytes

    def racing(out, array):
        if not dst.exists():
            dst.write_bytes(b"someone else's file")
        real(out, array)

    monkeypatch.setattr(safetensors_io, "write_array_bytes", racing)
    # A staged conversion sees the newcomer when it publishes; a direct write when it links (below).
    with pytest.raises(BadInputError, match="already exists|appeared while it was being written"):
        converters.save(converters.load(src), dst, format="canonical")
    assert dst.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


@pytest.mark.parametrize("named", [False, True], ids=["anonymous", "named"])
def test_link_refuses_a_file_that_appeared(tmp_path, named):
    """The publishing link() itself refuses a destination created after the start (no check-then-rename race)."""
    from convnextv2.converters.publishing import atomic_file
    from convnextv2.reference.errors import BadInputError

    dst = tmp_path / "out.bin"
    with pytest.raises(BadInputError, match="appeared while it was being written"), \
            atomic_file(dst, named=named) as tmp:
        tmp.write_bytes(b"ours")
        dst.write_bytes(b"theirs")
    assert dst.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny", "base"])
def test_random_kills_of_a_large_conversion(tmp_path, variant):
    """SIGKILL from outside after random delays: every trial leaves nothing or a complete, valid file."""
    src = tmp_path / "src.pt"
    fixtures.write_fixture(src, variant, "original", seed=0)
    (tmp_path / "reference").mkdir()
    reference = tmp_path / "reference" / "out.safetensors"  # the digest covers the file name too
    converters.save(converters.load(src), reference, format="canonical")
    expected = _digest(reference)
    clean = time.perf_counter()
    assert run_cli("convert", str(src), "-o", str(tmp_path / "timing.safetensors"), "--to", "canonical").returncode == 0
    duration = time.perf_counter() - clean
    rng = random.Random(8)
    outcomes = {"absent": 0, "complete": 0}
    for trial in range(20):
        work = tmp_path / f"trial{trial}"
        work.mkdir()
        dst = work / "out.safetensors"
        env = {**os.environ, "CONVNEXTV2_PROGRESS": "0"}
        process = subprocess.Popen([sys.executable, "-m", "convnextv2.converters", "convert", str(src), "-o", str(dst),
                                    "--to", "canonical"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        process.send_signal(signal.SIGKILL)
        process.wait()
        digest = _digest(dst)
        assert digest in ("absent", expected), f"trial {trial}: a broken destination"
        outcomes["absent" if digest == "absent" else "complete"] += 1
        if process.returncode == -signal.SIGKILL:
            outcomes["killed"] = outcomes.get("killed", 0) + 1
        for name in _leftovers(work, {"out.safetensors"}):
            assert re.fullmatch(r"\.out\.safetensors\.convnextv2-tmp\.\d+\.[^/]+\.partial", name), name
    assert outcomes["absent"] > 0 and outcomes.get("killed", 0) > 0, f"no kill landed before the rename: {outcomes}"
