"""Conversions stream: peak memory is bounded by the largest tensor plus a constant, not by the file size.

Peak RSS is measured from outside the converting process (the kernel's ru_maxrss of that child via wait4;
pages of a memory-mapped source count in it). The constant is measured in the same test: the same command
converting an atto checkpoint (interpreter, numpy, the toolkit, the largest atto tensor). A fixture of many
8 MiB tensors (~340 MB in all) then has to convert within that constant plus its largest tensor plus a margin,
which is far below its file size: loading the checkpoint whole would break the bound several times over.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from convnextv2 import converters, fixtures
from convnextv2.converters.torchzip import read_torch_zip

# 40 blocks of width 512 in stage 3: every pwconv is 2048x512 fp32 = 4 MiB; the head 1000x512 = 2 MiB.
LARGE = "custom:depths=1,1,40,1;dims=32,64,512,512"
# Allocator slack, bounce buffer (16 MiB), the output's page-cache accounting noise.
MARGIN = 48 * 2**20


def _peak_rss_of(args: list[str]) -> int:
    """Run the CLI in a child; return its peak RSS in bytes (ru_maxrss of that child only)."""
    env = {**os.environ, "CONVNEXTV2_PROGRESS": "0"}
    process = subprocess.Popen([sys.executable, "-m", "convnextv2.converters", *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"conversion did not finish: {args}")
        time.sleep(0.01)
    err = process.stderr.read().decode() if process.stderr else ""
    assert process.stdout is not None and process.stderr is not None  # both are PIPEs
    process.stdout.close()
    process.stderr.close()
    assert os.waitstatus_to_exitcode(status) == 0, f"{args} failed: {err[-2000:]}"
    return int(usage.ru_maxrss) * 1024


def _largest_tensor(ckpt: converters.Checkpoint) -> int:
    return max(int(a.size) * a.dtype.itemsize for a in ckpt.tensors.values())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    files = {}
    for name, variant, fmt in [("small", "atto", "original"), ("large", LARGE, "original"),
                               ("large-sparse", LARGE, "fcmae-sparse")]:
        path = root / f"{name}.pt"
        fixtures.write_fixture(path, variant, fmt, seed=0)
        files[name] = path
    canonical = root / "large.safetensors"
    converters.save(converters.load(files["large"]), canonical, format="canonical")
    files["large-canonical"] = canonical
    return root, files


def _targets() -> list[str]:
    available = converters.available_formats()
    return [fmt for fmt in ("canonical", "hf", "timm") if fmt in available]


@pytest.mark.parametrize("source, target", [("large", fmt) for fmt in _targets()]
                         + [("large-canonical", "original"), ("large-sparse", "canonical")])
def test_peak_rss_is_bounded_by_the_largest_tensor(tmp_path, sources, source, target):
    _, files = sources
    src = files[source]
    small_out = tmp_path / "small-out"
    small_src = files["small"] if source != "large-canonical" else _small_canonical(files, tmp_path)
    baseline = _peak_rss_of(["convert", str(small_src), "-o", str(_output(small_out, target)), "--to", target])
    ckpt = converters.load(src)
    largest = _largest_tensor(ckpt)
    size = src.stat().st_size
    bound = baseline + largest + MARGIN
    # The test only means something if holding the whole checkpoint would break the bound.
    assert bound < baseline + size / 2, f"fixture too small to tell streaming from loading ({size} bytes)"
    out = _output(tmp_path / "large-out", target)
    peak = _peak_rss_of(["convert", str(src), "-o", str(out), "--to", target])
    assert peak <= bound, (
        f"{source} -> {target}: peak RSS {peak / 2**20:.0f} MiB exceeds the bound {bound / 2**20:.0f} MiB "
        f"(atto baseline {baseline / 2**20:.0f} MiB + largest tensor {largest / 2**20:.0f} MiB + "
        f"{MARGIN / 2**20:.0f} MiB); the file is {size / 2**20:.0f} MiB")
    # Streaming must not change what is written: the result reads back to the source's tensors exactly.
    back = converters.load(out)
    for name, array in ckpt.tensors.items():
        if name.startswith("extras.") and target != "canonical":
            continue
        assert np.array_equal(np.asarray(back.tensors[name]), np.asarray(array)), f"{name} differs after {target}"


def _small_canonical(files: dict[str, Path], tmp_path: Path) -> Path:
    path = tmp_path / "small.safetensors"
    converters.save(converters.load(files["small"]), path, format="canonical")
    return path


def _output(stem: Path, target: str) -> Path:
    return {"canonical": stem.with_suffix(".safetensors"), "original": stem.with_suffix(".pt"),
            "timm": stem.with_suffix(".safetensors")}.get(target, stem)


def test_streamed_file_matches_the_safetensors_package_and_records_the_source_digest(tmp_path, sources):
    """The digest of the source is computed while the tensors stream and written into the header last:
    it must equal hashlib's digest of the file, and the tensors must read back through the safetensors package
    exactly as torch stored them (read by our safe reader)."""
    _, files = sources
    src = files["large"]
    out = tmp_path / "out.safetensors"
    converters.save(converters.load(src), out, format="canonical")
    with safetensors.safe_open(str(out), "np") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    assert json.loads(metadata["source"])["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    state = read_torch_zip(src)["model"]
    assert np.array_equal(tensors["stages.2.blocks.39.pwconv1.weight"], state["stages.2.39.pwconv1.weight"])
    assert np.array_equal(tensors["head.fc.weight"], state["head.weight"])
    assert len(tensors) == len(state)


def test_source_changed_before_its_digest_is_refused(tmp_path, sources):
    """A source modified between reading and the streamed digest must not be recorded with a wrong digest."""
    _, files = sources
    src = tmp_path / "src.pt"
    src.write_bytes(files["small"].read_bytes())
    ckpt = converters.load(src)
    with open(src, "r+b") as handle:  # same size, different bytes, later mtime
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0xFF]))
    os.utime(src, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    with pytest.raises(converters.BadInputError, match="changed while it was being converted"):
        converters.save(ckpt, tmp_path / "out.safetensors", format="canonical")
    assert not (tmp_path / "out.safetensors").exists()
