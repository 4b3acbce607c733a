"""Property-based fuzzing of the readers, plus a brief coverage-guided (atheris) run.

Any exception other than the toolkit's own errors is a failure. The default profile is small and
derandomized so the suite is quick and repeatable; ``nox -s fuzz`` runs the same properties with the
``fuzz`` profile (``CONVNEXTV2_FUZZ_EXAMPLES`` examples each, random seeds).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from convnextv2 import converters
from convnextv2.converters.safetensors_io import read_safetensors, write_safetensors
from convnextv2.converters.torchzip import read_torch_zip, write_torch_zip
from convnextv2.fixtures import hostile
from convnextv2.fixtures.hostile.fuzz_targets import SEED_ROOT, make_reader
from convnextv2.reference.errors import BadInputError

settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz", max_examples=int(os.environ.get("CONVNEXTV2_FUZZ_EXAMPLES", "2000")),
                          deadline=None, database=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("CONVNEXTV2_HYPOTHESIS_PROFILE", "ci"))

# The checkout this file sits in: the atheris driver is tools/fuzz.py, outside the installed package.
REPOSITORY = Path(__file__).resolve().parents[1]
# Made at import (the readers below are built once per process, xdist workers included) and removed at exit:
# every collection of this module would otherwise leave one behind in the temporary folder.
WORKDIR = Path(tempfile.mkdtemp(prefix="hypothesis-readers-"))
atexit.register(shutil.rmtree, WORKDIR, True)
READERS = {target: make_reader(target, WORKDIR / target) for target in ("safetensors", "torchzip", "onnx")}
for _target in READERS:
    (WORKDIR / _target).mkdir(exist_ok=True)


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _seeds(target: str) -> list[bytes]:
    files = sorted((SEED_ROOT / target).iterdir())
    assert files, f"no seeds in {SEED_ROOT / target}"
    return [f.read_bytes() for f in files]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed with a few random edits: bit flips, overwritten runs, truncation, insertion, interesting ints."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "int"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[position: position + len(chunk)] = chunk
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "int":
            value = draw(st.sampled_from([0, 1, 0x7F, 0xFF, 0xFFFF, 0xFFFFFFFF, 2**31, 2**63 - 1, 2**64 - 1]))
            data[position: position + 8] = struct.pack("<Q", value)
    return bytes(data)


# ------------------------------------------------------------------ mutation properties (every reader, every sniffer)

@given(mutated(_seeds("safetensors")))
def test_property_safetensors_mutations(data):
    READERS["safetensors"](data)


@given(mutated(_seeds("torchzip")))
def test_property_torchzip_mutations(data):
    READERS["torchzip"](data)


@pytest.mark.onnx
@given(mutated(_seeds("onnx")))
def test_property_onnx_mutations(data):
    if "onnx" not in converters.available_formats():
        pytest.fail("the onnx converter is missing")
    READERS["onnx"](data)


@pytest.mark.onnx
@pytest.mark.parametrize("target", sorted(READERS))
def test_every_committed_seed_replays_cleanly(target):
    """Seeds include inputs that once crashed a reader or a sniffer (``*-crash-*``): replayed every run, so
    a fixed crash cannot come back unnoticed between the random fuzz runs."""
    for data in _seeds(target):
        READERS[target](data)


# ------------------------------------------------------------------ structure-aware safetensors headers

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U64", "F8_E4M3", "f32", "", "C64"]
ints = st.one_of(st.integers(-3, 64), st.sampled_from([2**31, 2**32, 2**62, 2**63, 2**64 - 1, 2**70]), st.booleans())


@st.composite
def safetensors_file(draw) -> tuple[bytes, dict]:
    header: dict = {}
    offset = 0
    for index in range(draw(st.integers(0, 4))):
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        itemsize = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)
        size = int(np.prod(shape)) * itemsize
        offsets = [offset, offset + size]
        if draw(st.booleans()):  # break one field
            field = draw(st.sampled_from(["shape", "offsets", "extra"]))
            if field == "shape":
                shape = draw(st.lists(ints, max_size=4))
            elif field == "offsets":
                offsets = draw(st.lists(ints, min_size=0, max_size=3))
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.integers(0, 9)) == 0:
            entry["extra"] = 1
        header[draw(st.text(min_size=1, max_size=8)) + str(index)] = entry
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), ints),
                                                      max_size=3))
    raw = json.dumps(header).encode()
    length = len(raw) if draw(st.integers(0, 9)) else draw(st.sampled_from([0, 1, len(raw) + 1, 2**64 - 1]))
    data = draw(st.binary(min_size=max(0, offset - 2), max_size=offset + 2))
    return struct.pack("<Q", length) + raw + data, header


@given(safetensors_file())
def test_property_safetensors_headers_agree_with_the_safetensors_package(case):
    """Our reader refuses with BadInputError, or returns exactly what the safetensors package's own parser
    (``safetensors.deserialize``: names, dtype codes, shapes, raw bytes) returns."""
    import safetensors

    from convnextv2.converters.safetensors_io import code_from_dtype

    data, _ = case
    path = WORKDIR / "structured.safetensors"
    path.write_bytes(data)
    try:
        ours, metadata = read_safetensors(path)
    except BadInputError:
        return
    theirs = dict(safetensors.deserialize(data))
    assert set(theirs) == set(ours)
    for name, array in ours.items():
        assert code_from_dtype(array.dtype) == theirs[name]["dtype"], name
        assert list(array.shape) == list(theirs[name]["shape"]), name
        assert _bits(array).tobytes() == bytes(theirs[name]["data"]), name


# ------------------------------------------------------------------ random pickles inside a valid container

OPCODES = [b"N", b"\x88", b"\x89", b"K\x01", b"J\xff\xff\xff\x7f", b"X\x01\x00\x00\x00a", b"X\xff\xff\xff\x7f",
           b"]", b"}", b")", b"(", b"t", b"l", b"d", b"a", b"e", b"s", b"u", b"R", b"\x81", b"b", b"0", b"2",
           b"q\x01", b"h\x01", b"h\x07", b"\x85", b"\x86", b"\x87", b"Q", b"\x82\x01", b"\x8a\x08" + b"\xff" * 8,
           b"\x95" + struct.pack("<Q", 2**40), b"\x8e" + struct.pack("<Q", 2**40),
           hostile.p_global("collections", "OrderedDict"), hostile.p_global("torch._utils", "_rebuild_tensor_v2"),
           hostile.p_global("torch", "FloatStorage"), hostile.p_global("argparse", "Namespace"),
           hostile.p_global("_codecs", "encode"), hostile.p_global("builtins", "set"),
           hostile.p_global("os", "system"), b"\x80\x04\x8c\x02os\x8c\x06system\x93",
           # getattr (answered on placeholders only) and a global that becomes a placeholder
           hostile.p_global("builtins", "getattr"), hostile.p_global("logging", "FileHandler"),
           hostile.p_str("storage"), hostile.p_str("0"), hostile.p_str("cpu"), hostile.p_str("latin1")]


@given(st.lists(st.sampled_from(OPCODES), max_size=40), st.booleans())
def test_property_random_pickles_fail_cleanly(opcodes, terminate):
    pickled = b"\x80\x02" + b"".join(opcodes) + (b"." if terminate else b"")
    storage = np.arange(4, dtype=np.float32).tobytes()
    path = WORKDIR / "random-pickle.pt"
    hostile.write_zip(path, [("archive/data.pkl", pickled), ("archive/data/0", storage)])
    with contextlib.suppress(BadInputError):
        read_torch_zip(path)


# ------------------------------------------------------------------ round trips through our writers

dtypes = st.sampled_from([np.float32, np.float16, np.float64, np.int64, np.int32, np.int8, np.uint8, np.bool_])
arrays = dtypes.flatmap(lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
tensor_dicts = st.dictionaries(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
                                       max_size=12), arrays, max_size=5)


@given(tensor_dicts, st.booleans())
def test_property_writers_round_trip_bit_exact(tensors, transpose):
    import safetensors.numpy

    if transpose:  # non-contiguous sources are written through the chunked path
        tensors = {k: v.T for k, v in tensors.items()}
    path = WORKDIR / "round.safetensors"
    write_safetensors(path, tensors, {"k": "v"})
    ours, metadata = read_safetensors(path)
    theirs = safetensors.numpy.load_file(str(path))
    assert metadata == {"k": "v"}
    for name, array in tensors.items():
        for got in (ours[name], theirs[name]):
            assert got.dtype == array.dtype and got.shape == array.shape
            assert np.array_equal(_bits(got), _bits(array))
    zipped = WORKDIR / "round.pt"
    write_torch_zip(zipped, {"model": dict(tensors), "args": {"names": sorted(tensors)}})
    back = read_torch_zip(zipped)
    assert back["args"]["names"] == sorted(tensors)
    for name, array in tensors.items():
        assert np.array_equal(_bits(back["model"][name]), _bits(array))


def test_zip_member_reads_are_bounded(tmp_path):
    """A plain zip is never decompressed by the reader: compressed entries are refused before reading."""
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02N" + b" " * (50 << 20) + b".")
    assert path.stat().st_size < 200_000
    with pytest.raises(BadInputError, match="compressed"):
        read_torch_zip(path)


# ------------------------------------------------------------------ a brief coverage-guided run

def test_brief_atheris_run(tmp_path):
    """Each target fuzzed with atheris for a few seconds from the committed seeds; no crash, inputs were tried."""
    seconds = int(os.environ.get("CONVNEXTV2_BRIEF_FUZZ_SECONDS", "5"))
    report_file = tmp_path / "fuzz.json"
    # The driver is a tool of the repository (tools/fuzz.py), run from its root.
    done = subprocess.run([sys.executable, "-m", "tools.fuzz", "--seconds", str(seconds),
                           "--no-hypothesis", "--seed", "1", "--artifacts", str(tmp_path / "artifacts"),
                           "--json", str(report_file)], capture_output=True, text=True, timeout=600,
                          cwd=REPOSITORY, env={**os.environ, "CONVNEXTV2_PROGRESS": "0"})
    assert report_file.exists(), done.stderr[-3000:]
    reports = json.loads(report_file.read_text())
    assert {r["target"] for r in reports} >= {"safetensors", "torchzip"}
    for report in reports:
        assert report["inputs"] and report["inputs"] > 20, report
        assert not report["crashed"], json.dumps(report, indent=1)[:4000]
    assert done.returncode == 0
