"""The read-back compares in chunks on two threads and gives compared pages back: it must still see every
differing bit, wherever it lies in a tensor (first chunk, a chunk boundary, the last bytes past the last whole
eight-byte lane), and the pages it gives back must read the same afterwards. It runs while the source digest is
still being computed, and the digest still lands in the published header."""

from __future__ import annotations

import hashlib
import json
import mmap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from convnextv2 import converters
from convnextv2.converters import digests, formats, saving
from convnextv2.converters import read_back as read_back_module
from convnextv2.converters.read_back import CHUNK_BYTES, read_back, same_bits
from convnextv2.converters.read_back import _flat_bytes as flat_bytes
from convnextv2.converters.read_back import _read_only_mapping as read_only_mapping
from convnextv2.converters.safetensors_io import read_header
from convnextv2.fixtures import write_fixture
from convnextv2.reference.errors import CheckFailedError

# One stage-3 block 640 wide: its pwconv weights are 640 x 2560 float32 = 6.25 MiB, over one compare chunk.
WIDE = "custom:depths=1,1,1,1;dims=16,32,48,640"
BIG_TENSOR = "stages.3.blocks.0.pwconv1.weight"


def _mapped(tmp_path: Path, data: np.ndarray, name: str) -> np.ndarray:
    path = tmp_path / name
    path.write_bytes(data.tobytes())
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapping, dtype=data.dtype)


# Byte positions past the first chunk, on a chunk boundary, and in the tail that is not a whole uint64 lane.
@pytest.mark.parametrize("where", [0, CHUNK_BYTES - 1, CHUNK_BYTES, 2 * CHUNK_BYTES + 5, -1])
def test_same_bits_sees_one_differing_byte_anywhere(tmp_path, where):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=2 * CHUNK_BYTES + 4099, dtype=np.uint8)
    other = data.copy()
    other[where] ^= 0x01
    a, b = _mapped(tmp_path, data, "a.bin"), _mapped(tmp_path, other, "b.bin")
    assert same_bits(a, _mapped(tmp_path, data, "c.bin"), release=True)
    assert not same_bits(a, b, release=True)
    assert not same_bits(data, other)


@pytest.mark.parametrize("where", [0, CHUNK_BYTES - 1, CHUNK_BYTES + 8, 2 * CHUNK_BYTES + 5, -1])
def test_same_bits_without_memcmp_sees_one_differing_byte_anywhere(tmp_path, where, monkeypatch):
    """The numpy comparison used where libc's memcmp cannot be loaded: eight-byte lanes, then the bytes after."""
    monkeypatch.setattr(read_back_module, "_MEMCMP", None)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=2 * CHUNK_BYTES + 4099, dtype=np.uint8)
    other = data.copy()
    other[where] ^= 0x80
    assert same_bits(_mapped(tmp_path, data, "a.bin"), _mapped(tmp_path, data, "c.bin"), release=True)
    assert not same_bits(_mapped(tmp_path, data, "a.bin"), _mapped(tmp_path, other, "b.bin"), release=True)


def test_same_bits_tells_signed_zeros_and_nan_payloads_apart():
    zeros = np.zeros(CHUNK_BYTES // 4 + 3, dtype=np.float32)
    negative = zeros.copy()
    negative[-1] = -0.0
    assert not same_bits(zeros, negative)
    nans = np.full(CHUNK_BYTES // 4 + 3, np.nan, dtype=np.float32)
    payload = nans.copy()
    payload.view(np.uint32)[7] |= 1  # still a NaN, another payload
    assert np.isnan(payload[7]) and not same_bits(nans, payload)


def test_pages_given_back_read_the_same_afterwards(tmp_path):
    data = np.arange(3 * CHUNK_BYTES // 8, dtype=np.uint64)
    a, b = _mapped(tmp_path, data, "a.bin"), _mapped(tmp_path, data, "b.bin")
    assert same_bits(a, b, release=True)
    assert np.array_equal(a, data) and np.array_equal(b, data)


def test_our_readers_tensors_are_recognised_as_read_only_mappings_and_nothing_else(tmp_path):
    source = tmp_path / "w.pt"
    write_fixture(source, variant=WIDE, fmt="original", num_classes=10)
    ckpt = converters.load(source)  # torch zip: views made by as_strided over the mapping
    assert all(read_only_mapping(flat_bytes(a)) for _, a in ckpt.ordered_tensors())
    out = tmp_path / "w.safetensors"
    converters.save(ckpt, out, format="canonical")
    written = converters.load(out)
    assert all(read_only_mapping(flat_bytes(a)) for _, a in written.ordered_tensors())
    # Writable memory must never be given back: MADV_DONTNEED there would discard it.
    assert not read_only_mapping(flat_bytes(np.ones(CHUNK_BYTES, dtype=np.uint8)))
    with open(out, "rb") as handle:
        private = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    assert not read_only_mapping(np.frombuffer(private, dtype=np.uint8))


def test_read_back_names_a_large_tensor_changed_on_disk(tmp_path):
    source = tmp_path / "w.pt"
    write_fixture(source, variant=WIDE, fmt="original", num_classes=10)
    ckpt = converters.load(source)
    assert ckpt.tensors[BIG_TENSOR].nbytes > CHUNK_BYTES
    out = tmp_path / "w.safetensors"
    assert converters.save(ckpt, out, format="canonical")["read_back"]["status"] == "exact"
    header, data_start, _ = read_header(out)
    begin, end = header[BIG_TENSOR]["data_offsets"]
    # One bit, in the second compare chunk of the tensor.
    position = data_start + begin + CHUNK_BYTES + 12
    assert position < data_start + end
    raw = bytearray(out.read_bytes())
    raw[position] ^= 0x40
    out.write_bytes(bytes(raw))
    with pytest.raises(CheckFailedError, match=rf"{BIG_TENSOR}: 1 element\(s\) differ"):
        read_back(ckpt, out, formats.get("canonical"))


def test_read_back_does_not_wait_for_a_second_thread_that_has_not_started(tmp_path):
    """The second comparing thread starts once the source digest is done; a read-back that ends before that must
    neither wait for it nor miss a difference."""
    source = tmp_path / "w.pt"
    write_fixture(source, variant=WIDE, fmt="original", num_classes=10)
    ckpt = converters.load(source)
    out = tmp_path / "w.safetensors"
    converters.save(ckpt, out, format="canonical")
    free = threading.Event()
    releaser = threading.Timer(30.0, free.set)  # a read-back that waits for the second thread takes 30 s
    releaser.start()
    try:
        started = time.perf_counter()
        summary, _ = read_back(ckpt, out, formats.get("canonical"), second_thread_after=free.wait)
        assert summary["status"] == "exact" and time.perf_counter() - started < 20
        header, data_start, _ = read_header(out)
        begin, _ = header[BIG_TENSOR]["data_offsets"]
        raw = bytearray(out.read_bytes())
        raw[data_start + begin + 3] ^= 0x01
        out.write_bytes(bytes(raw))
        with pytest.raises(CheckFailedError, match=rf"{BIG_TENSOR}: 1 element\(s\) differ"):
            read_back(ckpt, out, formats.get("canonical"), second_thread_after=free.wait)
        assert time.perf_counter() - started < 20
    finally:
        releaser.cancel()
        free.set()


def test_the_read_back_runs_while_the_source_digest_is_computed_and_the_digest_lands_in_the_header(tmp_path,
                                                                                                  monkeypatch):
    """converters.save reads the output back while the source's sha256 is still being computed, then writes the
    digest into the header: the published file records hashlib's digest of the source."""
    source = tmp_path / "w.pt"
    write_fixture(source, variant=WIDE, fmt="original", num_classes=10)
    reading_back = threading.Event()
    overlapped: list[bool] = []
    hash_mapped, real_read_back = digests._hash_mapped, saving.read_back

    def slow_digest(*args):
        overlapped.append(reading_back.wait(timeout=30))  # a save that waits for the digest first times out
        return hash_mapped(*args)

    def marked_read_back(*args, **kwargs):
        reading_back.set()
        return real_read_back(*args, **kwargs)

    monkeypatch.setattr(digests, "_hash_mapped", slow_digest)
    monkeypatch.setattr(saving, "read_back", marked_read_back)
    out = tmp_path / "w.safetensors"
    assert converters.save(converters.load(source), out, format="canonical")["read_back"]["status"] == "exact"
    assert overlapped == [True]
    header, _, _ = read_header(out)
    recorded = json.loads(header["__metadata__"]["source"])["sha256"]
    assert recorded == hashlib.sha256(source.read_bytes()).hexdigest()
